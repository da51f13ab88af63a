/* SPDX-License-Identifier: GPL-2.0 */
/* tc (clsact) entry points.
 *
 * kpr_ingress runs on packets entering the node from a pod or an external link:
 * a packet to a service frontend is DNATed to a backend (and its flow recorded).
 * kpr_egress runs on packets leaving the node: a reply from a backend gets its
 * source restored to the service address the client used.
 *
 * Both return TC_ACT_OK for everything that is not theirs, untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#include "kpr_consts.h"
#include "kpr_structs.h"
#include "kpr_maps.h"
#include "kpr_parse.h"
#include "kpr_nat.h"
#include "kpr_ct.h"
#include "kpr_lb.h"

/* Parse the packet and recover a later fragment's ports. Returns 0 when the packet
 * is IPv4 TCP/UDP with usable ports (counted under `seen`), -1 to pass it untouched. */
static __always_inline int kpr_load_pkt(struct __sk_buff *skb, struct kpr_pkt4 *p, __u32 seen)
{
	int ret = kpr_parse_ipv4(skb, p);

	if (ret == KPR_PARSE_TRUNC)
		kpr_count(KPR_STAT_TRUNCATED);
	if (ret != KPR_PARSE_OK)
		return -1;
	kpr_count(seen);
	if (kpr_frag4_recover(p) < 0) {
		kpr_count(KPR_STAT_FRAG_MISS);
		return -1;
	}
	return 0;
}

int kpr_ingress(struct __sk_buff *skb)
{
	struct kpr_pkt4 p = {};
	struct kpr_svc_value *svc;
	struct kpr_backend4 *be;
	__be32 be_addr;
	__be16 be_port;

	if (kpr_load_pkt(skb, &p, KPR_STAT_INGRESS_PKTS) < 0)
		return TC_ACT_OK;

	svc = kpr_svc4_lookup(&p);
	if (!svc)
		return TC_ACT_OK;
	kpr_frag4_remember(&p);

	be = kpr_lb4_backend(&p, svc);
	if (!be) {
		kpr_count(KPR_STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	/* copy out of the map value before rewriting the packet */
	be_addr = be->addr;
	be_port = be->port;
	if (kpr_nat4_rewrite(skb, &p, 1, be_addr, be_port) < 0) {
		kpr_count(KPR_STAT_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	kpr_count(KPR_STAT_DNAT);
	return TC_ACT_OK;
}

int kpr_egress(struct __sk_buff *skb)
{
	struct kpr_pkt4 p = {};
	struct kpr_tuple4 key;
	struct kpr_revnat4 *rn;
	__be32 vip;
	__be16 vport;

	if (kpr_load_pkt(skb, &p, KPR_STAT_EGRESS_PKTS) < 0)
		return TC_ACT_OK;

	kpr_tuple4_from_pkt(&p, &key);
	rn = revnat4.lookup(&key);
	if (!rn)
		return TC_ACT_OK;
	kpr_frag4_remember(&p);
	vip = rn->vip;
	vport = rn->port;
	if (kpr_nat4_rewrite(skb, &p, 0, vip, vport) < 0) {
		kpr_count(KPR_STAT_DROP_NAT_FAIL);
		return TC_ACT_SHOT;
	}
	kpr_count(KPR_STAT_REVNAT);
	return TC_ACT_OK;
}
