/* SPDX-License-Identifier: GPL-2.0 */
/* Packet parsing: Ethernet -> IPv4 (with options) or IPv6 (with extension headers)
 * -> TCP/UDP, fragment aware. Addresses come out in the one 16-byte form of
 * kpr_structs.h, so everything after parsing is family-blind except the rewrites.
 */
#ifndef KPR_PARSE_H
#define KPR_PARSE_H

#include <uapi/linux/ipv6.h>

#include "kpr_consts.h"
#include "kpr_structs.h"
#include "kpr_addr.h"
#include "kpr_maps.h"

#define KPR_PARSE_OK 0    /* IPv4/IPv6 TCP/UDP, fields filled in */
#define KPR_PARSE_SKIP 1  /* not ours to look at (another protocol) */
#define KPR_PARSE_TRUNC 2 /* the packet is shorter than its headers claim */

#define KPR_IP_MF 0x2000     /* IPv4 "more fragments" in host-order frag_off */
#define KPR_IP_OFFMASK 0x1fff
#define KPR_IP6_MF 0x0001     /* IPv6 fragment header: "more fragments" (host order) */
#define KPR_IP6_OFFMASK 0xfff8

/* IPv6 next-header values walked over (include/net/ipv6.h NEXTHDR_*). */
#define KPR_NEXTHDR_HOP 0
#define KPR_NEXTHDR_ROUTING 43
#define KPR_NEXTHDR_FRAGMENT 44
#define KPR_NEXTHDR_AUTH 51
#define KPR_NEXTHDR_DEST 60
/* Extension headers walked before giving up (Cilium walks as many, bpf/lib/ipv6.h). */
#define KPR_IPV6_MAX_EXT 4

/* The L4 ports (and TCP flags, checksum) at p->l4_off. Read in place when the
 * header is in the linear area (nearly always: a helper call, with its return
 * thunk, costs more than the rest of the parse), else copied out by the helper. */
static __always_inline int kpr_parse_l4(struct __sk_buff *skb, struct kpr_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 off = p->l4_off;
	__u8 hdr[20]; /* the fixed TCP header (checksum at 16); UDP's is 8 bytes */

	if (off > KPR_MAX_L4_OFF) /* a bound for the verifier; headers end well before */
		return KPR_PARSE_TRUNC;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = data + off;

		if ((void *)(th + 1) <= data_end) {
			p->tcp_flags = ((__u8 *)th)[13];
			p->l4_csum = th->check;
			p->sport = th->source;
			p->dport = th->dest;
			return KPR_PARSE_OK;
		}
		if (bpf_skb_load_bytes(skb, off, hdr, 20) < 0)
			return KPR_PARSE_TRUNC;
		p->tcp_flags = hdr[13];
		p->l4_csum = *(__u16 *)&hdr[16];
	} else {
		struct udphdr *uh = data + off;

		if ((void *)(uh + 1) <= data_end) {
			p->l4_csum = uh->check;
			p->sport = uh->source;
			p->dport = uh->dest;
			return KPR_PARSE_OK;
		}
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return KPR_PARSE_TRUNC;
		p->l4_csum = *(__u16 *)&hdr[6];
	}
	p->sport = *(__be16 *)&hdr[0];
	p->dport = *(__be16 *)&hdr[2];
	return KPR_PARSE_OK;
}

static __always_inline int kpr_parse_ipv4(struct __sk_buff *skb, struct kpr_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	__u16 frag_off;

	if ((void *)(ip + 1) > data_end)
		return KPR_PARSE_TRUNC;
	if (ip->version != 4 || ip->ihl < 5)
		return KPR_PARSE_TRUNC;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return KPR_PARSE_SKIP;

	p->family = 4;
	kpr_addr_from_v4(&p->saddr, ip->saddr);
	kpr_addr_from_v4(&p->daddr, ip->daddr);
	p->proto = ip->protocol;
	p->frag_id = ip->id;
	p->l3_len = (ip->ihl & 0xf) * 4;
	p->l4_off = sizeof(struct ethhdr) + p->l3_len;

	frag_off = bpf_ntohs(ip->frag_off);
	if (frag_off & KPR_IP_OFFMASK) {
		p->frag = KPR_FRAG_LATER;
		return KPR_PARSE_OK; /* no L4 header here; ports come from frags */
	}
	if (frag_off & KPR_IP_MF) {
		p->frag = KPR_FRAG_FIRST;
	} else {
		p->frag = KPR_FRAG_NONE;
		p->frag_id = 0;
	}
	return kpr_parse_l4(skb, p);
}

static __always_inline int kpr_parse_ipv6(struct __sk_buff *skb, struct kpr_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	__u32 off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	__u8 nexthdr;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return KPR_PARSE_TRUNC;
	if (ip6->version != 6)
		return KPR_PARSE_TRUNC;
	p->family = 6;
	kpr_addr_from_v6(&p->saddr, ip6->saddr.in6_u.u6_addr32);
	kpr_addr_from_v6(&p->daddr, ip6->daddr.in6_u.u6_addr32);
	/* An IPv4-mapped address is invalid on the wire (RFC 4942 section 2.2; the
	 * kernel drops such a source in ip6_rcv_core) and here would alias an IPv4
	 * entry: not ours. */
	if (kpr_addr_is_v4mapped(&p->saddr) || kpr_addr_is_v4mapped(&p->daddr))
		return KPR_PARSE_SKIP;
	nexthdr = ip6->nexthdr;
	p->frag = KPR_FRAG_NONE;

#pragma unroll
	for (i = 0; i < KPR_IPV6_MAX_EXT; i++) {
		__u8 ext[8]; /* next header, length, and (fragment) offset and id */

		if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP)
			break;
		if (nexthdr != KPR_NEXTHDR_HOP && nexthdr != KPR_NEXTHDR_ROUTING &&
		    nexthdr != KPR_NEXTHDR_DEST && nexthdr != KPR_NEXTHDR_AUTH &&
		    nexthdr != KPR_NEXTHDR_FRAGMENT)
			return KPR_PARSE_SKIP; /* ICMPv6, ESP, no next header, ... */
		if (bpf_skb_load_bytes(skb, off, ext, 8) < 0)
			return KPR_PARSE_TRUNC;
		if (nexthdr == KPR_NEXTHDR_FRAGMENT) {
			__u16 fo = bpf_ntohs(*(__be16 *)&ext[2]);

			p->frag_id = *(__be32 *)&ext[4];
			if (fo & KPR_IP6_OFFMASK)
				p->frag = KPR_FRAG_LATER;
			else if (fo & KPR_IP6_MF)
				p->frag = KPR_FRAG_FIRST;
			off += 8;
		} else if (nexthdr == KPR_NEXTHDR_AUTH) {
			off += (ext[1] + 2) * 4; /* RFC 4302: length in 4-byte units, minus 2 */
		} else {
			off += (ext[1] + 1) * 8; /* RFC 8200: length in 8-byte units, minus 1 */
		}
		nexthdr = ext[0];
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
		return KPR_PARSE_SKIP;
	p->proto = nexthdr;
	p->l4_off = off;
	p->l3_len = off - sizeof(struct ethhdr);
	if (p->frag == KPR_FRAG_LATER)
		return KPR_PARSE_OK;
	if (p->frag == KPR_FRAG_NONE)
		p->frag_id = 0;
	return kpr_parse_l4(skb, p);
}

static __always_inline int kpr_parse(struct __sk_buff *skb, struct kpr_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return KPR_PARSE_SKIP; /* runt frame: not even Ethernet */
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return kpr_parse_ipv4(skb, p);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return kpr_parse_ipv6(skb, p);
	return KPR_PARSE_SKIP;
}

static __always_inline void kpr_frag_key(const struct kpr_pkt *p, struct kpr_frag_key *k)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->frag_id;
	k->proto = p->proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
}

/* Later fragment: recover the ports its first fragment carried. Returns 0 when the
 * packet has usable ports, -1 for a later fragment whose first one was not seen (or
 * was not service traffic). */
static __always_inline int kpr_frag_recover(struct kpr_pkt *p)
{
	struct kpr_frag_key k;
	struct kpr_frag_ports *ports;

	if (p->frag != KPR_FRAG_LATER)
		return 0;
	kpr_frag_key(p, &k);
	ports = frags.lookup(&k);
	if (!ports)
		return -1;
	p->sport = ports->sport;
	p->dport = ports->dport;
	return 0;
}

/* First fragment of service traffic: remember its ports for the later fragments.
 * Called before any rewrite, so the key holds the addresses the fragments carry. */
static __always_inline void kpr_frag_remember(const struct kpr_pkt *p)
{
	struct kpr_frag_key k;
	struct kpr_frag_ports v = {};

	if (p->frag != KPR_FRAG_FIRST)
		return;
	kpr_frag_key(p, &k);
	v.sport = p->sport;
	v.dport = p->dport;
	frags.update(&k, &v);
}

#endif /* KPR_PARSE_H */
