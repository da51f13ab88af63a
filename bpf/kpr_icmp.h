/* SPDX-License-Identifier: GPL-2.0 */
/* REJECT: turn the packet into an ICMP port unreachable to its sender and send it
 * back out of the link it came in on.
 *
 * kube-proxy's REJECT (iptables `-j REJECT`, nftables `reject`) answers every
 * protocol with icmp-port-unreachable; TCP's connect() then fails with
 * ECONNREFUSED at once, and a connected UDP socket gets ECONNREFUSED.
 *
 * The error quotes the offending IPv4 header and the first 8 bytes of its payload
 * (RFC 792). Packets with IP options or later fragments are dropped instead:
 * the quote would be variable-length, and a later fragment has no ports to quote.
 *
 * Checksum offload: a packet a local pod sent with CHECKSUM_PARTIAL keeps that
 * state (no helper resets it, kernel 6.18); delivered back over a veth it is
 * trusted as is, which is the only way such a packet reaches us.
 */
#ifndef KPR_ICMP_H
#define KPR_ICMP_H

#include <uapi/linux/icmp.h>

#include "kpr_structs.h"

#define KPR_ICMP_QUOTE 28 /* 20-byte IPv4 header + 8 bytes of L4 */

/* 20-byte IPv4 header + 8-byte ICMP header + quote: what follows the Ethernet header. */
struct kpr_icmp4_reply {
	struct iphdr ip;                /* to the sender, from the address it tried */
	struct icmphdr icmp;            /* type 3 (unreachable), code 3 (port) */
	__u8 quote[KPR_ICMP_QUOTE];     /* the offending header and 8 payload bytes */
};

static __always_inline __u16 kpr_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Returns the tc verdict: a redirect on success, TC_ACT_SHOT otherwise. */
static __always_inline int kpr_icmp4_reject(struct __sk_buff *skb, const struct kpr_pkt4 *p)
{
	struct kpr_icmp4_reply r = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__s64 sum;

	if (p->ihl_len != sizeof(struct iphdr) || p->frag == KPR_FRAG_LATER)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth), r.quote, KPR_ICMP_QUOTE) < 0)
		return TC_ACT_SHOT;

	__builtin_memcpy(mac, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, mac, ETH_ALEN);

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = p->daddr;
	r.ip.daddr = p->saddr;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	r.ip.check = kpr_csum_fold(sum);

	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r) - sizeof(r.ip), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	r.icmp.checksum = kpr_csum_fold(sum);

	if (bpf_skb_change_tail(skb, sizeof(eth) + sizeof(r), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(eth), &r, sizeof(r), 0) < 0)
		return TC_ACT_SHOT;
	kpr_count(KPR_STAT_REJECT);
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* KPR_ICMP_H */
