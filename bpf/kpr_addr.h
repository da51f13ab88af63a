/* SPDX-License-Identifier: GPL-2.0 */
/* union kpr_addr helpers: both families in one 16-byte form (see kpr_structs.h). */
#ifndef KPR_ADDR_H
#define KPR_ADDR_H

#include "kpr_structs.h"

/* ::ffff:0:0/96, the IPv4-mapped prefix; w[2] of every mapped address. */
#define KPR_V4MAPPED_W2 bpf_htonl(0x0000ffff)

static __always_inline void kpr_addr_from_v4(union kpr_addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = KPR_V4MAPPED_W2;
	a->w[3] = v4;
}

static __always_inline void kpr_addr_from_v6(union kpr_addr *a, const __be32 *v6)
{
	a->w[0] = v6[0];
	a->w[1] = v6[1];
	a->w[2] = v6[2];
	a->w[3] = v6[3];
}

static __always_inline int kpr_addr_eq(const union kpr_addr *a, const union kpr_addr *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) |
		(a->w[3] ^ b->w[3])) == 0;
}

static __always_inline int kpr_addr_is_v4mapped(const union kpr_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == KPR_V4MAPPED_W2;
}

static __always_inline int kpr_addr_is_zero(const union kpr_addr *a)
{
	return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

/* The unspecified address of the family (a NodePort's frontend address). */
static __always_inline void kpr_addr_unspec(union kpr_addr *a, __u8 family)
{
	if (family == 4) {
		kpr_addr_from_v4(a, 0);
	} else {
		a->w[0] = 0;
		a->w[1] = 0;
		a->w[2] = 0;
		a->w[3] = 0;
	}
}

/* Fold an address into a 32-bit hash state (for kpr_flow_hash). */
static __always_inline __u32 kpr_addr_mix(const union kpr_addr *a)
{
	return a->w[0] ^ (a->w[1] * 0x9e3779b1U) ^ (a->w[2] * 0x85ebca6bU) ^
	       (a->w[3] * 0xc2b2ae35U);
}

#endif /* KPR_ADDR_H */
