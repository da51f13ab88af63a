/* SPDX-License-Identifier: GPL-2.0 */
/* Every map, pinned under KPR_PIN_DIR so that a restarted controller reads its state
 * back and the new programs reuse the maps the running ones use (no traffic lost on a
 * restart or upgrade). The "_v4" suffix is the layout version: a change of any struct
 * in kpr_structs.h bumps it, so an old pin is never reused with a new layout.
 */
#ifndef KPR_MAPS_H
#define KPR_MAPS_H

#include "kpr_consts.h"
#include "kpr_structs.h"

#define KPR_PIN(name) KPR_PIN_DIR "/" #name "_v4"

/* frontend -> service */
BPF_TABLE_PINNED("hash", struct kpr_svc_key, struct kpr_svc_value, services,
		 KPR_MAX_SERVICES, KPR_PIN(services));

/* (service, slot) -> backend id */
BPF_TABLE_PINNED("hash", struct kpr_slot_key, __u32, backend_slots, KPR_MAX_SLOTS,
		 KPR_PIN(backend_slots));

/* backend id -> backend address. An array: ids are 1 .. KPR_MAX_BACKENDS, and
 * index 0 stays free (a slot the controller could not fill holds 0). */
BPF_TABLE_PINNED("array", __u32, struct kpr_backend, backends, KPR_MAX_BACKENDS + 1,
		 KPR_PIN(backends));

/* (service, backend id) -> 1: membership, for affinity */
BPF_TABLE_PINNED("hash", struct kpr_member_key, __u8, members, KPR_MAX_SLOTS,
		 KPR_PIN(members));

/* service id -> Maglev table. Not preallocated: only Maglev services cost memory
 * (4 x KPR_MAGLEV_SIZE bytes each). */
BPF_TABLE_PINNED("hash", __u32, struct kpr_maglev, maglev, KPR_MAX_MAGLEV,
		 KPR_PIN(maglev), BPF_F_NO_PREALLOC);

/* original tuple -> chosen backend. LRU: a full table evicts the coldest flow
 * instead of failing the insert. */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple, struct kpr_ct_value, conntrack, KPR_MAX_CT,
		 KPR_PIN(conntrack));

/* This load's own state, KPR_STATE_F_* (one entry; never pinned, so a new load
 * starts from 0). COEXIST is set from the load until every interface has these
 * programs, and again at a stop: meanwhile another build's programs may handle
 * some packets of a flow (an interface not yet swapped, the build that takes over
 * after a stop), and a build without the half-open table (v4 before it, v3) would
 * miss a SYN's entries there; so a SYN goes into the tables every build reads. */
BPF_ARRAY(lb_state, __u32, 1);

/* The previous layout's conntrack during a change of layout (same key and value
 * size; that layout's clock and meanings, see controller/datapaths/ebpf/layouts.py):
 * slot KPR_PREV_IMPORT while an upgrade is under way, so a flow the old programs
 * opened after the controller copied their table is still found; slot
 * KPR_PREV_EXPORT while a rollback export is under way, so every flow opened until
 * the older kpr's programs take over is written there too. Never pinned: each load
 * starts with both slots empty. ct_prev_tmpl only gives the inner maps' type (the
 * kernel compares type, key, value and flags, not the capacity, for a hash). */
BPF_TABLE("lru_hash", struct kpr_tuple, struct kpr_ct_value, ct_prev_tmpl, 64);
BPF_ARRAY_OF_MAPS(ct_prev, "ct_prev_tmpl", 2);

/* half-open TCP flows (a SYN, no completed handshake): their conntrack and
 * reply-side entries, apart from established flows' (see struct kpr_ho_key) */
BPF_TABLE_PINNED("lru_hash", struct kpr_ho_key, union kpr_ho_value, half_open,
		 KPR_MAX_HALF_OPEN, KPR_PIN(half_open));

/* per-CPU scratch for the half-open path (struct kpr_ho_scratch); never pinned:
 * nothing in it outlives a packet */
BPF_PERCPU_ARRAY(ho_scratch, struct kpr_ho_scratch, 1);

/* reply tuple (backend -> client) -> frontend to restore as the reply's source */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple, struct kpr_nat_addr, revnat, KPR_MAX_CT,
		 KPR_PIN(revnat));

/* masqueraded flow after DNAT (client -> backend) -> source to give it */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple, struct kpr_nat_addr, snat, KPR_MAX_CT,
		 KPR_PIN(snat));

/* reply to a masquerade address (backend -> node) -> the client it belongs to */
BPF_TABLE_PINNED("lru_hash", struct kpr_tuple, struct kpr_nat_addr, unsnat, KPR_MAX_CT,
		 KPR_PIN(unsnat));

/* (service, client address) -> backend, for sessionAffinity ClientIP */
BPF_TABLE_PINNED("lru_hash", struct kpr_affinity_key, struct kpr_affinity_value, affinity,
		 KPR_MAX_AFFINITY, KPR_PIN(affinity));

/* (service, source prefix) -> 1, for loadBalancerSourceRanges */
BPF_TABLE_PINNED("lpm_trie", struct kpr_src_range_key, __u8, src_ranges,
		 KPR_MAX_SRC_RANGES, KPR_PIN(src_ranges), BPF_F_NO_PREALLOC);

/* detect-local: the cluster (pod) CIDRs */
BPF_TABLE_PINNED("lpm_trie", struct kpr_lpm_key, __u8, local_cidrs, KPR_MAX_LOCAL_CIDRS,
		 KPR_PIN(local_cidrs), BPF_F_NO_PREALLOC);

/* every ClusterIP -> 1: their undefined ports are rejected. Apart from services so
 * that markers never take a frontend's room. */
BPF_TABLE_PINNED("hash", union kpr_addr, __u8, cluster_ips, KPR_MAX_SERVICES,
		 KPR_PIN(cluster_ips));

/* the node's own addresses -> KPR_ADDR_F_* */
BPF_TABLE_PINNED("hash", union kpr_addr, __u32, node_addrs, KPR_MAX_NODE_ADDRS,
		 KPR_PIN(node_addrs));

/* node-wide settings (one entry) */
BPF_TABLE_PINNED("array", __u32, struct kpr_config, node_config, 1, KPR_PIN(node_config));

/* (socket, backend) -> frontend, for recvmsg/getpeername of host sockets */
BPF_TABLE_PINNED("lru_hash", struct kpr_sock_key, struct kpr_nat_addr, sock_revnat, KPR_MAX_CT,
		 KPR_PIN(sock_revnat));

/* first fragment's ports, for the later fragments of the same datagram */
BPF_TABLE_PINNED("lru_hash", struct kpr_frag_key, struct kpr_frag_ports, frags,
		 KPR_MAX_FRAG, KPR_PIN(frags));

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

/* The backend at index `id` for a new choice: NULL for a free or gone entry or an
 * id out of range. */
static __always_inline struct kpr_backend *kpr_backend(__u32 id)
{
	struct kpr_backend *be = backends.lookup(&id);

	return be && be->proto && !(be->flags & KPR_BE_F_GONE) ? be : NULL;
}

/* The backend a flow bound to (id, gen) may keep using, NULL when the flow must
 * be balanced again. A TCP flow keeps a backend that left its Service (gone), as
 * netfilter's conntrack keeps a removed endpoint's NAT under kube-proxy: the
 * connection ends when one end closes it, never by kpr. A datagram flow moves, as
 * kube-proxy deletes the UDP conntrack entries of an endpoint that stopped
 * serving. A changed generation means the id has another occupant. */
static __always_inline struct kpr_backend *kpr_flow_backend(__u32 id, __u32 gen, __u8 proto)
{
	struct kpr_backend *be = backends.lookup(&id);

	if (!be || !be->proto || be->gen != gen)
		return NULL;
	if ((be->flags & KPR_BE_F_GONE) && proto != IPPROTO_TCP)
		return NULL;
	return be;
}

static __always_inline struct kpr_config *kpr_config(void)
{
	__u32 zero = 0;

	return node_config.lookup(&zero);
}

#endif /* KPR_MAPS_H */
