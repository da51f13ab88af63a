/* SPDX-License-Identifier: GPL-2.0 */
/* Socket-level load balancing for the node's own processes (host network pods,
 * kubelet, `curl` on the node), as cgroup sock_addr programs, one per family:
 *
 *   connect4/6      a TCP or connected-UDP socket to a frontend connects to a backend
 *   sendmsg4/6      an unconnected UDP datagram to a frontend is sent to a backend
 *   recvmsg4/6      a datagram from that backend reads as coming from the frontend
 *   getpeername4/6  the socket's peer reads as the frontend
 *
 * The translation happens once per connect, not per packet, and the tc programs
 * never see these flows as service traffic (they carry the backend's address).
 * No masquerade is needed: the kernel picks a source address for the backend.
 *
 * An IPv6 socket connecting to an IPv4-mapped address (::ffff:10.96.0.10, what a
 * dual-stack socket does for an IPv4 destination) runs the *6 hook only (kernel
 * 6.18, tcp_v6_pre_connect); the mapped address is exactly the maps' IPv4 key
 * form, so it is balanced to the IPv4 service as well.
 *
 * The programs are attached to a cgroup v2 that usually holds every process of
 * the machine, so they act only in the node's network namespace (node_config's
 * cookie; bpf_get_netns_cookie, kernel 5.7+) and return 1 (carry on untouched)
 * for everything else.
 *
 * A frontend without a backend fails connect()/sendmsg() with ECONNREFUSED
 * (bpf_set_retval, kernel 5.18+), as kube-proxy's REJECT does.
 */
#ifndef KPR_SOCK_H
#define KPR_SOCK_H

#include <uapi/linux/errno.h>

#include "kpr_consts.h"
#include "kpr_addr.h"
#include "kpr_maps.h"

#define KPR_SOCK_PASS 1
#define KPR_SOCK_DENY 0

static __always_inline int kpr_sock_ours(struct bpf_sock_addr *ctx)
{
	struct kpr_config *cfg = kpr_config();

	return cfg && cfg->netns_cookie && bpf_get_netns_cookie(ctx) == cfg->netns_cookie;
}

/* The socket's destination. Each user_ip6 word is read separately: the verifier
 * allows only 4-byte (or narrower) loads of it (kernel 6.18). */
static __always_inline void kpr_sock_get(struct bpf_sock_addr *ctx, __u8 family,
					 union kpr_addr *a)
{
	if (family == 4) {
		kpr_addr_from_v4(a, ctx->user_ip4);
		return;
	}
	a->w[0] = ctx->user_ip6[0];
	a->w[1] = ctx->user_ip6[1];
	a->w[2] = ctx->user_ip6[2];
	a->w[3] = ctx->user_ip6[3];
}

static __always_inline void kpr_sock_set(struct bpf_sock_addr *ctx, __u8 family,
					 const union kpr_addr *a, __be16 port)
{
	if (family == 4) {
		ctx->user_ip4 = a->w[3];
	} else {
		ctx->user_ip6[0] = a->w[0];
		ctx->user_ip6[1] = a->w[1];
		ctx->user_ip6[2] = a->w[2];
		ctx->user_ip6[3] = a->w[3];
	}
	ctx->user_port = port;
}

/* The frontend (or its in-cluster twin for an external Local frontend: the node
 * is inside the cluster) for this address, or NULL. */
static __always_inline struct kpr_svc_value *kpr_sock_frontend(const union kpr_addr *addr,
							       __be16 port, __u8 proto)
{
	struct kpr_svc_key k = {};
	struct kpr_svc_value *svc;
	__u32 *addr_flags;

	k.vip = *addr;
	k.port = port;
	k.proto = proto;
	k.scope = KPR_SCOPE_EXTERNAL;
	svc = services.lookup(&k);
	if (!svc) {
		addr_flags = node_addrs.lookup(&k.vip);
		if (!addr_flags || !(*addr_flags & KPR_ADDR_F_NODEPORT))
			return NULL;
		/* the family as the address shows it: a mapped one is IPv4 */
		kpr_addr_unspec(&k.vip, kpr_addr_is_v4mapped(&k.vip) ? 4 : 6);
		svc = services.lookup(&k);
		if (!svc)
			return NULL;
	}
	if ((svc->flags & (KPR_SVC_F_LOCAL | KPR_SVC_F_INTERNAL)) ==
	    (KPR_SVC_F_LOCAL | KPR_SVC_F_INTERNAL)) {
		struct kpr_svc_value *twin;

		k.scope = KPR_SCOPE_INTERNAL;
		twin = services.lookup(&k);
		if (twin)
			return twin;
	}
	return svc;
}

/* Point the socket at a backend. Returns 1 to carry on, 0 to fail the call. */
static __always_inline int kpr_sock_xlate(struct bpf_sock_addr *ctx, __u8 family)
{
	struct kpr_svc_value *svc;
	struct kpr_backend *be = NULL;
	struct kpr_sock_key sk = {};
	struct kpr_nat_addr rv = {};
	struct kpr_pkt p = {};
	__u32 backend_id = 0;
	__u8 proto;

	if (ctx->protocol == IPPROTO_TCP)
		proto = IPPROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = IPPROTO_UDP;
	else
		return KPR_SOCK_PASS;
	if (!kpr_sock_ours(ctx))
		return KPR_SOCK_PASS;
	kpr_sock_get(ctx, family, &rv.addr);
	rv.port = (__be16)ctx->user_port;
	svc = kpr_sock_frontend(&rv.addr, rv.port, proto);
	if (!svc)
		return KPR_SOCK_PASS;

	/* The flow hash and the affinity key need the client's address, which a socket
	 * does not have before connect: hash the destination and the socket cookie. */
	p.daddr = rv.addr;
	p.dport = rv.port;
	p.proto = proto;
	sk.cookie = bpf_get_socket_cookie(ctx);
	p.saddr.w[0] = (__u32)sk.cookie;
	p.saddr.w[1] = (__u32)(sk.cookie >> 32);
	be = kpr_lb_select(&p, svc, &backend_id);
	if (!be) {
		/* Local policy with endpoints elsewhere: there is nothing to reach. */
		bpf_set_retval(svc->flags & KPR_SVC_F_DROP_EMPTY ? -EHOSTUNREACH : -ECONNREFUSED);
		return KPR_SOCK_DENY;
	}
	sk.addr = be->addr;
	sk.port = be->port;
	if (sock_revnat.update(&sk, &rv))
		kpr_count(KPR_STAT_CT_FULL);
	kpr_sock_set(ctx, family, &sk.addr, sk.port);
	kpr_count(KPR_STAT_SOCK_LB);
	return KPR_SOCK_PASS;
}

/* A reply source or peer address: the frontend the socket was pointed from. */
static __always_inline int kpr_sock_revnat(struct bpf_sock_addr *ctx, __u8 family)
{
	struct kpr_sock_key sk = {};
	struct kpr_nat_addr *rv;
	struct kpr_nat_addr v;

	if (!kpr_sock_ours(ctx))
		return KPR_SOCK_PASS;
	sk.cookie = bpf_get_socket_cookie(ctx);
	kpr_sock_get(ctx, family, &sk.addr);
	sk.port = (__be16)ctx->user_port;
	rv = sock_revnat.lookup(&sk);
	if (rv) {
		v = *rv;
		kpr_sock_set(ctx, family, &v.addr, v.port);
	}
	return KPR_SOCK_PASS;
}

int kpr_sock_connect4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx, 4);
}

int kpr_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx, 4);
}

int kpr_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx, 4);
}

int kpr_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx, 4);
}

int kpr_sock_connect6(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx, 6);
}

int kpr_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx, 6);
}

int kpr_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx, 6);
}

int kpr_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx, 6);
}

#endif /* KPR_SOCK_H */
