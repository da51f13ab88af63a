/* SPDX-License-Identifier: GPL-2.0 */
/* tc (clsact) entry points.
 *
 * kpr_ingress runs on packets entering the node from a pod or an external link:
 *   - a reply to a masquerade address gets its client back as destination;
 *   - a packet to a service frontend is checked against source ranges; an
 *     established flow's packet goes to the flow's backend; a new flow's is
 *     checked against the traffic policy, then DNATed to a backend (its flow
 *     recorded), or rejected or dropped when the service has no backend for it.
 * kpr_egress runs on packets leaving the node:
 *   - a masqueraded flow's packet gets its masquerade source;
 *   - a reply from a backend gets its source restored to the frontend;
 *   - either only while the flow that made the entry owns it (kpr_ct_owner): a
 *     connection straight to a pod that reuses an ended Service flow's tuple
 *     passes untouched, and the stale entries go.
 *
 * Both handle IPv4 and IPv6 in one path (addresses are 16 bytes everywhere, see
 * kpr_structs.h) and return TC_ACT_OK for everything that is not theirs, untouched.
 *
 * This file is also the compilation unit of the socket programs (kpr_sock.h), so
 * that every program shares one set of maps.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#include "kpr_consts.h"
#include "kpr_structs.h"
#include "kpr_addr.h"
#include "kpr_maps.h"
#include "kpr_parse.h"
#include "kpr_nat.h"
#include "kpr_ct.h"
#include "kpr_lb.h"
#include "kpr_icmp.h"
#include "kpr_sock.h"

/* Parse the packet and recover a later fragment's ports. Returns 0 when the packet
 * is TCP/UDP with usable ports (counted under `seen`), -1 to pass it untouched. */
static __always_inline int kpr_load_pkt(struct __sk_buff *skb, struct kpr_pkt *p, __u32 seen)
{
	int ret = kpr_parse(skb, p);

	if (ret == KPR_PARSE_TRUNC)
		kpr_count(KPR_STAT_TRUNCATED);
	if (ret != KPR_PARSE_OK)
		return -1;
	kpr_count(seen);
	if (kpr_frag_recover(p) < 0) {
		kpr_count(KPR_STAT_FRAG_MISS);
		return -1;
	}
	return 0;
}

/* Rewrite one side of the packet from a NAT map value (copied out first: the value
 * may change under us). */
static __always_inline int kpr_apply(struct __sk_buff *skb, struct kpr_pkt *p, int dnat,
				     const struct kpr_nat_addr *na, __u32 stat)
{
	union kpr_addr addr = na->addr;
	__be16 port = na->port;

	kpr_frag_remember(p);
	if (kpr_nat_rewrite(skb, p, dnat, &addr, port) < 0) {
		kpr_count(KPR_STAT_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	kpr_count(stat);
	return TC_ACT_OK;
}

int kpr_ingress(struct __sk_buff *skb)
{
	struct kpr_pkt p = {};
	struct kpr_tuple t;
	struct kpr_svc_key k = {};
	struct kpr_fwd f = {};
	struct kpr_svc_value *svc;
	struct kpr_nat_addr *na;
	struct kpr_config *cfg;
	int vip_only = 0;
	int masq;
	__u64 now;

	if (kpr_load_pkt(skb, &p, KPR_STAT_INGRESS_PKTS) < 0)
		return TC_ACT_OK;

	kpr_tuple_from_pkt(&p, &t);
	cfg = kpr_config();
	/* Only a reply to the masquerade address can have an unsnat entry: other
	 * packets skip that lookup (a 40-byte key hashed and compared on every packet).
	 * An entry made for an earlier masquerade address is skipped too: its replies
	 * go to an address the node no longer masquerades with. */
	if (cfg && kpr_addr_eq(&p.daddr, p.family == 4 ? &cfg->snat4 : &cfg->snat6)) {
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & KPR_TCP_SYN)) {
			/* a SYN-ACK: its flow may be half-open */
			union kpr_ho_value *hv = kpr_ho_get(&t, KPR_HO_UNSNAT);

			if (hv)
				return kpr_apply(skb, &p, 1, &hv->nat, KPR_STAT_UNSNAT);
		}
		na = unsnat.lookup(&t);
		if (na)
			return kpr_apply(skb, &p, 1, na, KPR_STAT_UNSNAT);
	}

	svc = kpr_frontend(&p, &k, &vip_only);
	if (!svc)
		return vip_only ? kpr_icmp_reject(skb, &p) : TC_ACT_OK;
	kpr_frag_remember(&p);

	if ((svc->flags & KPR_SVC_F_SRC_RANGES) && !kpr_src_allowed(svc, &p.saddr)) {
		kpr_count(KPR_STAT_DROP_SOURCE_RANGE);
		return TC_ACT_SHOT;
	}
	now = kpr_now();
	switch (kpr_ct_forward(&p, &t, now, &f)) {
	case KPR_CT_HIT:
		break;
	case KPR_CT_PASS:
		kpr_count(KPR_STAT_CT_EXTERN);
		return TC_ACT_OK;
	case KPR_CT_HOLD:
		kpr_count(KPR_STAT_CT_HOLD);
		return TC_ACT_SHOT;
	default:
		if (kpr_handover_pass(svc, &p)) {
			kpr_count(KPR_STAT_CT_EXTERN);
			return TC_ACT_OK;
		}
		masq = kpr_policy(&p, &k, &svc, cfg);
		switch (kpr_lb_backend(&p, &t, svc, masq, cfg, now, &f)) {
		case KPR_LB_OK:
			break;
		case KPR_LB_EMPTY:
			if (svc->flags & KPR_SVC_F_DROP_EMPTY) {
				kpr_count(KPR_STAT_DROP_NO_BACKEND);
				return TC_ACT_SHOT;
			}
			return kpr_icmp_reject(skb, &p);
		default:
			kpr_count(KPR_STAT_DROP_SNAT_PORTS);
			return TC_ACT_SHOT;
		}
	}
	if (kpr_nat_rewrite(skb, &p, 1, &f.be_addr, f.be_port) < 0) {
		kpr_count(KPR_STAT_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	kpr_count(KPR_STAT_DNAT);
	return TC_ACT_OK;
}

int kpr_egress(struct __sk_buff *skb)
{
	struct kpr_pkt p = {};
	struct kpr_tuple t;
	struct kpr_tuple r;
	struct kpr_nat_addr *na;
	struct kpr_nat_addr *fe;

	if (kpr_load_pkt(skb, &p, KPR_STAT_EGRESS_PKTS) < 0)
		return TC_ACT_OK;

	kpr_tuple_from_pkt(&p, &t);
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & KPR_TCP_SYN)) {
		/* A SYN (client -> backend) or SYN-ACK (backend -> client): its flow may
		 * be half-open, and then its entries are in half_open alone. Looked up
		 * first: a main entry on the tuple is an earlier flow's. */
		union kpr_ho_value *hv = kpr_ho_get(&t, KPR_HO_SNAT);

		if (hv)
			return kpr_apply(skb, &p, 0, &hv->nat, KPR_STAT_SNAT);
		hv = kpr_ho_get(&t, KPR_HO_REVNAT);
		if (hv)
			return kpr_apply(skb, &p, 0, &hv->nat, KPR_STAT_REVNAT);
	}
	na = snat.lookup(&t);
	if (na) {
		/* client -> backend: its flow's frontend is in the revnat entry; without
		 * one (evicted alone) masquerading is harmless: unsnat brings replies back */
		if (kpr_may_be_new(&p)) {
			r.saddr = p.daddr;
			r.daddr = p.saddr;
			r.sport = p.dport;
			r.dport = p.sport;
			r.proto = p.proto;
			r.pad[0] = r.pad[1] = r.pad[2] = 0;
			fe = revnat.lookup(&r);
			if (fe && !kpr_ct_owner(&p.saddr, p.sport, fe, &p.daddr, p.dport, &p,
						kpr_now())) {
				kpr_ct_reclaim(&p.daddr, p.dport, &p.saddr, p.sport, p.proto);
				return TC_ACT_OK;
			}
		}
		return kpr_apply(skb, &p, 0, na, KPR_STAT_SNAT);
	}
	na = revnat.lookup(&t);
	if (!na)
		return TC_ACT_OK;
	/* backend -> client */
	if (kpr_may_be_new(&p) &&
	    !kpr_ct_owner(&p.daddr, p.dport, na, &p.saddr, p.sport, &p, kpr_now())) {
		kpr_ct_reclaim(&p.saddr, p.sport, &p.daddr, p.dport, p.proto);
		return TC_ACT_OK;
	}
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & KPR_TCP_FIN))
		kpr_ct_fin_reply(&p.daddr, p.dport, na);
	return kpr_apply(skb, &p, 0, na, KPR_STAT_REVNAT);
}
