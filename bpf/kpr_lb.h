/* SPDX-License-Identifier: GPL-2.0 */
/* Frontend lookup, traffic policy, masquerade decision and backend selection.
 *
 * The rules are kube-proxy's (pkg/proxy/iptables/proxier.go, v1.31):
 *  - external frontends (NodePort, LB IP, externalIP) with policy Cluster
 *    masquerade every client;
 *  - with policy Local they keep the client's address and use node-local backends,
 *    except for clients inside the cluster (detect-local), which use all backends
 *    ("pod traffic to an external destination"), and the node itself, which also
 *    masquerades;
 *  - ClusterIPs masquerade clients outside the cluster CIDRs when detect-local is
 *    configured, and everything with masqueradeAll;
 *  - a client that lands on itself (hairpin) is always masqueraded, or its own
 *    stack would drop the packet for carrying its own source address.
 */
#ifndef KPR_LB_H
#define KPR_LB_H

#include "kpr_consts.h"
#include "kpr_addr.h"
#include "kpr_maps.h"
#include "kpr_ct.h"

#define KPR_LB_OK 0        /* f is filled in */
#define KPR_LB_EMPTY 1     /* the service has no backend for this client */
#define KPR_LB_NO_PORT 2   /* no free masquerade port */

/* The frontend a packet is addressed to, with its key in *k. NULL when there is
 * none; then *vip_only says whether the address is a ClusterIP (its undefined ports
 * are rejected, as kube-proxy's nftables mode does). */
static __always_inline struct kpr_svc_value *kpr_frontend(const struct kpr_pkt *p,
							  struct kpr_svc_key *k, int *vip_only)
{
	struct kpr_svc_value *svc;
	__u32 *addr_flags;

	k->vip = p->daddr;
	k->port = p->dport;
	k->proto = p->proto;
	k->scope = KPR_SCOPE_EXTERNAL;
	svc = services.lookup(k);
	if (svc)
		return svc;
	addr_flags = node_addrs.lookup((union kpr_addr *)&p->daddr);
	if (addr_flags && (*addr_flags & KPR_ADDR_F_NODEPORT)) {
		kpr_addr_unspec(&k->vip, p->family);
		svc = services.lookup(k);
		if (svc)
			return svc;
	}
	*vip_only = cluster_ips.lookup((union kpr_addr *)&p->daddr) != NULL;
	return NULL;
}

static __always_inline int kpr_src_allowed(const struct kpr_svc_value *svc,
					   const union kpr_addr *saddr)
{
	struct kpr_src_range_key k = {};

	k.prefixlen = 32 + 128;
	k.svc_id = svc->svc_id;
	k.addr = *saddr;
	return src_ranges.lookup(&k) != NULL;
}

static __always_inline int kpr_in_cluster(const union kpr_addr *addr)
{
	struct kpr_lpm_key k = {};

	k.prefixlen = 128;
	k.addr = *addr;
	return local_cidrs.lookup(&k) != NULL;
}

/* Apply the traffic policy: may switch *svc to the frontend's in-cluster twin.
 * Returns 1 when the flow must be masqueraded (before the hairpin check). */
static __always_inline int kpr_policy(const struct kpr_pkt *p, struct kpr_svc_key *k,
				      struct kpr_svc_value **svc, const struct kpr_config *cfg)
{
	struct kpr_svc_value *twin;
	__u16 flags = (*svc)->flags;
	/* detect-local per family, as kube-proxy's per-family proxiers: no cluster
	 * CIDR of this family means no client of it counts as off-cluster. */
	int detect = cfg && (cfg->flags & (p->family == 4 ? KPR_CFG_F_DETECT_LOCAL
							 : KPR_CFG_F_DETECT_LOCAL6));
	int masq = cfg && (cfg->flags & KPR_CFG_F_MASQ_ALL);

	if (!(flags & KPR_SVC_F_EXTERNAL))
		return masq || (detect && !kpr_in_cluster(&p->saddr));
	if (!(flags & KPR_SVC_F_LOCAL))
		return 1;
	if (!(flags & KPR_SVC_F_INTERNAL))
		return masq;
	if (node_addrs.lookup((union kpr_addr *)&p->saddr)) {
		masq = 1; /* the node itself: its source would be the frontend's own */
	} else if (!(detect && kpr_in_cluster(&p->saddr))) {
		return masq; /* an external client: local backends, source kept */
	}
	k->scope = KPR_SCOPE_INTERNAL;
	twin = services.lookup(k);
	if (twin)
		*svc = twin;
	return masq;
}

/* A 32-bit hash of the flow's 5-tuple (murmur3's finaliser over a simple mix):
 * Maglev needs the same flow to hash the same on every node and every CPU. */
static __always_inline __u32 kpr_flow_hash(const struct kpr_pkt *p)
{
	__u32 h = kpr_addr_mix(&p->saddr) * 0x9e3779b1U;

	h ^= kpr_addr_mix(&p->daddr) + 0x85ebca6bU + (h << 6) + (h >> 2);
	h ^= (((__u32)p->sport << 16) | p->dport) + 0xc2b2ae35U + (h << 6) + (h >> 2);
	h ^= p->proto;
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

/* A backend for a new flow: Maglev's table entry for the flow's hash, or a random
 * slot. A slot miss can only be a packet racing a shrink (count read before the
 * controller lowered it): fall back to slot 0, which every non-empty service has. */
static __always_inline struct kpr_backend *kpr_lb_select(const struct kpr_pkt *p,
							 const struct kpr_svc_value *svc,
							 __u32 *backend_id)
{
	struct kpr_slot_key sk = {};
	struct kpr_maglev *tbl;
	__u32 *id;

	if (svc->count == 0)
		return NULL;
	if (svc->flags & KPR_SVC_F_MAGLEV) {
		__u32 sid = svc->svc_id;

		tbl = maglev.lookup(&sid);
		if (tbl) {
			__u32 idx = kpr_flow_hash(p) % KPR_MAGLEV_SIZE;

			/* clang lowers % to div/mul/sub, which the verifier cannot bound
			 * (kernel 6.18): hide idx from the optimiser and check it again. */
			asm volatile("" : "+r"(idx));
			if (idx >= KPR_MAGLEV_SIZE)
				return NULL;
			*backend_id = tbl->backend_ids[idx];
			return kpr_backend(*backend_id);
		}
	}
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
	return kpr_backend(*id);
}

/* sessionAffinity ClientIP: the client's backend if it chose one within the timeout
 * and the service still has it. */
static __always_inline struct kpr_backend *
kpr_affinity_get(const struct kpr_pkt *p, const struct kpr_svc_value *svc, __u64 now,
		  __u32 *backend_id)
{
	struct kpr_affinity_key ak = {};
	struct kpr_member_key mk = {};
	struct kpr_affinity_value *av;
	struct kpr_backend *be;

	ak.svc_id = svc->svc_id;
	ak.client = p->saddr;
	av = affinity.lookup(&ak);
	if (!av || now - av->last_used > (__u64)svc->affinity_timeout * KPR_TICKS_PER_SEC)
		return NULL;
	mk.svc_id = svc->svc_id;
	mk.backend_id = av->backend_id;
	if (!members.lookup(&mk))
		return NULL;
	be = kpr_backend(mk.backend_id);
	if (be && be->gen != av->backend_gen)
		return NULL; /* the id went to another backend meanwhile */
	if (be) {
		*backend_id = mk.backend_id;
		kpr_count(KPR_STAT_AFFINITY_HIT);
	}
	return be;
}

static __always_inline void kpr_affinity_put(const struct kpr_pkt *p,
					     const struct kpr_svc_value *svc, __u64 now,
					     __u32 backend_id, __u32 backend_gen)
{
	struct kpr_affinity_key ak = {};
	struct kpr_affinity_value av = {};

	ak.svc_id = svc->svc_id;
	ak.client = p->saddr;
	av.last_used = now;
	av.backend_id = backend_id;
	av.backend_gen = backend_gen;
	affinity.update(&ak, &av);
}

/* The clock of conntrack and affinity, in KPR_TICKS_PER_SEC. bpf_jiffies64 is
 * inlined by the verifier into one load (64-bit JITs, kernel >= 5.5): about 1 ns
 * in a test run here, where bpf_ktime_get_coarse_ns (a call) cost 14 ns and
 * bpf_ktime_get_ns (a call and rdtsc) 32 ns (KVM guest, kernel 6.18). */
static __always_inline __u64 kpr_now(void)
{
#if KPR_HZ
	return bpf_jiffies64();
#else
	return bpf_ktime_get_coarse_ns(); /* kernel >= 5.11 */
#endif
}

/* A flow the previous layout's programs opened after the upgrade copied their
 * conntrack (layouts.Upgrade; slot KPR_PREV_IMPORT): converted as the controller
 * converts (that layout's nanosecond stamps by age, its CLOSING as CLOSING|RST, the
 * carried backends' generation 1) and written into conntrack. NULL when no upgrade
 * is under way or the flow is not there either. */
static __always_inline struct kpr_ct_value *kpr_ct_import(struct kpr_tuple *key, __u64 now)
{
	__u32 slot = KPR_PREV_IMPORT;
	void *prev = ct_prev.lookup(&slot);
	struct kpr_ct_value *old;
	struct kpr_ho_scratch *s;
	__u64 age;

	if (!prev)
		return NULL;
	old = bpf_map_lookup_elem(prev, key);
	if (!old)
		return NULL;
	s = kpr_ho_scratch();
	if (!s)
		return NULL;
	s->v.ct = *old;
	age = bpf_ktime_get_coarse_ns() - old->last_seen;
#if KPR_HZ
	age /= 1000000000ULL / KPR_HZ;
#endif
	s->v.ct.last_seen = now > age ? now - age : 0;
	if (s->v.ct.flags & KPR_CT_F_CLOSING)
		s->v.ct.flags |= KPR_CT_F_RST; /* v3 marked FIN and RST alike */
	s->v.ct.backend_gen = 1;
	/* NOEXIST: the controller's second pass may have written it meanwhile */
	if (conntrack.insert(key, &s->v.ct))
		return conntrack.lookup(key);
	kpr_count(KPR_STAT_CT_IMPORT);
	return conntrack.lookup(key);
}

/* Whether another build's programs may be running beside these (see lb_state). */
static __always_inline int kpr_coexist(void)
{
	__u32 zero = 0;
	__u32 *st = lb_state.lookup(&zero);

	return st && (*st & KPR_STATE_F_COEXIST);
}

/* During a rollback export (layouts.export_previous): a flow just written into
 * conntrack goes into the previous layout's too, in its format (its nanosecond
 * clock, CLOSING its only flag, no generation), so the older kpr adopts it with
 * the flows the controller copied. */
static __always_inline void kpr_ct_export(const struct kpr_tuple *key,
					  const struct kpr_ct_value *ct)
{
	__u32 slot = KPR_PREV_EXPORT;
	void *prev = ct_prev.lookup(&slot);
	struct kpr_ho_scratch *s;

	if (!prev)
		return;
	s = kpr_ho_scratch();
	if (!s)
		return;
	s->v.ct = *ct;
	s->v.ct.last_seen = bpf_ktime_get_coarse_ns();
	s->v.ct.flags &= KPR_CT_F_CLOSING;
	s->v.ct.backend_gen = 0; /* padding in that layout */
	if (bpf_map_update_elem(prev, (void *)key, &s->v.ct, BPF_ANY) == 0)
		kpr_count(KPR_STAT_CT_EXPORT);
}

/* A half-open flow's packet (see struct kpr_ho_key): its backend from half_open.
 * The client's first packet without SYN (the handshake's ACK, or an RST) completes
 * it: its entries move to conntrack and the main reply-side maps. Returns
 * KPR_CT_HIT with *f filled, or KPR_CT_NEW. */
static __always_inline int kpr_ho_forward(const struct kpr_pkt *p, struct kpr_tuple *key,
					  __u64 now, struct kpr_fwd *f)
{
	union kpr_ho_value *hv = kpr_ho_get(key, KPR_HO_CT);
	struct kpr_ct_value ct;
	struct kpr_backend *be;

	if (!hv || now - hv->ct.last_seen > KPR_CT_LIFETIME_SYN)
		return KPR_CT_NEW;
	if (hv->ct.flags & (KPR_CT_F_EXTERN | KPR_CT_F_HOLD)) /* being handed to netfilter */
		return hv->ct.flags & KPR_CT_F_HOLD ? KPR_CT_HOLD : KPR_CT_PASS;
	be = kpr_flow_backend(hv->ct.backend_id, hv->ct.backend_gen, p->proto);
	if (!be) {
		kpr_count(KPR_STAT_CT_STALE);
		return KPR_CT_NEW;
	}
	f->be_addr = be->addr;
	f->be_port = be->port;
	f->snat_addr = hv->ct.snat_addr;
	f->snat_port = hv->ct.snat_port;
	kpr_count(KPR_STAT_CT_HIT);
	if (p->tcp_flags & KPR_TCP_SYN)
		return KPR_CT_HIT; /* the SYN again: still half-open */
	ct = hv->ct;
	ct.last_seen = now;
	if (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST))
		ct.flags |= KPR_CT_F_CLOSING | (p->tcp_flags & KPR_TCP_RST ? KPR_CT_F_RST : 0);
	if (conntrack.update(key, &ct) || kpr_nat_entries(p, f, 0)) {
		kpr_count(KPR_STAT_CT_FULL);
		return KPR_CT_HIT; /* its half-open entries still carry it */
	}
	kpr_ct_export(key, &ct); /* before kpr_ho_forget: both use the scratch */
	kpr_ho_forget(p, f);
	kpr_count(KPR_STAT_CT_PROMOTE);
	return KPR_CT_HIT;
}

/* An established flow: its own backend, if its conntrack entry is live and the
 * backend still exists. Fills *f and returns KPR_CT_HIT; KPR_CT_NEW for a packet
 * that needs a new choice; KPR_CT_PASS for a flow netfilter translates and
 * KPR_CT_HOLD for one being handed over (a datapath switch). `key` is the packet's tuple (its conntrack key). The
 * service's policy is not consulted: it decided when the flow began. */
static __always_inline int kpr_ct_forward(const struct kpr_pkt *p, struct kpr_tuple *key,
					  __u64 now, struct kpr_fwd *f)
{
	struct kpr_ct_value *ct = conntrack.lookup(key);
	struct kpr_backend *be;
	int ho;

	if (!ct)
		ct = kpr_ct_import(key, now);

	/* No entry, or a closed one whose tuple a new connection may be reusing:
	 * the flow may be half-open (an established flow's packet never looks) */
	if (p->proto == IPPROTO_TCP && (!ct || (ct->flags & KPR_CT_F_CLOSING))) {
		ho = kpr_ho_forward(p, key, now, f);
		if (ho != KPR_CT_NEW)
			return ho;
	}
	if (!ct || !kpr_ct_usable(ct, p, now))
		return KPR_CT_NEW;
	if (ct->flags & (KPR_CT_F_EXTERN | KPR_CT_F_HOLD))
		return ct->flags & KPR_CT_F_HOLD ? KPR_CT_HOLD : KPR_CT_PASS;
	be = kpr_flow_backend(ct->backend_id, ct->backend_gen, p->proto);
	if (!be) {
		/* Its backend stopped serving (datagram flows) or its id has another
		 * occupant: balanced again. A datagram flow moves to a live backend; a
		 * TCP flow, whose backend left long ago, gets one that answers with
		 * RST, so it fails fast, never hangs. */
		kpr_count(KPR_STAT_CT_STALE);
		return KPR_CT_NEW;
	}
	kpr_count(KPR_STAT_CT_HIT);
	f->be_addr = be->addr;
	f->be_port = be->port;
	f->snat_addr = ct->snat_addr;
	f->snat_port = ct->snat_port;
	kpr_ct_touch(ct, p, f, now);
	return KPR_CT_HIT;
}

/* During a datapath switch: is a packet without a conntrack entry netfilter's (see
 * KPR_SVC_F_PASS_NEW and KPR_SVC_F_SYN_ONLY)? */
static __always_inline int kpr_handover_pass(const struct kpr_svc_value *svc,
					     const struct kpr_pkt *p)
{
	if (svc->flags & KPR_SVC_F_PASS_NEW)
		return 1;
	return (svc->flags & KPR_SVC_F_SYN_ONLY) &&
	       (p->proto != IPPROTO_TCP ||
		(p->tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) != KPR_TCP_SYN);
}

/* A new flow's backend: affinity, Maglev or random, masqueraded if `masq` or
 * hairpin, recorded in the conntrack maps. `key` is the packet's tuple, built once
 * by the caller (not const: bcc's map calls take plain pointers). */
static __always_inline int kpr_lb_backend(const struct kpr_pkt *p,
					  struct kpr_tuple *key,
					  const struct kpr_svc_value *svc, int masq,
					  const struct kpr_config *cfg, __u64 now,
					  struct kpr_fwd *f)
{
	struct kpr_ct_value fresh = {};
	struct kpr_backend *be = NULL;
	__u32 backend_id = 0;
	__u32 backend_gen;
	/* a SYN opens a half-open flow, kept apart until its handshake completes;
	 * not while another build's programs may see its other packets (lb_state) */
	int ho = p->proto == IPPROTO_TCP &&
		 (p->tcp_flags & (KPR_TCP_SYN | KPR_TCP_ACK)) == KPR_TCP_SYN &&
		 !kpr_coexist();

	if (svc->flags & KPR_SVC_F_AFFINITY)
		be = kpr_affinity_get(p, svc, now, &backend_id);
	if (!be)
		be = kpr_lb_select(p, svc, &backend_id);
	if (!be)
		return KPR_LB_EMPTY;
	f->be_addr = be->addr;
	f->be_port = be->port;
	backend_gen = be->gen; /* read with the address: what the flow is bound to */
	__builtin_memset(&f->snat_addr, 0, sizeof(f->snat_addr));
	f->snat_port = 0;
	if (svc->flags & KPR_SVC_F_AFFINITY)
		kpr_affinity_put(p, svc, now, backend_id, backend_gen);

	if ((masq || kpr_addr_eq(&f->be_addr, &p->saddr)) && cfg) {
		const union kpr_addr *snat_addr = p->family == 4 ? &cfg->snat4 : &cfg->snat6;

		if (!kpr_addr_is_zero(snat_addr) && kpr_snat_port(p, f, snat_addr, ho) < 0)
			return KPR_LB_NO_PORT;
	}
	fresh.last_seen = now;
	fresh.backend_id = backend_id;
	fresh.backend_gen = backend_gen;
	fresh.svc_id = svc->svc_id;
	fresh.snat_addr = f->snat_addr;
	fresh.snat_port = f->snat_port;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (KPR_TCP_FIN | KPR_TCP_RST)))
		fresh.flags = KPR_CT_F_CLOSING |
			      (p->tcp_flags & KPR_TCP_RST ? KPR_CT_F_RST : 0);
	if (ho) {
		struct kpr_ho_scratch *s = kpr_ho_scratch();

		if (!s)
			return KPR_LB_NO_PORT; /* never: a one-entry per-CPU array */
		kpr_ho_key(key, KPR_HO_CT, &s->k);
		s->v.ct = fresh;
		if (half_open.update(&s->k, &s->v) || kpr_nat_entries(p, f, 1))
			kpr_count(KPR_STAT_CT_FULL);
		kpr_count(KPR_STAT_CT_HALF_OPEN);
	} else if (conntrack.update(key, &fresh) || kpr_nat_entries(p, f, 0)) {
		kpr_count(KPR_STAT_CT_FULL);
	} else {
		kpr_ct_export(key, &fresh);
	}
	kpr_count(KPR_STAT_NEW_FLOW);
	return KPR_LB_OK;
}

#endif /* KPR_LB_H */
