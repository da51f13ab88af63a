/* SPDX-License-Identifier: GPL-2.0 */
/* Address/port rewriting with incremental checksum updates.
 *
 * The L4 checksum covers a pseudo header with both addresses, so an address change
 * updates the L4 checksum (BPF_F_PSEUDO_HDR) and, for IPv4, the header checksum;
 * IPv6 has none. The helpers handle CHECKSUM_PARTIAL skbs (veth, local senders with
 * offload) as well as full checksums.
 * UDP over IPv4 may carry checksum 0 ("none"): it is left 0, and a computed 0 is
 * written as 0xffff (BPF_F_MARK_MANGLED_0), as RFC 768 requires. (Over IPv6 the UDP
 * checksum is mandatory, RFC 8200 section 8.1; a 0 there is not ours to fix.)
 * Later fragments carry no L4 header: only the IP header is rewritten; the L4
 * checksum was fixed in the first fragment, which holds the datagram's only copy.
 */
#ifndef KPR_NAT_H
#define KPR_NAT_H

#include "kpr_structs.h"
#include "kpr_addr.h"

#define KPR_IP_CSUM_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, check))
#define KPR_IP_SRC_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, saddr))
#define KPR_IP_DST_OFF (sizeof(struct ethhdr) + offsetof(struct iphdr, daddr))
#define KPR_IP6_SRC_OFF (sizeof(struct ethhdr) + offsetof(struct ipv6hdr, saddr))
#define KPR_IP6_DST_OFF (sizeof(struct ethhdr) + offsetof(struct ipv6hdr, daddr))

static __always_inline __u32 kpr_l4_csum_off(const struct kpr_pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
						    : offsetof(struct udphdr, check));
}

/* Replace an address in the IP header and fix the checksums that cover it. */
static __always_inline int kpr_nat_addr(struct __sk_buff *skb, const struct kpr_pkt *p,
					int dnat, int l4_csum, __u64 l4_flags,
					const union kpr_addr *from, const union kpr_addr *to)
{
	int ret;

	if (p->family == 4) {
		__be32 old = from->w[3];
		__be32 new = to->w[3];

		if (l4_csum) {
			ret = bpf_l4_csum_replace(skb, kpr_l4_csum_off(p), old, new,
						  l4_flags | BPF_F_PSEUDO_HDR | sizeof(new));
			if (ret < 0)
				return ret;
		}
		ret = bpf_l3_csum_replace(skb, KPR_IP_CSUM_OFF, old, new, sizeof(new));
		if (ret < 0)
			return ret;
		return bpf_skb_store_bytes(skb, dnat ? KPR_IP_DST_OFF : KPR_IP_SRC_OFF, &new,
					   sizeof(new), 0);
	} else {
		union kpr_addr old = *from;
		union kpr_addr new = *to;

		if (l4_csum) {
			__s64 diff = bpf_csum_diff(old.w, sizeof(old), new.w, sizeof(new), 0);

			if (diff < 0)
				return (int)diff;
			/* size 0: `to` is a checksum difference (bpf_l4_csum_replace). */
			ret = bpf_l4_csum_replace(skb, kpr_l4_csum_off(p), 0, (__u32)diff,
						  l4_flags | BPF_F_PSEUDO_HDR);
			if (ret < 0)
				return ret;
		}
		return bpf_skb_store_bytes(skb, dnat ? KPR_IP6_DST_OFF : KPR_IP6_SRC_OFF, &new,
					   sizeof(new), 0);
	}
}

/* Rewrite the destination (dnat=1) or the source (dnat=0) address and port of *p.
 * Returns 0, or a negative errno from a helper. */
static __always_inline int kpr_nat_rewrite(struct __sk_buff *skb, struct kpr_pkt *p,
					   int dnat, const union kpr_addr *new_addr,
					   __be16 new_port)
{
	union kpr_addr *old_addr = dnat ? &p->daddr : &p->saddr;
	__be16 old_port = dnat ? p->dport : p->sport;
	/* sport is at offset 0 and dport at 2 in both TCP and UDP headers */
	__u32 port_off = p->l4_off + (dnat ? 2 : 0);
	int has_l4 = p->frag != KPR_FRAG_LATER;
	int l4_csum = has_l4 && !(p->family == 4 && p->proto == IPPROTO_UDP && p->l4_csum == 0);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int ret;

	if (!kpr_addr_eq(old_addr, new_addr)) {
		ret = kpr_nat_addr(skb, p, dnat, l4_csum, l4_flags, old_addr, new_addr);
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
		p->daddr = *new_addr;
		p->dport = new_port;
	} else {
		p->saddr = *new_addr;
		p->sport = new_port;
	}
	return 0;
}

#endif /* KPR_NAT_H */
