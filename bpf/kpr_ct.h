/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: a flow keeps the backend it was first given for as long as
 * that backend exists and the entry has not expired, whatever happens to the
 * service's backend set meanwhile. */
#ifndef KPR_CT_H
#define KPR_CT_H

#include "kpr_consts.h"
#include "kpr_maps.h"

static __always_inline void kpr_tuple4_from_pkt(const struct kpr_pkt4 *p, struct kpr_tuple4 *t)
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
					 const struct kpr_pkt4 *p, __u64 now)
{
	if (now - ct->last_seen > kpr_ct_lifetime(ct, p->proto))
		return 0;
	if (p->proto == IPPROTO_TCP && (ct->flags & KPR_CT_F_CLOSING) &&
	    (p->tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) == KPR_TCP_SYN)
		return 0;
	return 1;
}

/* Write the reply-direction entry so that egress can restore the service address. */
static __always_inline int kpr_revnat4_write(const struct kpr_pkt4 *orig,
					     const struct kpr_backend4 *be)
{
	struct kpr_tuple4 rk = {};
	struct kpr_revnat4 rv = {};

	rk.saddr = be->addr;
	rk.daddr = orig->saddr;
	rk.sport = be->port;
	rk.dport = orig->sport;
	rk.proto = orig->proto;
	rv.vip = orig->daddr;
	rv.port = orig->dport;
	return revnat4.update(&rk, &rv);
}

/* Mark a flow closing on FIN/RST and refresh last_seen at most every
 * KPR_CT_REFRESH_NS; re-assert the reverse entry at the same cadence so that an LRU
 * eviction of it never outlives an active flow by more than a second. */
static __always_inline void kpr_ct_touch(struct kpr_ct_value *ct, const struct kpr_pkt4 *p,
					 const struct kpr_backend4 *be, __u64 now)
{
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)))
		ct->flags |= KPR_CT_F_CLOSING;
	if (now - ct->last_seen > KPR_CT_REFRESH_NS) {
		ct->last_seen = now;
		kpr_revnat4_write(p, be);
	}
}

#endif /* KPR_CT_H */
