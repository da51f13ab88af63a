/* SPDX-License-Identifier: GPL-2.0 */
/* Service lookup and backend selection. */
#ifndef KPR_LB_H
#define KPR_LB_H

#include "kpr_consts.h"
#include "kpr_maps.h"
#include "kpr_ct.h"

static __always_inline struct kpr_svc_value *kpr_svc4_lookup(const struct kpr_pkt4 *p)
{
	struct kpr_svc4_key k = {};

	k.vip = p->daddr;
	k.port = p->dport;
	k.proto = p->proto;
	k.scope = KPR_SCOPE_EXTERNAL;
	return services4.lookup(&k);
}

/* Random choice among slots [0, count). A slot miss can only be a packet racing a
 * shrink (count read before the controller lowered it): fall back to slot 0, which
 * every non-empty service has. */
static __always_inline struct kpr_backend4 *kpr_lb4_select(const struct kpr_svc_value *svc,
							   __u32 *backend_id)
{
	struct kpr_slot_key sk = {};
	__u32 *id;

	if (svc->count == 0)
		return NULL;
	sk.svc_id = svc->svc_id;
	sk.slot = bpf_get_prandom_u32() % svc->count;
	id = backend_slots.lookup(&sk);
	if (!id) {
		sk.slot = 0;
		id = backend_slots.lookup(&sk);
		if (!id)
			return NULL;
	}
	*backend_id = *id;
	return backends4.lookup(id);
}

/* The backend for this packet: the flow's own if it is still usable, else a new
 * choice recorded in ct4 and revnat4. NULL: the service has no backend. */
static __always_inline struct kpr_backend4 *kpr_lb4_backend(const struct kpr_pkt4 *p,
							    const struct kpr_svc_value *svc)
{
	struct kpr_tuple4 key;
	struct kpr_ct_value *ct;
	struct kpr_ct_value fresh = {};
	struct kpr_backend4 *be;
	__u64 now = bpf_ktime_get_ns();
	__u32 backend_id = 0;

	kpr_tuple4_from_pkt(p, &key);
	ct = ct4.lookup(&key);
	if (ct && kpr_ct_usable(ct, p, now)) {
		be = backends4.lookup(&ct->backend_id);
		if (be) {
			kpr_count(KPR_STAT_CT_HIT);
			kpr_ct_touch(ct, p, be, now);
			return be;
		}
		/* The backend is gone: a datagram flow moves to a live one; a TCP flow
		 * gets a backend that answers with RST, so it fails fast, never hangs. */
		kpr_count(KPR_STAT_CT_STALE);
	}

	be = kpr_lb4_select(svc, &backend_id);
	if (!be)
		return NULL;

	fresh.last_seen = now;
	fresh.backend_id = backend_id;
	fresh.svc_id = svc->svc_id;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)))
		fresh.flags = KPR_CT_F_CLOSING;
	if (ct4.update(&key, &fresh) || kpr_revnat4_write(p, be))
		kpr_count(KPR_STAT_CT_FULL);
	kpr_count(KPR_STAT_NEW_FLOW);
	return be;
}

#endif /* KPR_LB_H */
