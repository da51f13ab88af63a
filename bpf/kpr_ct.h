/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: a flow keeps the backend (and masquerade port) it was first
 * given for as long as that backend exists and the entry has not expired, whatever
 * happens to the service's backend set meanwhile.
 *
 * One flow owns up to four entries, each looked up where its packets are seen:
 *   conntrack  client -> frontend  (ingress: which backend)
 *   snat       client -> backend   (egress, masqueraded flows: which source)
 *   unsnat     backend -> node     (ingress, masqueraded replies: which client)
 *   revnat     backend -> client   (egress: which frontend the reply comes from)
 * DNAT at ingress and SNAT at egress keep the stack's routing between them seeing
 * ordinary addresses: a reply rewritten at ingress to come from a node address
 * would be dropped as a martian (fib_validate_source, every kernel).
 *
 * The reply-side entries have no clock of their own: they live as long as the LRU
 * keeps them, long after their flow ended. A later flow that is not a Service's
 * can have the same tuple on the backend's side: a client that once reached a pod
 * through a Service from port X, then connects to the pod's own address from port
 * X (the client's stack picks ports per destination, so it does this freely).
 * Its replies would be rewritten to come from the Service (and, if the old flow
 * was masqueraded, its packets masqueraded), and the client resets them. So the
 * egress path checks an entry against its flow whenever the packet could belong to
 * another one (a TCP packet opening a connection, any datagram): kpr_ct_owner.
 */
#ifndef KPR_CT_H
#define KPR_CT_H

#include "kpr_consts.h"
#include "kpr_addr.h"
#include "kpr_maps.h"

static __always_inline void kpr_tuple_from_pkt(const struct kpr_pkt *p, struct kpr_tuple *t)
{
	t->saddr = p->saddr;
	t->daddr = p->daddr;
	t->sport = p->sport;
	t->dport = p->dport;
	t->proto = p->proto;
	t->pad[0] = 0;
	t->pad[1] = 0;
	t->pad[2] = 0;
}

static __always_inline __u64 kpr_ct_lifetime(const struct kpr_ct_value *ct, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return KPR_CT_LIFETIME_NONTCP;
	if (ct->flags & KPR_CT_F_RST)
		return KPR_CT_LIFETIME_CLOSING;
	if ((ct->flags & (KPR_CT_F_CLOSING | KPR_CT_F_FIN_REPLY)) ==
	    (KPR_CT_F_CLOSING | KPR_CT_F_FIN_REPLY))
		return KPR_CT_LIFETIME_CLOSED;
	return ct->flags & (KPR_CT_F_CLOSING | KPR_CT_F_FIN_REPLY) ? KPR_CT_LIFETIME_FIN :
								     KPR_CT_LIFETIME_TCP;
}

/* Is this live entry still the flow's entry? A TCP SYN after FIN/RST opens a new
 * connection that reuses the tuple: it gets a fresh choice. */
static __always_inline int kpr_ct_usable(const struct kpr_ct_value *ct,
					 const struct kpr_pkt *p, __u64 now)
{
	if (now - ct->last_seen > kpr_ct_lifetime(ct, p->proto))
		return 0;
	if (p->proto == IPPROTO_TCP && (ct->flags & KPR_CT_F_CLOSING) &&
	    (p->tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) == KPR_TCP_SYN)
		return 0;
	return 1;
}

/* The half_open key standing for entry `t` of kind `kind` (KPR_HO_*). */
static __always_inline void kpr_ho_key(const struct kpr_tuple *t, __u8 kind,
				       struct kpr_ho_key *k)
{
	k->saddr = t->saddr;
	k->daddr = t->daddr;
	k->sport = t->sport;
	k->dport = t->dport;
	k->proto = t->proto;
	k->kind = kind;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

static __always_inline struct kpr_ho_scratch *kpr_ho_scratch(void)
{
	__u32 zero = 0;

	return ho_scratch.lookup(&zero);
}

static __always_inline union kpr_ho_value *kpr_ho_get(const struct kpr_tuple *t, __u8 kind)
{
	struct kpr_ho_scratch *s = kpr_ho_scratch();

	if (!s)
		return NULL;
	kpr_ho_key(t, kind, &s->k);
	return half_open.lookup(&s->k);
}

static __always_inline int kpr_ho_put_nat(const struct kpr_tuple *t, __u8 kind,
					  const struct kpr_nat_addr *na)
{
	struct kpr_ho_scratch *s = kpr_ho_scratch();

	if (!s)
		return -1;
	kpr_ho_key(t, kind, &s->k);
	__builtin_memset(&s->v, 0, sizeof(s->v));
	s->v.nat = *na;
	return half_open.update(&s->k, &s->v);
}

static __always_inline void kpr_ho_del(const struct kpr_tuple *t, __u8 kind)
{
	struct kpr_ho_scratch *s = kpr_ho_scratch();

	if (!s)
		return;
	kpr_ho_key(t, kind, &s->k);
	half_open.delete(&s->k);
}

/* The reply-direction entries: revnat always; snat and unsnat when masqueraded.
 * `orig` is the packet as the client sent it; `ho`: a half-open flow's, kept in
 * half_open. Returns 0 or a map error. */
static __always_inline int kpr_nat_entries(const struct kpr_pkt *orig,
					    const struct kpr_fwd *f, int ho)
{
	struct kpr_tuple k = {};
	struct kpr_nat_addr rv = {};
	struct kpr_nat_addr na = {};
	int ret;

	k.saddr = f->be_addr;
	k.daddr = orig->saddr;
	k.sport = f->be_port;
	k.dport = orig->sport;
	k.proto = orig->proto;
	rv.addr = orig->daddr;
	rv.port = orig->dport;
	ret = ho ? kpr_ho_put_nat(&k, KPR_HO_REVNAT, &rv) : revnat.update(&k, &rv);
	if (ret || kpr_addr_is_zero(&f->snat_addr))
		return ret;

	k.daddr = f->snat_addr; /* backend -> masquerade address */
	k.dport = f->snat_port;
	na.addr = orig->saddr;
	na.port = orig->sport;
	ret = ho ? kpr_ho_put_nat(&k, KPR_HO_UNSNAT, &na) : unsnat.update(&k, &na);
	if (ret)
		return ret;

	k.saddr = orig->saddr; /* client -> backend, as it leaves after DNAT */
	k.daddr = f->be_addr;
	k.sport = orig->sport;
	k.dport = f->be_port;
	na.addr = f->snat_addr;
	na.port = f->snat_port;
	return ho ? kpr_ho_put_nat(&k, KPR_HO_SNAT, &na) : snat.update(&k, &na);
}

/* Remove a half-open flow's entries (its handshake completed; `orig` is the
 * client's packet, `f` its translation). */
/* Point tuple `k` (its proto and padding set by the caller) at one flow direction. */
static __always_inline void kpr_tuple_set(struct kpr_tuple *k, const union kpr_addr *saddr,
					  const union kpr_addr *daddr, __be16 sport,
					  __be16 dport)
{
	k->saddr = *saddr;
	k->daddr = *daddr;
	k->sport = sport;
	k->dport = dport;
}

static __always_inline void kpr_ho_forget(const struct kpr_pkt *orig, const struct kpr_fwd *f)
{
	struct kpr_tuple k = {};

	k.proto = orig->proto;
	kpr_tuple_set(&k, &orig->saddr, &orig->daddr, orig->sport, orig->dport);
	kpr_ho_del(&k, KPR_HO_CT);
	kpr_tuple_set(&k, &f->be_addr, &orig->saddr, f->be_port, orig->sport);
	kpr_ho_del(&k, KPR_HO_REVNAT);
	if (kpr_addr_is_zero(&f->snat_addr))
		return;
	kpr_tuple_set(&k, &f->be_addr, &f->snat_addr, f->be_port, f->snat_port);
	kpr_ho_del(&k, KPR_HO_UNSNAT);
	kpr_tuple_set(&k, &orig->saddr, &f->be_addr, orig->sport, f->be_port);
	kpr_ho_del(&k, KPR_HO_SNAT);
}

/* Pick the masquerade port for a new flow: the client's own if the reply tuple
 * (backend -> snat_addr:port) is free or already this client's, else random ones.
 * The insert (BPF_NOEXIST) claims the port against a concurrent flow on another
 * CPU: in unsnat, or in half_open for a half-open flow (`ho`); a port is free only
 * when neither holds it. Returns 0 with f->snat_* set, or -1 when every try was
 * taken. */
static __always_inline int kpr_snat_port(const struct kpr_pkt *p, struct kpr_fwd *f,
					 const union kpr_addr *snat_addr, int ho)
{
	struct kpr_tuple k = {};
	struct kpr_nat_addr client = {};
	struct kpr_nat_addr *cur;
	struct kpr_ho_scratch *s = kpr_ho_scratch();
	union kpr_ho_value *hc;
	__u16 port = bpf_ntohs(p->sport);
	int i;

	if (!s)
		return -1;

	k.saddr = f->be_addr;
	k.daddr = *snat_addr;
	k.sport = f->be_port;
	k.proto = p->proto;
	client.addr = p->saddr;
	client.port = p->sport;
	for (i = 0; i < KPR_SNAT_TRIES; i++) {
		k.dport = bpf_htons(port);
		cur = unsnat.lookup(&k);
		if (cur && kpr_addr_eq(&cur->addr, &client.addr) && cur->port == client.port)
			goto found;
		kpr_ho_key(&k, KPR_HO_UNSNAT, &s->k);
		hc = half_open.lookup(&s->k);
		if (hc && kpr_addr_eq(&hc->nat.addr, &client.addr) && hc->nat.port == client.port)
			goto found;
		if (!cur && !hc) {
			if (!ho && unsnat.insert(&k, &client) == 0)
				goto found;
			__builtin_memset(&s->v, 0, sizeof(s->v));
			s->v.nat = client;
			if (ho && half_open.insert(&s->k, &s->v) == 0)
				goto found;
		}
		port = KPR_SNAT_PORT_MIN +
		       bpf_get_prandom_u32() % (65536 - KPR_SNAT_PORT_MIN);
	}
	return -1;
found:
	f->snat_addr = *snat_addr;
	f->snat_port = k.dport;
	return 0;
}

/* Does the flow that made a reply-side entry still own it? `fe` is the entry's
 * frontend (the revnat value); the flow's conntrack entry (client -> frontend)
 * must be live, still bound to this backend, and, for a TCP packet opening a
 * connection, not closing: a live, open flow keeps its entries (the backend sees
 * one tuple for both, and only one of them can have it; netfilter's NAT gives the
 * second another source port, which this datapath does not do for flows that are
 * not a Service's). A live flow's entry is
 * refreshed here too, at most every KPR_CT_REFRESH: a datagram flow whose backend
 * does the talking (a stream the client asked for once) stays live on its
 * replies, as netfilter's does on either direction. */
static __always_inline int kpr_ct_owner(const union kpr_addr *client, __be16 cport,
					const struct kpr_nat_addr *fe,
					const union kpr_addr *be_addr, __be16 be_port,
					const struct kpr_pkt *p, __u64 now)
{
	struct kpr_tuple k = {};
	struct kpr_ct_value *ct;
	struct kpr_backend *be;

	k.saddr = *client;
	k.daddr = fe->addr;
	k.sport = cport;
	k.dport = fe->port;
	k.proto = p->proto;
	ct = conntrack.lookup(&k);
	if (!ct || now - ct->last_seen > kpr_ct_lifetime(ct, p->proto))
		return 0;
	if (p->proto == IPPROTO_TCP && (ct->flags & KPR_CT_F_CLOSING))
		return 0; /* callers ask only for packets opening a connection */
	be = kpr_flow_backend(ct->backend_id, ct->backend_gen, p->proto);
	if (!be || be->port != be_port || !kpr_addr_eq(&be->addr, be_addr))
		return 0;
	if (now - ct->last_seen > KPR_CT_REFRESH)
		ct->last_seen = now;
	return 1;
}

/* The backend closed its side: a FIN on its way to the client (`fe`: the flow's
 * frontend, from revnat). Ingress sets CLOSING on the client's FIN; the two
 * read-modify-writes of the __u16 flags may race on two CPUs (BPF has no 16-bit
 * atomics), and the one lost leaves the flow its longer, close-wait lifetime. */
static __always_inline void kpr_ct_fin_reply(const union kpr_addr *client, __be16 cport,
					     const struct kpr_nat_addr *fe)
{
	struct kpr_tuple k = {};
	struct kpr_ct_value *ct;

	k.saddr = *client;
	k.daddr = fe->addr;
	k.sport = cport;
	k.dport = fe->port;
	k.proto = IPPROTO_TCP;
	ct = conntrack.lookup(&k);
	if (ct && !(ct->flags & KPR_CT_F_FIN_REPLY))
		ct->flags |= KPR_CT_F_FIN_REPLY;
}

/* Remove an ended flow's reply-side entries: revnat (backend -> client), and when
 * it was masqueraded, snat (client -> backend) and the unsnat entry it names. */
static __always_inline void kpr_ct_reclaim(const union kpr_addr *be_addr, __be16 be_port,
					   const union kpr_addr *client, __be16 cport,
					   __u8 proto)
{
	struct kpr_tuple k = {};
	struct kpr_nat_addr *na;

	k.saddr = *be_addr;
	k.daddr = *client;
	k.sport = be_port;
	k.dport = cport;
	k.proto = proto;
	revnat.delete(&k);
	k.saddr = *client;
	k.daddr = *be_addr;
	k.sport = cport;
	k.dport = be_port;
	na = snat.lookup(&k);
	if (na) {
		struct kpr_tuple u = {};

		u.saddr = *be_addr;
		u.daddr = na->addr;
		u.sport = be_port;
		u.dport = na->port;
		u.proto = proto;
		unsnat.delete(&u);
		snat.delete(&k);
	}
	kpr_count(KPR_STAT_CT_RECLAIM);
}

/* Could this packet belong to a flow other than the one an entry was made for?
 * Only one that opens a TCP connection (SYN, or SYN-ACK on the way back), or any
 * datagram: an established TCP flow's packet is the entry's own, and skips the
 * conntrack lookup the check costs. */
static __always_inline int kpr_may_be_new(const struct kpr_pkt *p)
{
	return p->proto != IPPROTO_TCP || (p->tcp_flags & KPR_TCP_SYN);
}

/* Mark a flow closing on FIN/RST and refresh last_seen at most every
 * KPR_CT_REFRESH; re-assert the reply-side entries at the same cadence so that
 * an LRU eviction of one never outlives an active flow by more than a second. */
static __always_inline void kpr_ct_touch(struct kpr_ct_value *ct, const struct kpr_pkt *p,
					 const struct kpr_fwd *f, __u64 now)
{
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)))
		ct->flags |= KPR_CT_F_CLOSING |
			     (p->tcp_flags & KPR_TCP_RST ? KPR_CT_F_RST : 0);
	if (now - ct->last_seen > KPR_CT_REFRESH) {
		ct->last_seen = now;
		kpr_nat_entries(p, f, 0);
	}
}

#endif /* KPR_CT_H */
