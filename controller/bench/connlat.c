/* connlat: new-connection latency, the data-plane measurement of `kpr bench`.
 *
 * Each of COUNT iterations opens a new TCP connection (a fresh ephemeral source
 * port, no keep-alive), sends one HTTP/1.0 request, reads the whole response until
 * the server closes, and closes. Its latency runs from socket() to the close, so
 * the Service's translation (first packet: lookup and DNAT; every packet: the
 * reverse NAT) is inside it. A Python loop would measure the interpreter instead.
 *
 * Usage: connlat ADDRESS PORT COUNT [WARMUP]
 * Prints one JSON object: count, errors, p50/p90/p99/mean (microseconds), rate
 * (connections per second over the measured wall time).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* One connection: 0 on a full response, -1 on any failure. */
static int one(const struct sockaddr_storage *dst, socklen_t len)
{
	static const char req[] = "GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
	struct timeval tv = { .tv_sec = 2 };
	char buf[4096];
	ssize_t n, got = 0;
	int fd, one = 1;

	fd = socket(dst->ss_family, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)dst, len) < 0 ||
	    send(fd, req, sizeof(req) - 1, 0) != (ssize_t)(sizeof(req) - 1)) {
		close(fd);
		return -1;
	}
	while ((n = recv(fd, buf, sizeof(buf), 0)) > 0)
		got += n;
	close(fd);
	return (n == 0 && got > 0) ? 0 : -1;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage dst = { 0 };
	socklen_t len;
	long count, warmup, i, errors = 0, ok = 0;
	double *lat, t0, start, wall, sum = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: %s ADDRESS PORT COUNT [WARMUP]\n", argv[0]);
		return 2;
	}
	count = atol(argv[3]);
	warmup = argc > 4 ? atol(argv[4]) : count / 10;
	if (inet_pton(AF_INET, argv[1], &((struct sockaddr_in *)&dst)->sin_addr) == 1) {
		((struct sockaddr_in *)&dst)->sin_family = AF_INET;
		((struct sockaddr_in *)&dst)->sin_port = htons(atoi(argv[2]));
		len = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, argv[1],
			     &((struct sockaddr_in6 *)&dst)->sin6_addr) == 1) {
		((struct sockaddr_in6 *)&dst)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&dst)->sin6_port = htons(atoi(argv[2]));
		len = sizeof(struct sockaddr_in6);
	} else {
		fprintf(stderr, "connlat: not an address: %s\n", argv[1]);
		return 2;
	}
	lat = calloc(count, sizeof(*lat));
	if (!lat)
		return 1;
	for (i = 0; i < warmup; i++)
		one(&dst, len);
	start = now_us();
	for (i = 0; i < count; i++) {
		t0 = now_us();
		if (one(&dst, len) == 0) {
			lat[ok] = now_us() - t0;
			sum += lat[ok++];
		} else {
			errors++;
		}
	}
	wall = now_us() - start;
	if (ok == 0) {
		printf("{\"count\": 0, \"errors\": %ld}\n", errors);
		return 1;
	}
	qsort(lat, ok, sizeof(*lat), cmp_double);
	printf("{\"count\": %ld, \"errors\": %ld, \"p50\": %.1f, \"p90\": %.1f, "
	       "\"p99\": %.1f, \"mean\": %.1f, \"rate\": %.1f}\n",
	       ok, errors, lat[ok * 50 / 100], lat[ok * 90 / 100], lat[ok * 99 / 100],
	       sum / ok, ok / (wall / 1e6));
	free(lat);
	return 0;
}
