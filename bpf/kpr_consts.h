/* SPDX-License-Identifier: GPL-2.0 */
/* Constants shared by the BPF programs and (parsed from this file) the controller.
 *
 * The controller reads `enum kpr_stat` from this file by name, so the order here is
 * the single source of truth for the stats map index: append, never reorder.
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
#ifndef KPR_MAX_FRAG
#define KPR_MAX_FRAG 8192
#endif

/* Directory on bpffs where maps are pinned, e.g. "/sys/fs/bpf/kpr/default". */
#ifndef KPR_PIN_DIR
#define KPR_PIN_DIR "/sys/fs/bpf/kpr/default"
#endif

/* Conntrack lifetimes, in nanoseconds of CLOCK_MONOTONIC (bpf_ktime_get_ns).
 * Values follow Cilium's defaults (bpf/lib/conntrack.h): long enough for idle TCP
 * sessions, short for datagrams and for TCP after FIN/RST. */
#define KPR_NSEC_PER_SEC 1000000000ULL
#define KPR_CT_LIFETIME_TCP (21600ULL * KPR_NSEC_PER_SEC)
#define KPR_CT_LIFETIME_NONTCP (60ULL * KPR_NSEC_PER_SEC)
#define KPR_CT_LIFETIME_CLOSING (10ULL * KPR_NSEC_PER_SEC)
/* last_seen is refreshed at most this often, to keep per-packet writes off the
 * shared cache line of a busy flow. */
#define KPR_CT_REFRESH_NS (1ULL * KPR_NSEC_PER_SEC)

/* struct kpr_ct_value.flags */
#define KPR_CT_F_CLOSING 0x1 /* a FIN or RST was seen from the client */

/* struct kpr_svc_key.scope */
#define KPR_SCOPE_EXTERNAL 0 /* the entry every client uses */
#define KPR_SCOPE_INTERNAL 1 /* reserved: in-cluster view when traffic policies differ */

/* struct kpr_pkt4.frag */
#define KPR_FRAG_NONE 0  /* not fragmented */
#define KPR_FRAG_FIRST 1 /* offset 0, more-fragments set: carries the L4 header */
#define KPR_FRAG_LATER 2 /* offset > 0: no L4 header, ports come from the frag map */

/* TCP flag bits in byte 13 of the TCP header. */
#define KPR_TCP_FIN 0x01
#define KPR_TCP_SYN 0x02
#define KPR_TCP_RST 0x04
#define KPR_TCP_ACK 0x10

/* Per-CPU counters in the `stats` map. Append only (see file comment). */
enum kpr_stat {
	KPR_STAT_INGRESS_PKTS = 0,  /* IPv4 TCP/UDP packets seen at ingress */
	KPR_STAT_EGRESS_PKTS,       /* IPv4 TCP/UDP packets seen at egress */
	KPR_STAT_DNAT,              /* packets translated to a backend */
	KPR_STAT_REVNAT,            /* replies translated back to the service address */
	KPR_STAT_NEW_FLOW,          /* backends chosen for a new flow */
	KPR_STAT_CT_HIT,            /* packets that reused their flow's backend */
	KPR_STAT_CT_STALE,          /* flows whose backend was gone: chosen again */
	KPR_STAT_DROP_NO_BACKEND,   /* service with no usable backend: dropped */
	KPR_STAT_DROP_NAT_FAIL,     /* a helper failed while rewriting: dropped */
	KPR_STAT_CT_FULL,           /* a conntrack or reverse-NAT insert failed */
	KPR_STAT_FRAG_MISS,         /* non-first fragment with no tracked first fragment */
	KPR_STAT_TRUNCATED,         /* headers shorter than they claim: passed untouched */
	KPR_STAT_MAX,
};

#endif /* KPR_CONSTS_H */
