/* SPDX-License-Identifier: GPL-2.0 */
/* Address/port rewriting with incremental checksum updates.
 *
 * The L4 checksum covers a pseudo header with both addresses, so an address change
 * updates the L3 checksum and (BPF_F_PSEUDO_HDR) the L4 one. The helpers handle
 * CHECKSUM_PARTIAL skbs (veth, local senders with offload) as well as full checksums.
 * UDP over IPv4 may carry checksum 0 ("none"): it is left 0, and a computed 0 is
 * written as 0xffff (BPF_F_MARK_MANGLED_0), as RFC 768 requires.
 * Later fragments carry no L4 header: only the IPv4 header is rewritten; the L4
 * checksum was fixed in the first fragment, which holds the datagram's only copy.
 */
#ifndef KPR_NAT_H
#define KPR_NAT_H

#include "kpr_structs.h"

#define KPR_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))
#define KPR_IP_SRC_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define KPR_IP_DST_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))

static __always_inline __u32 kpr_l4_csum_off(const struct kpr_pkt4 *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						    : offsetof(struct udphdr, check));
}

/* Rewrite the destination (dnat=1) or the source (dnat=0) address and port of *p.
 * Returns 0, or a negative errno from a helper. */
static __always_inline int kpr_nat4_rewrite(struct __sk_buff *skb, struct kpr_pkt4 *p,
					    int dnat, __be32 new_addr, __be16 new_port)
{
	__be32 old_addr = dnat ? p->daddr : p->saddr;
	__be16 old_port = dnat ? p->dport : p->sport;
	__u32 addr_off = dnat ? KPR_IP_DST_OFF : KPR_IP_SRC_OFF;
	/* sport is at offset 0 and dport at 2 in both TCP and UDP headers */
	__u32 port_off = p->l4_off + (dnat ? 2 : 0);
	int has_l4 = p->frag != KPR_FRAG_LATER;
	int l4_csum = has_l4 && !(p->proto == IPPROTO_UDP && p->l4_csum == 0);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int ret;

	if (old_addr != new_addr) {
		if (l4_csum) {
			ret = bpf_l4_csum_replace(skb, kpr_l4_csum_off(p), old_addr, new_addr,
						  l4_flags | BPF_F_PSEUDO_HDR | sizeof(new_addr));
			if (ret < 0)
				return ret;
		}
		ret = bpf_l3_csum_replace(skb, KPR_IP_CSUM_OFF, old_addr, new_addr,
					  sizeof(new_addr));
		if (ret < 0)
			return ret;
		ret = bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0);
		if (ret < 0)
			return ret;
	}
	if (has_l4 && old_port != new_port) {
		if (l4_csum) {
			ret = bpf_l4_csum_replace(skb, kpr_l4_csum_off(p), old_port, new_port,
						  l4_flags | sizeof(new_port));
			if (ret < 0)
				return ret;
		}
		ret = bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0);
		if (ret < 0)
			return ret;
	}
	if (dnat) {
		p->daddr = new_addr;
		p->dport = new_port;
	} else {
		p->saddr = new_addr;
		p->sport = new_port;
	}
	return 0;
}

#endif /* KPR_NAT_H */
