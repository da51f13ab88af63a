/* SPDX-License-Identifier: GPL-2.0 */
/* Socket-level load balancing for the node's own processes (host network pods,
 * kubelet, `curl` on the node), as cgroup sock_addr programs:
 *
 *   connect4      a TCP or connected-UDP socket to a frontend connects to a backend
 *   sendmsg4      an unconnected UDP datagram to a frontend is sent to a backend
 *   recvmsg4      a datagram from that backend reads as coming from the frontend
 *   getpeername4  the socket's peer reads as the frontend
 *
 * The translation happens once per connect, not per packet, and the tc programs
 * never see these flows as service traffic (they carry the backend's address).
 * No masquerade is needed: the kernel picks a source address for the backend.
 *
 * The programs are attached to a cgroup v2 that usually holds every process of
 * the machine, so they act only in the node's network namespace (config4's
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
#include "kpr_maps.h"

#define KPR_SOCK_PASS 1
#define KPR_SOCK_DENY 0

static __always_inline int kpr_sock_ours(struct bpf_sock_addr *ctx)
{
	struct kpr_config4 *cfg = kpr_config();

	return cfg && cfg->netns_cookie && bpf_get_netns_cookie(ctx) == cfg->netns_cookie;
}

/* The frontend (or its in-cluster twin for an external Local frontend: the node
 * is inside the cluster) for this address, or NULL. */
static __always_inline struct kpr_svc_value *kpr_sock_frontend(__be32 addr, __be16 port,
							       __u8 proto)
{
	struct kpr_svc4_key k = {};
	struct kpr_svc_value *svc;
	__u32 *addr_flags;

	k.vip = addr;
	k.port = port;
	k.proto = proto;
	k.scope = KPR_SCOPE_EXTERNAL;
	svc = services4.lookup(&k);
	if (!svc) {
		addr_flags = node_addrs4.lookup(&addr);
		if (!addr_flags || !(*addr_flags & KPR_ADDR_F_NODEPORT))
			return NULL;
		k.vip = 0;
		svc = services4.lookup(&k);
		if (!svc)
			return NULL;
	}
	if ((svc->flags & (KPR_SVC_F_LOCAL | KPR_SVC_F_INTERNAL)) ==
	    (KPR_SVC_F_LOCAL | KPR_SVC_F_INTERNAL)) {
		struct kpr_svc_value *twin;

		k.scope = KPR_SCOPE_INTERNAL;
		twin = services4.lookup(&k);
		if (twin)
			return twin;
	}
	return svc;
}

/* Point the socket at a backend. Returns 1 to carry on, 0 to fail the call. */
static __always_inline int kpr_sock_xlate(struct bpf_sock_addr *ctx)
{
	struct kpr_svc_value *svc;
	struct kpr_backend4 *be = NULL;
	struct kpr_sock_key sk = {};
	struct kpr_revnat4 rv = {};
	struct kpr_pkt4 p = {};
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
	svc = kpr_sock_frontend(ctx->user_ip4, (__be16)ctx->user_port, proto);
	if (!svc)
		return KPR_SOCK_PASS;

	/* The flow hash and the affinity key need the client's address, which a socket
	 * does not have before connect: hash the destination and the socket cookie. */
	p.daddr = ctx->user_ip4;
	p.dport = (__be16)ctx->user_port;
	p.proto = proto;
	sk.cookie = bpf_get_socket_cookie(ctx);
	p.saddr = (__be32)sk.cookie;
	p.sport = (__be16)(sk.cookie >> 32);
	be = kpr_lb4_select(&p, svc, &backend_id);
	if (!be) {
		/* Local policy with endpoints elsewhere: there is nothing to reach. */
		bpf_set_retval(svc->flags & KPR_SVC_F_DROP_EMPTY ? -EHOSTUNREACH : -ECONNREFUSED);
		return KPR_SOCK_DENY;
	}
	sk.addr = be->addr;
	sk.port = be->port;
	rv.vip = ctx->user_ip4;
	rv.port = (__be16)ctx->user_port;
	if (sock_revnat4.update(&sk, &rv))
		kpr_count(KPR_STAT_CT_FULL);
	ctx->user_ip4 = sk.addr;
	ctx->user_port = sk.port;
	kpr_count(KPR_STAT_SOCK_LB);
	return KPR_SOCK_PASS;
}

/* A reply source or peer address: the frontend the socket was pointed from. */
static __always_inline int kpr_sock_revnat(struct bpf_sock_addr *ctx)
{
	struct kpr_sock_key sk = {};
	struct kpr_revnat4 *rv;

	if (!kpr_sock_ours(ctx))
		return KPR_SOCK_PASS;
	sk.cookie = bpf_get_socket_cookie(ctx);
	sk.addr = ctx->user_ip4;
	sk.port = (__be16)ctx->user_port;
	rv = sock_revnat4.lookup(&sk);
	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
	return KPR_SOCK_PASS;
}

int kpr_sock_connect4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx);
}

int kpr_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_xlate(ctx);
}

int kpr_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx);
}

int kpr_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return kpr_sock_revnat(ctx);
}

#endif /* KPR_SOCK_H */
