/* SPDX-License-Identifier: GPL-2.0 */
/* REJECT: turn the packet into an ICMP (ICMPv6) port unreachable, or a TCP RST, to
 * its sender and send it back out of the link it came in on.
 *
 * kube-proxy's REJECT (iptables `-j REJECT`, ip6tables `--reject-with
 * icmp6-port-unreachable`, nftables `reject`) answers every protocol with a port
 * unreachable; TCP's connect() then fails with ECONNREFUSED at once, and a
 * connected UDP socket gets ECONNREFUSED.
 *
 * The error quotes the offending IP header and the first 8 bytes of its payload
 * (RFC 792; RFC 4443 allows more, never required). Packets with IPv4 options or
 * IPv6 extension headers, and later fragments, are dropped instead: the quote
 * would be variable-length, and a later fragment has no ports to quote.
 *
 * TCP over IPv6 gets a TCP RST instead. The kernel drops an ICMPv6 error for a
 * socket its user holds (tcp_v6_err, LINUX_MIB_LOCKDROPPEDICMPS, kernel 6.18), and
 * a pod on this node is exactly that: its connect() still holds the socket while
 * the softirq that carries the SYN through us delivers the answer. The connect
 * then waits for the SYN's retransmission, a second later. An RST goes to the
 * socket's backlog instead and fails the connect with ECONNREFUSED at once, as
 * from a closed port. (IPv4's tcp_v4_err reports the same error without delay.)
 *
 * Checksum offload: a packet a local pod sent with CHECKSUM_PARTIAL keeps that
 * state (no helper resets it, kernel 6.18); delivered back over a veth it is
 * trusted as is, which is the only way such a packet reaches us.
 */
#ifndef KPR_ICMP_H
#define KPR_ICMP_H

#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "kpr_structs.h"

#define KPR_ICMP_QUOTE 28  /* 20-byte IPv4 header + 8 bytes of L4 */
#define KPR_ICMP6_QUOTE 48 /* 40-byte IPv6 header + 8 bytes of L4 */

/* What follows the Ethernet header of an ICMP port unreachable. */
struct kpr_icmp4_reply {
	struct iphdr ip;            /* to the sender, from the address it tried */
	struct icmphdr icmp;        /* type 3 (unreachable), code 3 (port) */
	__u8 quote[KPR_ICMP_QUOTE]; /* the offending header and 8 payload bytes */
};

/* What follows the Ethernet header of an ICMPv6 port unreachable. */
struct kpr_icmp6_reply {
	struct ipv6hdr ip;           /* to the sender, from the address it tried */
	struct icmp6hdr icmp;        /* type 1 (unreachable), code 4 (port), 4 unused bytes */
	__u8 quote[KPR_ICMP6_QUOTE]; /* the offending header and 8 payload bytes */
};

/* The ICMPv6 checksum's pseudo header (RFC 8200 section 8.1). */
struct kpr_icmp6_pseudo {
	union kpr_addr saddr; /* source address */
	union kpr_addr daddr; /* destination address */
	__be32 len;           /* upper-layer packet length */
	__be32 nexthdr;       /* three zero bytes, then IPPROTO_ICMPV6 */
};

static __always_inline __u16 kpr_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Swap the Ethernet addresses and write eth + reply (len bytes) as the new packet. */
static __always_inline int kpr_icmp_emit(struct __sk_buff *skb, struct ethhdr *eth,
					 void *reply, __u32 len)
{
	__u8 mac[ETH_ALEN];

	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	if (bpf_skb_change_tail(skb, sizeof(*eth) + len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, eth, sizeof(*eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(*eth), reply, len, 0) < 0)
		return TC_ACT_SHOT;
	kpr_count(KPR_STAT_REJECT);
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int kpr_icmp4_reject(struct __sk_buff *skb, const struct kpr_pkt *p)
{
	struct kpr_icmp4_reply r = {};
	struct ethhdr eth;
	__s64 sum;

	if (p->l3_len != sizeof(struct iphdr) || p->frag == KPR_FRAG_LATER)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth), r.quote, KPR_ICMP_QUOTE) < 0)
		return TC_ACT_SHOT;

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = p->daddr.w[3];
	r.ip.daddr = p->saddr.w[3];
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
	return kpr_icmp_emit(skb, &eth, &r, sizeof(r));
}

static __always_inline int kpr_icmp6_reject(struct __sk_buff *skb, const struct kpr_pkt *p)
{
	struct kpr_icmp6_reply r = {};
	struct kpr_icmp6_pseudo ph = {};
	struct ethhdr eth;
	__s64 sum;

	if (p->l3_len != sizeof(struct ipv6hdr) || p->frag != KPR_FRAG_NONE)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth), r.quote, KPR_ICMP6_QUOTE) < 0)
		return TC_ACT_SHOT;

	r.ip.version = 6;
	r.ip.payload_len = bpf_htons(sizeof(r) - sizeof(r.ip));
	r.ip.nexthdr = IPPROTO_ICMPV6;
	r.ip.hop_limit = 64;
	__builtin_memcpy(&r.ip.saddr, &p->daddr, sizeof(r.ip.saddr));
	__builtin_memcpy(&r.ip.daddr, &p->saddr, sizeof(r.ip.daddr));
	r.icmp.icmp6_type = ICMPV6_DEST_UNREACH;
	r.icmp.icmp6_code = ICMPV6_PORT_UNREACH;

	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.len = bpf_htonl(sizeof(r) - sizeof(r.ip));
	ph.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r) - sizeof(r.ip), (__u32)sum);
	if (sum < 0)
		return TC_ACT_SHOT;
	r.icmp.icmp6_cksum = kpr_csum_fold(sum);
	return kpr_icmp_emit(skb, &eth, &r, sizeof(r));
}

/* What follows the Ethernet header of a TCP RST over IPv6. */
struct kpr_rst6_reply {
	struct ipv6hdr ip;  /* to the sender, from the address it tried */
	struct tcphdr tcp;  /* RST, acknowledging what the segment carried (RFC 9293 3.10.7.1) */
};

static __always_inline int kpr_tcp6_reset(struct __sk_buff *skb, const struct kpr_pkt *p)
{
	struct kpr_rst6_reply r = {};
	struct kpr_icmp6_pseudo ph = {};
	struct ethhdr eth;
	struct tcphdr th;
	__be16 plen;
	__u32 seg_len;
	__s64 sum;

	if (p->frag != KPR_FRAG_NONE || (p->tcp_flags & KPR_TCP_RST))
		return TC_ACT_SHOT; /* never answer an RST (RFC 9293 3.10.7.1) */
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth) + offsetof(struct ipv6hdr, payload_len), &plen,
			       sizeof(plen)) < 0 ||
	    bpf_skb_load_bytes(skb, p->l4_off, &th, sizeof(th)) < 0)
		return TC_ACT_SHOT;
	/* the segment's length: what the RST acknowledges, with SYN and FIN counted */
	seg_len = bpf_ntohs(plen) - (p->l3_len - sizeof(struct ipv6hdr)) - th.doff * 4;
	seg_len += th.syn + th.fin;

	r.ip.version = 6;
	r.ip.payload_len = bpf_htons(sizeof(r.tcp));
	r.ip.nexthdr = IPPROTO_TCP;
	r.ip.hop_limit = 64;
	__builtin_memcpy(&r.ip.saddr, &p->daddr, sizeof(r.ip.saddr));
	__builtin_memcpy(&r.ip.daddr, &p->saddr, sizeof(r.ip.daddr));
	r.tcp.source = p->dport;
	r.tcp.dest = p->sport;
	r.tcp.doff = sizeof(r.tcp) / 4;
	r.tcp.rst = 1;
	if (th.ack) {
		r.tcp.seq = th.ack_seq; /* <SEQ=SEG.ACK><CTL=RST> */
	} else {
		r.tcp.ack = 1;          /* <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> */
		r.tcp.ack_seq = bpf_htonl(bpf_ntohl(th.seq) + seg_len);
	}

	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.len = bpf_htonl(sizeof(r.tcp));
	ph.nexthdr = bpf_htonl(IPPROTO_TCP);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.tcp, sizeof(r.tcp), (__u32)sum);
	if (sum < 0)
		return TC_ACT_SHOT;
	r.tcp.check = kpr_csum_fold(sum);
	return kpr_icmp_emit(skb, &eth, &r, sizeof(r));
}

/* Returns the tc verdict: a redirect on success, TC_ACT_SHOT otherwise. */
static __always_inline int kpr_icmp_reject(struct __sk_buff *skb, const struct kpr_pkt *p)
{
	if (p->family == 4)
		return kpr_icmp4_reject(skb, p);
	if (p->proto == IPPROTO_TCP)
		return kpr_tcp6_reset(skb, p);
	return kpr_icmp6_reject(skb, p);
}

#endif /* KPR_ICMP_H */
