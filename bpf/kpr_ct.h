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
	if (ct->flags & KPR_CT_F_CLOSING)
		return KPR_CT_LIFETIME_CLOSING;
	return proto == IPPROTO_TCP ? KPR_CT_LIFETIME_TCP : KPR_CT_LIFETIME_NONTCP;
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

/* The reply-direction entries: revnat always; snat and unsnat when masqueraded.
 * `orig` is the packet as the client sent it. Returns 0 or a map error. */
static __always_inline int kpr_nat_entries(const struct kpr_pkt *orig,
					    const struct kpr_fwd *f)
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
	ret = revnat.update(&k, &rv);
	if (ret || kpr_addr_is_zero(&f->snat_addr))
		return ret;

	k.daddr = f->snat_addr; /* backend -> masquerade address */
	k.dport = f->snat_port;
	na.addr = orig->saddr;
	na.port = orig->sport;
	ret = unsnat.update(&k, &na);
	if (ret)
		return ret;

	k.saddr = orig->saddr; /* client -> backend, as it leaves after DNAT */
	k.daddr = f->be_addr;
	k.sport = orig->sport;
	k.dport = f->be_port;
	na.addr = f->snat_addr;
	na.port = f->snat_port;
	return snat.update(&k, &na);
}

/* Pick the masquerade port for a new flow: the client's own if the reply tuple
 * (backend -> snat_addr:port) is free or already this client's, else random ones.
 * The unsnat insert (BPF_NOEXIST) claims the port against a concurrent flow on
 * another CPU. Returns 0 with f->snat_* set, or -1 when every try was taken. */
static __always_inline int kpr_snat_port(const struct kpr_pkt *p, struct kpr_fwd *f,
					 const union kpr_addr *snat_addr)
{
	struct kpr_tuple k = {};
	struct kpr_nat_addr client = {};
	struct kpr_nat_addr *cur;
	__u16 port = bpf_ntohs(p->sport);
	int i;

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
		if (!cur && unsnat.insert(&k, &client) == 0)
			goto found;
		port = KPR_SNAT_PORT_MIN +
		       bpf_get_prandom_u32() % (65536 - KPR_SNAT_PORT_MIN);
	}
	return -1;
found:
	f->snat_addr = *snat_addr;
	f->snat_port = k.dport;
	return 0;
}

/* Mark a flow closing on FIN/RST and refresh last_seen at most every
 * KPR_CT_REFRESH; re-assert the reply-side entries at the same cadence so that
 * an LRU eviction of one never outlives an active flow by more than a second. */
static __always_inline void kpr_ct_touch(struct kpr_ct_value *ct, const struct kpr_pkt *p,
					 const struct kpr_fwd *f, __u64 now)
{
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)))
		ct->flags |= KPR_CT_F_CLOSING;
	if (now - ct->last_seen > KPR_CT_REFRESH) {
		ct->last_seen = now;
		kpr_nat_entries(p, f);
	}
}

#endif /* KPR_CT_H */
