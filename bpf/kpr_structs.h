/* SPDX-License-Identifier: GPL-2.0 */
/* Map keys and values. Declared once here: bcc derives the Python ctypes types from
 * these declarations, so the controller never redeclares a layout by hand.
 *
 * Rules: fixed-width types, network byte order where the packet has it (the field
 * says so), explicit padding so that every byte of a key is initialised (hash keys
 * compare all bytes), no bitfields.
 *
 * A change to any struct here bumps KPR_LAYOUT in kpr_maps.h.
 */
#ifndef KPR_STRUCTS_H
#define KPR_STRUCTS_H

#include "kpr_consts.h"

/* services4 key: one frontend of a Service. NodePorts use vip 0 (matched only for
 * packets to an address in node_addrs4). */
struct kpr_svc4_key {
	__be32 vip;   /* service IPv4 address, network order; 0 for a NodePort */
	__be16 port;  /* service port, network order */
	__u8 proto;   /* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8 scope;   /* KPR_SCOPE_* */
};

/* services4 value. */
struct kpr_svc_value {
	__u32 svc_id;           /* controller-allocated id; keys backend_slots, maglev4 */
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

/* backends4 value, keyed by a __u32 backend id. */
struct kpr_backend4 {
	__be32 addr; /* backend IPv4 address, network order */
	__be16 port; /* backend port, network order */
	__u8 proto;  /* IP protocol, as in the service key */
	__u8 flags;  /* reserved: KPR_BE_F_*, always 0 so far */
};

/* A flow's 5-tuple as seen on the wire. Keys ct4 (client -> frontend, as sent),
 * snat4 (client -> backend, after DNAT), unsnat4 (backend -> masquerade address) and
 * revnat4 (backend -> client). */
struct kpr_tuple4 {
	__be32 saddr; /* source address, network order */
	__be32 daddr; /* destination address, network order */
	__be16 sport; /* source port, network order */
	__be16 dport; /* destination port, network order */
	__u8 proto;   /* IP protocol */
	__u8 pad[3];  /* explicit padding, always 0 */
};

/* ct4 value: the backend a flow was given, and its masquerade address if any. */
struct kpr_ct_value {
	__u64 last_seen;  /* bpf_ktime_get_ns() of the last refresh */
	__u32 backend_id; /* key into backends4 */
	__u32 svc_id;     /* service the flow was balanced for */
	__be32 snat_addr; /* masquerade source address; 0: the client's own is kept */
	__be16 snat_port; /* masquerade source port, network order */
	__u16 flags;      /* KPR_CT_F_* */
};

/* revnat4 value (egress): the frontend to write back into a reply's source. */
struct kpr_revnat4 {
	__be32 vip;  /* frontend address the client used, network order */
	__be16 port; /* frontend port the client used, network order */
	__u16 pad;   /* explicit padding, always 0 */
};

/* snat4 value (egress): the source to give a masqueraded flow's packets, and
 * unsnat4 value (ingress): the client to give back a reply's destination. */
struct kpr_nat_addr4 {
	__be32 addr; /* address, network order */
	__be16 port; /* port, network order */
	__u16 pad;   /* explicit padding, always 0 */
};

/* members4 key: backend `backend_id` is in service `svc_id` (value unused). Affinity
 * checks membership here, so a client never sticks to a backend its service lost. */
struct kpr_member_key {
	__u32 svc_id;     /* kpr_svc_value.svc_id */
	__u32 backend_id; /* key into backends4 */
};

/* affinity4 key: one client of one ClientIP-affinity service. */
struct kpr_affinity4_key {
	__u32 svc_id;  /* kpr_svc_value.svc_id */
	__be32 client; /* client address, network order */
};

/* affinity4 value. */
struct kpr_affinity_value {
	__u64 last_used;  /* bpf_ktime_get_ns() when a flow last chose this backend */
	__u32 backend_id; /* key into backends4 */
	__u32 pad;        /* explicit padding, always 0 */
};

/* local_cidrs4 key (LPM trie): the pod CIDRs of detect-local (--cluster-cidr). */
struct kpr_lpm4_key {
	__u32 prefixlen; /* LPM prefix length, 0-32 */
	__be32 addr;     /* network address, network order */
};

/* src_ranges4 key (LPM trie): loadBalancerSourceRanges, per service. prefixlen
 * counts the 32 bits of svc_id too, so a range only matches its own service. */
struct kpr_src_range4_key {
	__u32 prefixlen; /* 32 + the range's prefix length */
	__u32 svc_id;    /* kpr_svc_value.svc_id; all 32 bits are in every prefix */
	__be32 addr;     /* range network address, network order */
};

/* config4 value (array of one): node-wide settings written by the controller. */
struct kpr_config4 {
	__be32 snat_addr;   /* masquerade address (a node address); 0: none known */
	__u32 flags;        /* KPR_CFG_F_* */
	__u64 netns_cookie; /* the node's network namespace (socket programs' scope) */
};

/* maglev4 value: a service's Maglev lookup table; a flow's hash picks the entry. */
struct kpr_maglev {
	__u32 backend_ids[KPR_MAGLEV_SIZE]; /* backend ids, each at about 1/n of the entries */
};

/* sock_revnat4 key: a socket that the socket programs pointed at a backend. */
struct kpr_sock_key {
	__u64 cookie;  /* bpf_get_socket_cookie() */
	__be32 addr;   /* backend address, network order */
	__be16 port;   /* backend port, network order */
	__u16 pad;     /* explicit padding, always 0 */
};

/* frag4 key: identifies the fragments of one IPv4 datagram. */
struct kpr_frag4_key {
	__be32 saddr; /* source address, network order */
	__be32 daddr; /* destination address as sent (pre-NAT), network order */
	__be16 id;    /* IPv4 identification field */
	__u8 proto;   /* IP protocol */
	__u8 pad;     /* explicit padding, always 0 */
};

/* frag4 value: the L4 ports carried by the datagram's first fragment. */
struct kpr_frag_ports {
	__be16 sport; /* source port, network order */
	__be16 dport; /* destination port, network order */
};

/* svc_names value: "namespace/name:port" for `kpr status`; never read by programs. */
struct kpr_svc_name {
	char name[96]; /* NUL-terminated, truncated if longer */
};

/* Parsed view of one IPv4 packet (stack only, never stored in a map). */
struct kpr_pkt4 {
	__be32 saddr;    /* source address, network order */
	__be32 daddr;    /* destination address, network order */
	__be16 sport;    /* L4 source port; from frag4 for later fragments */
	__be16 dport;    /* L4 destination port; from frag4 for later fragments */
	__u8 proto;      /* IP protocol */
	__u8 tcp_flags;  /* byte 13 of the TCP header, 0 otherwise */
	__u8 frag;       /* KPR_FRAG_* */
	__u8 ihl_len;    /* IPv4 header length in bytes (20-60) */
	__u16 l4_off;    /* offset of the L4 header from the start of the frame */
	__be16 ip_id;    /* IPv4 identification field */
	__u16 l4_csum;   /* L4 checksum as found; 0 on UDP means "no checksum" */
	__u16 pad2;      /* explicit padding */
};

/* Where a flow goes (stack only): its backend and, when masqueraded, its source. */
struct kpr_fwd4 {
	__be32 be_addr;   /* backend address, network order */
	__be16 be_port;   /* backend port, network order */
	__u16 pad;        /* explicit padding */
	__be32 snat_addr; /* masquerade address; 0: not masqueraded */
	__be16 snat_port; /* masquerade port, network order */
	__u16 pad2;       /* explicit padding */
};

#endif /* KPR_STRUCTS_H */
