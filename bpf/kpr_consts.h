/* SPDX-License-Identifier: GPL-2.0 */
/* Constants shared by the BPF programs and (parsed from this file) the controller.
 *
 * The controller reads `enum kpr_stat` and the KPR_SVC_F_* / KPR_CFG_F_* / KPR_SCOPE_*
 * values from this file by name, so this file is their single source of truth. The
 * stats enum is append-only: its order is the stats map index.
 */
#ifndef KPR_CONSTS_H
#define KPR_CONSTS_H

/* Map sizes: the controller passes -D overrides from its config. */
#ifndef KPR_MAX_SERVICES
#define KPR_MAX_SERVICES 65536
#endif
#ifndef KPR_MAX_SLOTS
#define KPR_MAX_SLOTS 262144
#endif
#ifndef KPR_MAX_BACKENDS
#define KPR_MAX_BACKENDS 131072
#endif
#ifndef KPR_MAX_CT
#define KPR_MAX_CT 262144
#endif
#ifndef KPR_MAX_HALF_OPEN
#define KPR_MAX_HALF_OPEN 65536
#endif
#ifndef KPR_MAX_FRAG
#define KPR_MAX_FRAG 8192
#endif
#ifndef KPR_MAX_AFFINITY
#define KPR_MAX_AFFINITY 65536
#endif
#ifndef KPR_MAX_SRC_RANGES
#define KPR_MAX_SRC_RANGES 16384
#endif
#ifndef KPR_MAX_NODE_ADDRS
#define KPR_MAX_NODE_ADDRS 256
#endif
#ifndef KPR_MAX_LOCAL_CIDRS
#define KPR_MAX_LOCAL_CIDRS 64
#endif
#ifndef KPR_MAX_MAGLEV
#define KPR_MAX_MAGLEV 1024
#endif
/* Entries of a Maglev table: a prime, about 100 x the largest backend count, so each
 * backend's share stays within ~1% of 1/n (Maglev paper, section 3.4). */
#ifndef KPR_MAGLEV_SIZE
#define KPR_MAGLEV_SIZE 16381
#endif

/* Directory on bpffs where maps are pinned, e.g. "/sys/fs/bpf/kpr/default". */
#ifndef KPR_PIN_DIR
#define KPR_PIN_DIR "/sys/fs/bpf/kpr/default"
#endif

/* The clock of conntrack and affinity (kpr_now): jiffies when the controller found
 * the kernel's tick rate (-DKPR_HZ=CONFIG_HZ), else the tick-granular nanosecond
 * clock. Lifetimes are seconds and refreshes one a second, so a tick's granularity
 * changes nothing. */
#ifndef KPR_HZ
#define KPR_HZ 0
#endif
#if KPR_HZ
#define KPR_TICKS_PER_SEC ((__u64)KPR_HZ)
#else
#define KPR_TICKS_PER_SEC 1000000000ULL
#endif

/* Conntrack lifetimes, in seconds; the controller passes kube-proxy's
 * conntrack.tcpEstablishedTimeout (24 h) and conntrack.tcpCloseWaitTimeout (1 h),
 * so an idle flow stays put as long as netfilter keeps it under kube-proxy. A
 * flow that saw a FIN may be half closed (one side still sending): it keeps the
 * close-wait lifetime. One ended by an RST keeps netfilter's CLOSE timeout, 10 s.
 * Datagram flows: 60 s (Cilium's bpf/lib/conntrack.h default). */
#ifndef KPR_CT_TCP_SECS
#define KPR_CT_TCP_SECS 86400
#endif
#ifndef KPR_CT_CLOSE_WAIT_SECS
#define KPR_CT_CLOSE_WAIT_SECS 3600
#endif
#define KPR_CT_LIFETIME_TCP ((__u64)KPR_CT_TCP_SECS * KPR_TICKS_PER_SEC)
#define KPR_CT_LIFETIME_FIN ((__u64)KPR_CT_CLOSE_WAIT_SECS * KPR_TICKS_PER_SEC)
#define KPR_CT_LIFETIME_NONTCP (60ULL * KPR_TICKS_PER_SEC)
#define KPR_CT_LIFETIME_CLOSING (10ULL * KPR_TICKS_PER_SEC)
/* Both sides sent a FIN: what remains is the last ACK and retransmissions, which
 * netfilter keeps for TIME_WAIT (nf_conntrack_tcp_timeout_time_wait, 120 s; kube-proxy
 * leaves it). Without it a closed flow held its entry for the close-wait hour. */
#define KPR_CT_LIFETIME_CLOSED (120ULL * KPR_TICKS_PER_SEC)
/* A half-open TCP flow (SYN seen, handshake not complete): netfilter's SYN_RECV
 * timeout, 60 s. */
#define KPR_CT_LIFETIME_SYN (60ULL * KPR_TICKS_PER_SEC)

/* struct kpr_ho_key.kind: which of a half-open flow's entries a half_open key is */
#define KPR_HO_CT 1     /* client -> frontend: the conntrack value */
#define KPR_HO_REVNAT 2 /* backend -> client: the frontend (as revnat) */
#define KPR_HO_SNAT 3   /* client -> backend: the masquerade source (as snat) */
#define KPR_HO_UNSNAT 4 /* backend -> masquerade address: the client (as unsnat) */
/* last_seen is refreshed at most this often, to keep per-packet writes off the
 * shared cache line of a busy flow. */
#define KPR_CT_REFRESH (1ULL * KPR_TICKS_PER_SEC)

/* Masquerade source ports: the client's own port first, then this many random
 * tries in [KPR_SNAT_PORT_MIN, 65535] (kube-proxy's MASQUERADE --random-fully
 * picks at random too). */
#define KPR_SNAT_TRIES 16
#define KPR_SNAT_PORT_MIN 1024

/* struct kpr_ct_value.flags */
#define KPR_CT_F_CLOSING 0x1 /* a FIN or RST was seen from the client */
#define KPR_CT_F_RST 0x2     /* ... and it was an RST: the flow has ended */
#define KPR_CT_F_EXTERN 0x4  /* netfilter's conntrack translates this flow, handed over
			      * by a datapath switch (controller/datapaths/ebpf/handover.py):
			      * its packets pass untouched */
#define KPR_CT_F_HOLD 0x8    /* the flow is between the two datapaths' tables for a few
			      * syscalls: its packets are dropped (the sender retransmits),
			      * never sent where neither table translates them */
#define KPR_CT_F_FIN_REPLY 0x10 /* a FIN was seen from the backend (at egress, on its
				 * way to the client); with CLOSING the flow is closed */

/* kpr_ct_forward's verdicts */
#define KPR_CT_NEW 0  /* no usable entry: balance the packet as a new flow */
#define KPR_CT_HIT 1  /* the flow's backend is in *f */
#define KPR_CT_PASS 2 /* KPR_CT_F_EXTERN: leave the packet to netfilter */
#define KPR_CT_HOLD 3 /* KPR_CT_F_HOLD: drop it */

/* struct kpr_backend.flags */
#define KPR_BE_F_GONE 0x1 /* released: no new flow, no affinity, no datagram flow; the
			   * TCP flows bound to it (id and generation) keep it */

/* struct kpr_svc_key.scope */
#define KPR_SCOPE_EXTERNAL 0 /* the entry clients use */
#define KPR_SCOPE_INTERNAL 1 /* external Local frontend: cluster backends for in-cluster clients */

/* struct kpr_svc_value.flags */
#define KPR_SVC_F_EXTERNAL 0x1    /* NodePort, LoadBalancer IP or externalIP */
#define KPR_SVC_F_LOCAL 0x2       /* traffic policy Local: node-local backends only */
#define KPR_SVC_F_AFFINITY 0x4    /* sessionAffinity ClientIP */
#define KPR_SVC_F_SRC_RANGES 0x8  /* loadBalancerSourceRanges: check src_ranges */
#define KPR_SVC_F_DROP_EMPTY 0x10 /* no backend: drop (Local, endpoints elsewhere), not reject */
#define KPR_SVC_F_MAGLEV 0x20     /* Maglev: the flow hash picks from maglev */
#define KPR_SVC_F_INTERNAL 0x40   /* has a KPR_SCOPE_INTERNAL twin for in-cluster clients */
/* A datapath switch in progress (controller/datapaths/ebpf/handover.py): netfilter
 * owns the flows it has. PASS_NEW: every packet without a conntrack entry here is
 * left to it (the flows are being handed to netfilter). SYN_ONLY: only a TCP SYN
 * opens a flow here; other packets without an entry are left to it (the flows are
 * being taken from netfilter). */
#define KPR_SVC_F_PASS_NEW 0x80
#define KPR_SVC_F_SYN_ONLY 0x100

/* struct kpr_config.flags */
#define KPR_CFG_F_MASQ_ALL 0x1     /* masqueradeAll */
#define KPR_CFG_F_DETECT_LOCAL 0x2  /* local_cidrs holds IPv4 cluster CIDRs */
#define KPR_CFG_F_DETECT_LOCAL6 0x4 /* local_cidrs holds IPv6 cluster CIDRs */

/* node_addrs value bits */
#define KPR_ADDR_F_NODEPORT 0x1 /* NodePorts answer on this address */

/* struct kpr_pkt.frag */
#define KPR_FRAG_NONE 0  /* not fragmented */
#define KPR_FRAG_FIRST 1 /* offset 0, more-fragments set: carries the L4 header */
#define KPR_FRAG_LATER 2 /* offset > 0: no L4 header, ports come from the frag map */

/* Largest L4 header offset a rewrite accepts (a bound the verifier needs for the
 * variable offset): Ethernet + IPv6 + KPR_IPV6_MAX_EXT extension headers of at most
 * 2,048 bytes each fit below it. */
#define KPR_MAX_L4_OFF 16384

/* TCP flag bits in byte 13 of the TCP header. */
#define KPR_TCP_FIN 0x01
#define KPR_TCP_SYN 0x02
#define KPR_TCP_RST 0x04
#define KPR_TCP_ACK 0x10

/* Per-CPU counters in the `stats` map. Append only (see file comment). */
/* lb_state flags (kpr_maps.h) */
#define KPR_STATE_F_COEXIST 0x1 /* another build's programs may run on some interfaces */

/* ct_prev slots (kpr_maps.h) */
#define KPR_PREV_IMPORT 0 /* an upgrade: the previous layout's live conntrack */
#define KPR_PREV_EXPORT 1 /* a rollback export: the conntrack left for the older kpr */

enum kpr_stat {
	KPR_STAT_INGRESS_PKTS = 0,  /* TCP/UDP packets seen at ingress */
	KPR_STAT_EGRESS_PKTS,       /* TCP/UDP packets seen at egress */
	KPR_STAT_DNAT,              /* packets translated to a backend */
	KPR_STAT_REVNAT,            /* replies translated back to the service address */
	KPR_STAT_NEW_FLOW,          /* backends chosen for a new flow */
	KPR_STAT_CT_HIT,            /* packets that reused their flow's backend */
	KPR_STAT_CT_STALE,          /* flows whose backend was gone: chosen again */
	KPR_STAT_DROP_NO_BACKEND,   /* Local policy, no local backend: dropped */
	KPR_STAT_DROP_NAT_FAIL,     /* a helper failed while rewriting: dropped */
	KPR_STAT_CT_FULL,           /* a conntrack or NAT map insert failed */
	KPR_STAT_FRAG_MISS,         /* non-first fragment with no tracked first fragment */
	KPR_STAT_TRUNCATED,         /* headers shorter than they claim: passed untouched */
	KPR_STAT_REJECT,            /* no endpoints or undefined port: ICMP unreachable sent */
	KPR_STAT_DROP_SOURCE_RANGE, /* source outside loadBalancerSourceRanges: dropped */
	KPR_STAT_SNAT,              /* packets masqueraded (egress) */
	KPR_STAT_UNSNAT,            /* replies to a masquerade address restored (ingress) */
	KPR_STAT_DROP_SNAT_PORTS,   /* no free masquerade port found: dropped */
	KPR_STAT_AFFINITY_HIT,      /* new flows that kept their client's backend */
	KPR_STAT_SOCK_LB,           /* connect/sendmsg translated by the socket programs */
	KPR_STAT_CT_RECLAIM,        /* an ended flow's reply-side entries met another flow
				     * on its tuple: removed, the packet left untouched */
	KPR_STAT_CT_EXTERN,         /* packets of flows netfilter translates (a datapath
				     * switch in progress): left untouched */
	KPR_STAT_CT_HOLD,           /* packets of a flow in mid handover: dropped */
	KPR_STAT_CT_HALF_OPEN,      /* TCP flows opened by a SYN: kept in half_open */
	KPR_STAT_CT_PROMOTE,        /* half-open flows whose handshake completed: moved to
				     * conntrack */
	KPR_STAT_CT_IMPORT,         /* flows found in the previous layout's conntrack (an
				     * upgrade in progress): converted into conntrack */
	KPR_STAT_CT_EXPORT,         /* new flows written to the previous layout's conntrack
				     * too (a rollback export in progress) */
	KPR_STAT_MAX,
};

#endif /* KPR_CONSTS_H */
