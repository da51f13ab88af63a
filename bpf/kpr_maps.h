/* SPDX-License-Identifier: GPL-2.0 */
/* Every map, pinned under KPR_PIN_DIR so that a restarted controller reads its state
 * back and the new programs reuse the maps the running ones use (no traffic lost on a
 * restart or upgrade). The "_v1" suffix is the layout version: a change of any struct
 * in kpr_structs.h bumps it, so an old pin is never reused with a new layout.
 */
#ifndef KPR_MAPS_H
#define KPR_MAPS_H

#include "kpr_consts.h"
#include "kpr_structs.h"

/* frontend -> service */
BPF_TABLE_PINNED("hash", struct kpr_svc4_key, struct kpr_svc_value, services4,
		 KPR_MAX_SERVICES, KPR_PIN_DIR "/services4_v1");

/* (service, slot) -> backend id */
BPF_TABLE_PINNED("hash", struct kpr_slot_key, __u32, backend_slots, KPR_MAX_SLOTS,
		 KPR_PIN_DIR "/backend_slots_v1");

/* backend id -> backend address */
BPF_TABLE_PINNED("hash", __u32, struct kpr_backend4, backends4, KPR_MAX_BACKENDS,
		 KPR_PIN_DIR "/backends4_v1");

/* original tuple -> chosen backend. LRU: a full table evicts the coldest flow
 * instead of failing the insert. */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_ct_value, ct4, KPR_MAX_CT,
		 KPR_PIN_DIR "/ct4_v1");

/* reply tuple -> service address to restore as the reply's source */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_revnat4, revnat4, KPR_MAX_CT,
		 KPR_PIN_DIR "/revnat4_v1");

/* first fragment's ports, for the later fragments of the same datagram */
BPF_TABLE_PINNED("lru_hash", struct kpr_frag4_key, struct kpr_frag_ports, frag4,
		 KPR_MAX_FRAG, KPR_PIN_DIR "/frag4_v1");

/* svc_id -> "namespace/name:port", for observability only */
BPF_TABLE_PINNED("hash", __u32, struct kpr_svc_name, svc_names, KPR_MAX_SERVICES,
		 KPR_PIN_DIR "/svc_names_v1");

/* per-CPU counters, indexed by enum kpr_stat */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats, KPR_STAT_MAX,
		 KPR_PIN_DIR "/stats_v1");

static __always_inline void kpr_count(__u32 idx)
{
	__u64 *c = stats.lookup(&idx);

	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

#endif /* KPR_MAPS_H */
