/* SPDX-License-Identifier: GPL-2.0 */
/* Packet parsing: Ethernet -> IPv4 (with options) -> TCP/UDP, fragment aware. */
#ifndef KPR_PARSE_H
#define KPR_PARSE_H

#include "kpr_consts.h"
#include "kpr_structs.h"
#include "kpr_maps.h"

#define KPR_PARSE_OK 0    /* IPv4 TCP/UDP, fields filled in */
#define KPR_PARSE_SKIP 1  /* not ours to look at (not IPv4, or another protocol) */
#define KPR_PARSE_TRUNC 2 /* the packet is shorter than its headers claim */

#define KPR_IP_MF 0x2000     /* "more fragments" in host-order frag_off */
#define KPR_IP_OFFMASK 0x1fff

static __always_inline int kpr_parse_ipv4(struct __sk_buff *skb, struct kpr_pkt4 *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl_len;
	__u16 frag_off;

	if ((void *)(eth + 1) > data_end)
		return KPR_PARSE_SKIP; /* runt frame: not even Ethernet */
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return KPR_PARSE_SKIP;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return KPR_PARSE_TRUNC;
	if (ip->version != 4 || ip->ihl < 5)
		return KPR_PARSE_TRUNC;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return KPR_PARSE_SKIP;

	/* ihl is 4 bits: the mask lets the verifier bound the variable offset. */
	ihl_len = (ip->ihl & 0xf) * 4;
	if ((void *)ip + ihl_len > data_end)
		return KPR_PARSE_TRUNC;

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->ip_id = ip->id;
	p->ihl_len = ihl_len;
	p->l4_off = sizeof(struct ethhdr) + ihl_len;

	frag_off = bpf_ntohs(ip->frag_off);
	if (frag_off & KPR_IP_OFFMASK) {
		p->frag = KPR_FRAG_LATER;
		return KPR_PARSE_OK; /* no L4 header here; ports come from frag4 */
	}
	p->frag = (frag_off & KPR_IP_MF) ? KPR_FRAG_FIRST : KPR_FRAG_NONE;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)ip + ihl_len;

		if ((void *)(tcp + 1) > data_end)
			return KPR_PARSE_TRUNC;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
		p->l4_csum = tcp->check;
	} else {
		struct udphdr *udp = (void *)ip + ihl_len;

		if ((void *)(udp + 1) > data_end)
			return KPR_PARSE_TRUNC;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->l4_csum = udp->check;
	}
	return KPR_PARSE_OK;
}

static __always_inline void kpr_frag4_key(const struct kpr_pkt4 *p, struct kpr_frag4_key *k)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->ip_id;
	k->proto = p->proto;
	k->pad = 0;
}

/* Later fragment: recover the ports its first fragment carried. Returns 0 when the
 * packet has usable ports, -1 for a later fragment whose first one was not seen (or
 * was not service traffic). */
static __always_inline int kpr_frag4_recover(struct kpr_pkt4 *p)
{
	struct kpr_frag4_key k;
	struct kpr_frag_ports *ports;

	if (p->frag != KPR_FRAG_LATER)
		return 0;
	kpr_frag4_key(p, &k);
	ports = frag4.lookup(&k);
	if (!ports)
		return -1;
	p->sport = ports->sport;
	p->dport = ports->dport;
	return 0;
}

/* First fragment of service traffic: remember its ports for the later fragments.
 * Called before any rewrite, so the key holds the addresses the fragments carry. */
static __always_inline void kpr_frag4_remember(const struct kpr_pkt4 *p)
{
	struct kpr_frag4_key k;
	struct kpr_frag_ports v = {};

	if (p->frag != KPR_FRAG_FIRST)
		return;
	kpr_frag4_key(p, &k);
	v.sport = p->sport;
	v.dport = p->dport;
	frag4.update(&k, &v);
}

#endif /* KPR_PARSE_H */
