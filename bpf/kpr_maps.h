/* SPDX-License-Identifier: GPL-2.0 */
/* Every map, pinned under KPR_PIN_DIR so that a restarted controller reads its state
 * back and the new programs reuse the maps the running ones use (no traffic lost on a
 * restart or upgrade). The "_v2" suffix is the layout version: a change of any struct
 * in kpr_structs.h bumps it, so an old pin is never reused with a new layout.
 */
#ifndef KPR_MAPS_H
#define KPR_MAPS_H

#include "kpr_consts.h"
#include "kpr_structs.h"

#define KPR_PIN(name) KPR_PIN_DIR "/" #name "_v2"

/* frontend -> service */
BPF_TABLE_PINNED("hash", struct kpr_svc4_key, struct kpr_svc_value, services4,
		 KPR_MAX_SERVICES, KPR_PIN(services4));

/* (service, slot) -> backend id */
BPF_TABLE_PINNED("hash", struct kpr_slot_key, __u32, backend_slots, KPR_MAX_SLOTS,
		 KPR_PIN(backend_slots));

/* backend id -> backend address */
BPF_TABLE_PINNED("hash", __u32, struct kpr_backend4, backends4, KPR_MAX_BACKENDS,
		 KPR_PIN(backends4));

/* (service, backend id) -> 1: membership, for affinity */
BPF_TABLE_PINNED("hash", struct kpr_member_key, __u8, members4, KPR_MAX_SLOTS,
		 KPR_PIN(members4));

/* service id -> Maglev table. Not preallocated: only Maglev services cost memory
 * (4 x KPR_MAGLEV_SIZE bytes each). */
BPF_TABLE_PINNED("hash", __u32, struct kpr_maglev, maglev4, KPR_MAX_MAGLEV,
		 KPR_PIN(maglev4), BPF_F_NO_PREALLOC);

/* original tuple -> chosen backend. LRU: a full table evicts the coldest flow
 * instead of failing the insert. */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_ct_value, ct4, KPR_MAX_CT,
		 KPR_PIN(ct4));

/* reply tuple (backend -> client) -> frontend to restore as the reply's source */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_revnat4, revnat4, KPR_MAX_CT,
		 KPR_PIN(revnat4));

/* masqueraded flow after DNAT (client -> backend) -> source to give it */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_nat_addr4, snat4, KPR_MAX_CT,
		 KPR_PIN(snat4));

/* reply to a masquerade address (backend -> node) -> the client it belongs to */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple4, struct kpr_nat_addr4, unsnat4, KPR_MAX_CT,
		 KPR_PIN(unsnat4));

/* (service, client address) -> backend, for sessionAffinity ClientIP */
BPF_TABLE_PINNED("lru_hash", struct kpr_affinity4_key, struct kpr_affinity_value, affinity4,
		 KPR_MAX_AFFINITY, KPR_PIN(affinity4));

/* (service, source prefix) -> 1, for loadBalancerSourceRanges */
BPF_TABLE_PINNED("lpm_trie", struct kpr_src_range4_key, __u8, src_ranges4,
		 KPR_MAX_SRC_RANGES, KPR_PIN(src_ranges4), BPF_F_NO_PREALLOC);

/* detect-local: the cluster (pod) CIDRs */
BPF_TABLE_PINNED("lpm_trie", struct kpr_lpm4_key, __u8, local_cidrs4, KPR_MAX_LOCAL_CIDRS,
		 KPR_PIN(local_cidrs4), BPF_F_NO_PREALLOC);

/* every ClusterIP -> 1: their undefined ports are rejected. Apart from services4 so
 * that markers never take a frontend's room. */
BPF_TABLE_PINNED("hash", __be32, __u8, cluster_ips4, KPR_MAX_SERVICES, KPR_PIN(cluster_ips4));

/* the node's own addresses -> KPR_ADDR_F_* */
BPF_TABLE_PINNED("hash", __be32, __u32, node_addrs4, KPR_MAX_NODE_ADDRS,
		 KPR_PIN(node_addrs4));

/* node-wide settings (one entry) */
BPF_TABLE_PINNED("array", __u32, struct kpr_config4, config4, 1, KPR_PIN(config4));

/* (socket, backend) -> frontend, for recvmsg4/getpeername4 of host sockets */
BPF_TABLE_PINNED("lru_hash", struct kpr_sock_key, struct kpr_revnat4, sock_revnat4, KPR_MAX_CT,
		 KPR_PIN(sock_revnat4));

/* first fragment's ports, for the later fragments of the same datagram */
BPF_TABLE_PINNED("lru_hash", struct kpr_frag4_key, struct kpr_frag_ports, frag4,
		 KPR_MAX_FRAG, KPR_PIN(frag4));

/* svc_id -> "namespace/name:port", for observability only */
BPF_TABLE_PINNED("hash", __u32, struct kpr_svc_name, svc_names, KPR_MAX_SERVICES,
		 KPR_PIN(svc_names));

/* per-CPU counters, indexed by enum kpr_stat */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats, KPR_STAT_MAX, KPR_PIN(stats));

static __always_inline void kpr_count(__u32 idx)
{
	__u64 *c = stats.lookup(&idx);

	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline struct kpr_config4 *kpr_config(void)
{
	__u32 zero = 0;

	return config4.lookup(&zero);
}

#endif /* KPR_MAPS_H */
