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

/* RFC 1624 eqn. 3: the 16-bit one's complement checksum `check` after a 32-bit
 * word of what it covers changed from `from` to `to`. The arithmetic is the same in
 * either byte order (RFC 1071 section 2), so raw network-order words go in as they
 * are. It is the kernel's csum_replace4(), which bpf_l3_csum_replace calls; the IPv4
 * header checksum is always complete (never CHECKSUM_PARTIAL), so the helper does
 * nothing more for it. */
static __always_inline __u16 kpr_csum_replace4(__u16 check, __be32 from, __be32 to)
{
	__u32 s = (__u16)~check;

	s += (~from & 0xffff) + (~from >> 16);
	s += (to & 0xffff) + (to >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Fix the L4 checksum for an address change (the pseudo header) and a port change.
 * Only a helper can do this: it alone sees skb->ip_summed, and a CHECKSUM_PARTIAL
 * checksum (veth, local senders with offload) takes the address change but not the
 * port's, while a complete one takes both and CHECKSUM_COMPLETE's skb->csum takes
 * the address change's (inet_proto_csum_replace4, net/core/utils.c). */
static __always_inline int kpr_nat_l4_csum(struct __sk_buff *skb, const struct kpr_pkt *p,
					   int addr_changed, int port_changed, __u64 flags,
					   const union kpr_addr *from, const union kpr_addr *to,
					   __be16 old_port, __be16 new_port)
{
	__u32 off = kpr_l4_csum_off(p);
	int ret;

	if (addr_changed) {
		if (p->family == 4) {
			ret = bpf_l4_csum_replace(skb, off, from->w[3], to->w[3],
						  flags | BPF_F_PSEUDO_HDR | sizeof(__be32));
		} else {
			union kpr_addr old = *from;
			union kpr_addr new = *to;
			__s64 diff = bpf_csum_diff(old.w, sizeof(old), new.w, sizeof(new), 0);

			if (diff < 0)
				return (int)diff;
			/* size 0: `to` is a checksum difference (bpf_l4_csum_replace). */
			ret = bpf_l4_csum_replace(skb, off, 0, (__u32)diff,
						  flags | BPF_F_PSEUDO_HDR);
		}
		if (ret < 0)
			return ret;
	}
	if (port_changed)
		return bpf_l4_csum_replace(skb, off, old_port, new_port, flags | sizeof(__be16));
	return 0;
}

/* Write the new address (and the IPv4 header checksum) and port into the packet.
 * Direct writes, not bpf_skb_store_bytes: the helper's call, its
 * skb_ensure_writable and its memcpy cost more than the rewrite itself, and a tc
 * program that writes packet data gets its head made writable once, by the
 * verifier's prologue (bpf_unclone_prologue). Runs after the checksum helpers,
 * which may move the data (packet pointers are reloaded here). A port past the
 * linear area (a paged skb) goes through the helper. */
static __always_inline int kpr_nat_store(struct __sk_buff *skb, const struct kpr_pkt *p,
					 int dnat, int addr_changed, int port_changed,
					 const union kpr_addr *from, const union kpr_addr *to,
					 __be16 new_port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 port_off = p->l4_off + (dnat ? 2 : 0); /* sport at 0, dport at 2 (TCP, UDP) */
	__be16 *port;

	if (addr_changed) {
		if (p->family == 4) {
			struct iphdr *ip = data + sizeof(struct ethhdr);

			if ((void *)(ip + 1) > data_end)
				return -1;
			if (dnat)
				ip->daddr = to->w[3];
			else
				ip->saddr = to->w[3];
			ip->check = kpr_csum_replace4(ip->check, from->w[3], to->w[3]);
		} else {
			struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
			__be32 *a;

			if ((void *)(ip6 + 1) > data_end)
				return -1;
			a = dnat ? ip6->daddr.in6_u.u6_addr32 : ip6->saddr.in6_u.u6_addr32;
			a[0] = to->w[0];
			a[1] = to->w[1];
			a[2] = to->w[2];
			a[3] = to->w[3];
		}
	}
	if (!port_changed)
		return 0;
	/* bound the offset for the verifier: headers end well before KPR_MAX_L4_OFF */
	if (port_off > KPR_MAX_L4_OFF)
		return -1;
	port = data + port_off;
	if ((void *)(port + 1) <= data_end) {
		*port = new_port;
		return 0;
	}
	return bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0);
}

/* Rewrite the destination (dnat=1) or the source (dnat=0) address and port of *p.
 * Returns 0, or a negative errno from a helper. */
static __always_inline int kpr_nat_rewrite(struct __sk_buff *skb, struct kpr_pkt *p,
					   int dnat, const union kpr_addr *new_addr,
					   __be16 new_port)
{
	union kpr_addr *old_addr = dnat ? &p->daddr : &p->saddr;
	__be16 old_port = dnat ? p->dport : p->sport;
	int has_l4 = p->frag != KPR_FRAG_LATER;
	int l4_csum = has_l4 && !(p->family == 4 && p->proto == IPPROTO_UDP && p->l4_csum == 0);
	__u64 l4_flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int addr_changed = !kpr_addr_eq(old_addr, new_addr);
	int port_changed = has_l4 && old_port != new_port;
	int ret;

	if (l4_csum && (addr_changed || port_changed)) {
		ret = kpr_nat_l4_csum(skb, p, addr_changed, port_changed, l4_flags, old_addr,
				      new_addr, old_port, new_port);
		if (ret < 0)
			return ret;
	}
	ret = kpr_nat_store(skb, p, dnat, addr_changed, port_changed, old_addr, new_addr,
			    new_port);
	if (ret < 0)
		return ret;
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
