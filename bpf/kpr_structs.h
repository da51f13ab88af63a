/* SPDX-License-Identifier: GPL-2.0 */
/* Map keys and values. Declared once here: bcc derives the Python ctypes types from
 * these declarations, so the controller never redeclares a layout by hand.
 *
 * Rules: fixed-width types, network byte order where the packet has it (the field
 * says so), explicit padding so that every byte of a key is initialised (hash keys
 * compare all bytes), no bitfields, no 8-byte member in a key (its alignment would
 * add implicit padding).
 *
 * Addresses: every map holds both families in one 16-byte union kpr_addr, an IPv4
 * address as its IPv4-mapped IPv6 form ::ffff:a.b.c.d (RFC 4291 2.5.5.2), as Katran
 * keys its flows. One set of maps and one code path serve both families; the family
 * of an entry is visible in its address (a mapped address never appears in a real
 * IPv6 header: RFC 4038 section 4.2, and the kernel drops them on input).
 *
 * A change to any struct here bumps KPR_LAYOUT in kpr_maps.h.
 */
#ifndef KPR_STRUCTS_H
#define KPR_STRUCTS_H

#include "kpr_consts.h"

/* An IPv6 address, or an IPv4 one as ::ffff:a.b.c.d (w[3] holds it). */
union kpr_addr {
	__u8 b[16];   /* network order bytes */
	__be32 w[4];  /* the same as four network-order words */
};

/* services key: one frontend of a Service. NodePorts use the unspecified address
 * of their family, :: or ::ffff:0.0.0.0 (matched only for packets to an address in
 * node_addrs). */
struct kpr_svc_key {
	union kpr_addr vip; /* service address; unspecified for a NodePort */
	__be16 port;        /* service port, network order */
	__u8 proto;         /* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8 scope;         /* KPR_SCOPE_* */
};

/* services value. */
struct kpr_svc_value {
	__u32 svc_id;           /* controller-allocated id; keys backend_slots, maglev */
	__u16 count;            /* slots [0, count) hold the backends for new flows */
	__u16 flags;            /* KPR_SVC_F_* */
	__u32 affinity_timeout; /* ClientIP affinity, seconds (with KPR_SVC_F_AFFINITY) */
	__u8 kind;              /* controller's FrontendKind; informational (kpr status) */
	__u8 pad[3];            /* explicit padding, always 0 */
};

/* backend_slots key: slot `slot` of service `svc_id`. */
struct kpr_slot_key {
	__u32 svc_id; /* kpr_svc_value.svc_id */
	__u32 slot;   /* 0 .. count-1 */
};

/* backends value, at index backend id of an array (an array lookup is inlined by
 * the verifier; a hash lookup is a call and a hash, about 24 ns here). Always of
 * its frontend's family. An id is reused once released, so whoever keeps an id
 * across packets (conntrack, affinity) keeps its generation too, and a changed
 * generation means that backend is gone. A free entry has proto 0. */
struct kpr_backend {
	union kpr_addr addr; /* backend address */
	__be16 port;         /* backend port, network order */
	__u8 proto;          /* IP protocol, as in the service key; 0: a free entry */
	__u8 flags;          /* KPR_BE_F_* */
	__u32 gen;           /* generation: differs from every earlier occupant's */
};

/* A flow's 5-tuple as seen on the wire. Keys conntrack (client -> frontend, as
 * sent), snat (client -> backend, after DNAT), unsnat (backend -> masquerade
 * address) and revnat (backend -> client). */
struct kpr_tuple {
	union kpr_addr saddr; /* source address */
	union kpr_addr daddr; /* destination address */
	__be16 sport;         /* source port, network order */
	__be16 dport;         /* destination port, network order */
	__u8 proto;           /* IP protocol */
	__u8 pad[3];          /* explicit padding, always 0 */
};

/* conntrack value: the backend a flow was given, and its masquerade source if any. */
struct kpr_ct_value {
	__u64 last_seen;          /* kpr_now() of the last refresh */
	__u32 backend_id;         /* index into backends */
	__u32 svc_id;             /* service the flow was balanced for */
	union kpr_addr snat_addr; /* masquerade source address; zero: the client's is kept */
	__be16 snat_port;         /* masquerade source port, network order */
	__u16 flags;              /* KPR_CT_F_* */
	__u32 backend_gen;        /* the backend's kpr_backend.gen when the flow chose it */
};

/* half_open key: one entry of a half-open TCP flow, a kpr_tuple with its kind in
 * what is padding there. Half-open flows live in a table of their own until their
 * handshake completes, so a SYN flood evicts only other half-open flows, never an
 * established flow's entries. */
struct kpr_ho_key {
	union kpr_addr saddr; /* as the kpr_tuple of the entry it stands for */
	union kpr_addr daddr; /* ditto */
	__be16 sport;         /* ditto, network order */
	__be16 dport;         /* ditto, network order */
	__u8 proto;           /* IPPROTO_TCP */
	__u8 kind;            /* KPR_HO_* */
	__u8 pad[2];          /* explicit padding, always 0 */
};

/* An address and port: revnat value (egress: the frontend to write back into a
 * reply's source), snat value (egress: the source to give a masqueraded flow) and
 * unsnat value (ingress: the client to give back a reply's destination). */
struct kpr_nat_addr {
	union kpr_addr addr; /* address */
	__be16 port;         /* port, network order */
	__u16 pad;           /* explicit padding, always 0 */
};

/* members key: backend `backend_id` is in service `svc_id` (value unused). Affinity
 * checks membership here, so a client never sticks to a backend its service lost. */
struct kpr_member_key {
	__u32 svc_id;     /* kpr_svc_value.svc_id */
	__u32 backend_id; /* index into backends */
};

/* half_open value, by kpr_ho_key.kind (a union: the BPF stack of 512 bytes holds
 * a few of these on the SYN path). */
union kpr_ho_value {
	struct kpr_ct_value ct;  /* KPR_HO_CT: the flow's conntrack value, moved to
				  * conntrack when the handshake completes */
	struct kpr_nat_addr nat; /* the other kinds: the revnat, snat or unsnat value */
};

/* ho_scratch value: per-CPU room for a half_open key and value under construction
 * (the BPF stack's 512 bytes cannot hold them beside the rest of kpr_ingress). */
struct kpr_ho_scratch {
	struct kpr_ho_key k;   /* a key being built or looked up */
	union kpr_ho_value v;  /* a value being built */
};

/* affinity key: one client of one ClientIP-affinity service. */
struct kpr_affinity_key {
	__u32 svc_id;          /* kpr_svc_value.svc_id */
	union kpr_addr client; /* client address */
};

/* affinity value. */
struct kpr_affinity_value {
	__u64 last_used;   /* kpr_now() when a flow last chose this backend */
	__u32 backend_id;  /* index into backends */
	__u32 backend_gen; /* the backend's kpr_backend.gen when it was chosen */
};

/* local_cidrs key (LPM trie): the pod CIDRs of detect-local (--cluster-cidr). An
 * IPv4 CIDR a.b.c.d/n is ::ffff:a.b.c.d/(96+n). */
struct kpr_lpm_key {
	__u32 prefixlen;     /* LPM prefix length, 0-128 */
	union kpr_addr addr; /* network address */
};

/* src_ranges key (LPM trie): loadBalancerSourceRanges, per service. prefixlen
 * counts the 32 bits of svc_id too, so a range only matches its own service. */
struct kpr_src_range_key {
	__u32 prefixlen;     /* 32 + the range's prefix length (mapped for IPv4) */
	__u32 svc_id;        /* kpr_svc_value.svc_id; all 32 bits are in every prefix */
	union kpr_addr addr; /* range network address */
};

/* node_config value (array of one): node-wide settings written by the controller. */
struct kpr_config {
	union kpr_addr snat4; /* IPv4 masquerade address (mapped); zero: none known */
	union kpr_addr snat6; /* IPv6 masquerade address; zero: none known */
	__u32 flags;          /* KPR_CFG_F_* */
	__u32 pad;            /* explicit padding, always 0 */
	__u64 netns_cookie;   /* the node's network namespace (socket programs' scope) */
};

/* maglev value: a service's Maglev lookup table; a flow's hash picks the entry. */
struct kpr_maglev {
	__u32 backend_ids[KPR_MAGLEV_SIZE]; /* backend ids, each at about 1/n of the entries */
};

/* sock_revnat key: a socket that the socket programs pointed at a backend. */
struct kpr_sock_key {
	__u64 cookie;        /* bpf_get_socket_cookie() */
	union kpr_addr addr; /* backend address */
	__be16 port;         /* backend port, network order */
	__u16 pad;           /* explicit padding, always 0 */
	__u32 pad2;          /* explicit padding to the 8-byte alignment, always 0 */
};

/* frags key: identifies the fragments of one datagram. */
struct kpr_frag_key {
	union kpr_addr saddr; /* source address */
	union kpr_addr daddr; /* destination address as sent (pre-NAT) */
	__be32 id;            /* identification: IPv4's 16 bits, or the fragment header's 32 */
	__u8 proto;           /* IP protocol */
	__u8 pad[3];          /* explicit padding, always 0 */
};

/* frags value: the L4 ports carried by the datagram's first fragment. */
struct kpr_frag_ports {
	__be16 sport; /* source port, network order */
	__be16 dport; /* destination port, network order */
};

/* svc_names value: "namespace/name:port" for `kpr status`; never read by programs. */
struct kpr_svc_name {
	char name[96]; /* NUL-terminated, truncated if longer */
};

/* Parsed view of one packet (stack only, never stored in a map). */
struct kpr_pkt {
	union kpr_addr saddr; /* source address (mapped for IPv4) */
	union kpr_addr daddr; /* destination address (mapped for IPv4) */
	__be16 sport;         /* L4 source port; from frags for later fragments */
	__be16 dport;         /* L4 destination port; from frags for later fragments */
	__u8 proto;           /* IP protocol (IPv6: the last next-header) */
	__u8 tcp_flags;       /* byte 13 of the TCP header, 0 otherwise */
	__u8 frag;            /* KPR_FRAG_* */
	__u8 family;          /* 4 or 6 */
	__u16 l3_len;         /* bytes of L3 headers: IPv4 with options, IPv6 with extensions */
	__u16 l4_off;         /* offset of the L4 header from the start of the frame */
	__be32 frag_id;       /* identification of a fragment, 0 otherwise */
	__u16 l4_csum;        /* L4 checksum as found; 0 on UDP/IPv4 means "no checksum" */
	__u16 pad;            /* explicit padding */
};

/* Where a flow goes (stack only): its backend and, when masqueraded, its source. */
struct kpr_fwd {
	union kpr_addr be_addr;   /* backend address */
	__be16 be_port;           /* backend port, network order */
	__u16 pad;                /* explicit padding */
	union kpr_addr snat_addr; /* masquerade address; zero: not masqueraded */
	__be16 snat_port;         /* masquerade port, network order */
	__u16 pad2;               /* explicit padding */
};

#endif /* KPR_STRUCTS_H */
