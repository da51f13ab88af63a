/* connlat: new-connection latency, the data-plane measurement of `kpr bench`.
 *
 * Each of COUNT iterations opens a new TCP connection (a fresh ephemeral source
 * port, no keep-alive), sends one HTTP/1.0 request, reads the whole response until
 * the server closes, and closes. Its latency runs from socket() to the close, so
 * the Service's translation (first packet: lookup and DNAT; every packet: the
 * reverse NAT) is inside it. A Python loop would measure the interpreter instead.
 *
 * Usage: connlat ADDRESS PORT COUNT [WARMUP]
 *        connlat -i CHUNK COUNT WARMUP ADDRESS PORT [ADDRESS PORT ...]
 * The first prints one JSON object: count, errors, p50/p90/p99/mean (microseconds),
 * rate (connections per second over the measured wall time).
 *
 * The second measures several targets side by side: COUNT connections each, in
 * cycles of CHUNK connections per target, each cycle starting one target later
 * (cycle c: target c, c+1, ...), and prints a JSON array with one object per target
 * in argument order; "rate" is then over the target's own connection time. This is
 * how `kpr bench` compares a Service with its floor: on a shared host whose speed
 * changes from one second to the next (here p50 moved between ~104 and ~130-150 us
 * for minutes at a time), targets measured one after another measure the host's
 * state as much as the datapath, while targets interleaved every few milliseconds
 * see the same mixture of states.
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

struct target {
	struct sockaddr_storage dst;	/* address and port */
	socklen_t len;			/* of dst */
	double *lat;			/* latencies of successful connections (us) */
	long ok;			/* entries in lat */
	long errors;			/* failed connections */
	double busy;			/* sum of lat (us) */
};

static int parse_target(struct target *t, const char *addr, const char *port, long count)
{
	struct sockaddr_in *in4 = (struct sockaddr_in *)&t->dst;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&t->dst;

	memset(t, 0, sizeof(*t));
	if (inet_pton(AF_INET, addr, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons(atoi(port));
		t->len = sizeof(*in4);
	} else if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons(atoi(port));
		t->len = sizeof(*in6);
	} else {
		fprintf(stderr, "connlat: not an address: %s\n", addr);
		return -1;
	}
	t->lat = calloc(count > 0 ? count : 1, sizeof(*t->lat));
	return t->lat ? 0 : -1;
}

static void measure(struct target *t)
{
	double t0 = now_us(), d;

	if (one(&t->dst, t->len) == 0) {
		d = now_us() - t0;
		t->lat[t->ok++] = d;
		t->busy += d;
	} else {
		t->errors++;
	}
}

static void print_target(struct target *t, double wall)
{
	long ok = t->ok;

	if (ok == 0) {
		printf("{\"count\": 0, \"errors\": %ld}", t->errors);
		return;
	}
	qsort(t->lat, ok, sizeof(*t->lat), cmp_double);
	printf("{\"count\": %ld, \"errors\": %ld, \"p50\": %.1f, \"p90\": %.1f, "
	       "\"p99\": %.1f, \"mean\": %.1f, \"rate\": %.1f}",
	       ok, t->errors, t->lat[ok * 50 / 100], t->lat[ok * 90 / 100],
	       t->lat[ok * 99 / 100], t->busy / ok, ok / (wall / 1e6));
}

int main(int argc, char **argv)
{
	struct target *ts;
	long count, warmup, chunk = 0, i, c, k, n, cycles, missing = 0;
	int interleaved = 0;
	double start;

	if (argc >= 7 && argc % 2 == 1 && strcmp(argv[1], "-i") == 0) {
		chunk = atol(argv[2]);
		count = atol(argv[3]);
		warmup = atol(argv[4]);
		n = (argc - 5) / 2;
		argv += 5;
		interleaved = 1;
	} else if (argc == 4 || argc == 5) {
		count = atol(argv[3]);
		warmup = argc > 4 ? atol(argv[4]) : count / 10;
		n = 1;
		argv += 1;
	} else {
		fprintf(stderr, "usage: connlat ADDRESS PORT COUNT [WARMUP]\n"
			"       connlat -i CHUNK COUNT WARMUP ADDRESS PORT [ADDRESS PORT ...]\n");
		return 2;
	}
	if (count <= 0 || warmup < 0 || (interleaved && chunk <= 0)) {
		fprintf(stderr, "connlat: COUNT and CHUNK must be positive\n");
		return 2;
	}
	ts = calloc(n, sizeof(*ts));
	if (!ts)
		return 1;
	for (k = 0; k < n; k++)
		if (parse_target(&ts[k], argv[2 * k], argv[2 * k + 1], count) < 0)
			return 2;
	for (k = 0; k < n; k++)
		for (i = 0; i < warmup; i++)
			one(&ts[k].dst, ts[k].len);
	if (chunk <= 0)
		chunk = count;
	cycles = (count + chunk - 1) / chunk;
	start = now_us();
	for (c = 0; c < cycles; c++) {
		long this = c == cycles - 1 ? count - c * chunk : chunk;

		for (k = 0; k < n; k++) {
			struct target *t = &ts[(c + k) % n];

			for (i = 0; i < this; i++)
				measure(t);
		}
	}
	if (!interleaved) {
		print_target(&ts[0], now_us() - start);
		printf("\n");
		return ts[0].ok ? 0 : 1;
	}
	printf("[");
	for (k = 0; k < n; k++) {
		if (k)
			fputs(", ", stdout);
		/* interleaved: a target's rate is over its own connections' time */
		print_target(&ts[k], ts[k].busy);
		missing += ts[k].ok == 0;
	}
	printf("]\n");
	return missing ? 1 : 0;
}
