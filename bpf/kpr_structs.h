/* SPDX-License-Identifier: GPL-2.0 */
/* Map keys and values. Declared once here: bcc derives the Python ctypes types from
 * these declarations, so the controller never redeclares a layout by hand.
 *
 * Rules: fixed-width types, network byte order where the packet has it (the field
 * says so), explicit padding so that every byte of a key is initialised (hash keys
 * compare all bytes), no bitfields.
 */
#ifndef KPR_STRUCTS_H
#define KPR_STRUCTS_H

/* services4 key: one frontend of a Service. */
struct kpr_svc4_key {
	__be32 vip;   /* service IPv4 address, network order */
	__be16 port;  /* service port, network order */
	__u8 proto;   /* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8 scope;   /* KPR_SCOPE_* */
};

/* services4 value. */
struct kpr_svc_value {
	__u32 svc_id;           /* controller-allocated id; keys backend_slots */
	__u16 count;            /* slots [0, count) hold the backends for new flows */
	__u16 local_count;      /* reserved: node-local backends, for traffic policies */
	__u16 flags;            /* reserved: KPR_SVC_F_* */
	__u16 pad;              /* explicit padding, always 0 */
	__u32 affinity_timeout; /* reserved: ClientIP affinity, seconds; 0 = off */
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
	__u8 flags;  /* reserved: KPR_BE_F_* (terminating, local) */
};

/* A flow's 5-tuple as seen on the wire. Keys `ct4` with the client's original tuple
 * (client -> VIP) and `revnat4` with the reply tuple (backend -> client). */
struct kpr_tuple4 {
	__be32 saddr; /* source address, network order */
	__be32 daddr; /* destination address, network order */
	__be16 sport; /* source port, network order */
	__be16 dport; /* destination port, network order */
	__u8 proto;   /* IP protocol */
	__u8 pad[3];  /* explicit padding, always 0 */
};

/* ct4 value: the backend a flow was given. */
struct kpr_ct_value {
	__u64 last_seen;  /* bpf_ktime_get_ns() of the last refresh */
	__u32 backend_id; /* key into backends4 */
	__u32 svc_id;     /* service the flow was balanced for */
	__u16 flags;      /* KPR_CT_F_* */
	__u16 pad[3];     /* explicit padding, always 0 */
};

/* revnat4 value: what to write back into the source of a reply. */
struct kpr_revnat4 {
	__be32 vip;   /* service address the client used, network order */
	__be16 port;  /* service port the client used, network order */
	__u16 pad;    /* explicit padding, always 0 */
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
	__u8 pad;        /* explicit padding */
	__u16 l4_off;    /* offset of the L4 header from the start of the frame */
	__be16 ip_id;    /* IPv4 identification field */
	__u16 l4_csum;   /* L4 checksum as found; 0 on UDP means "no checksum" */
	__u16 pad2;      /* explicit padding */
};

#endif /* KPR_STRUCTS_H */
