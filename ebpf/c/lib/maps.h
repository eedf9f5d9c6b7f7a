/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Keel's BPF map layouts and map definitions: the one place both live.
 *
 * Every struct here is mirrored by a #[repr(C)] Rust type in keel-ebpf (src/layout.rs); a test
 * compares sizeof/offsetof of each field, as printed by a host program built from this header
 * (build.rs), with the Rust side. Change both together. Padding is always explicit so that the
 * kernel's key comparison never sees uninitialised bytes.
 */
#ifndef KEEL_MAPS_H
#define KEEL_MAPS_H

#ifdef __bpf__
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#else
#include <linux/types.h>
#endif

#define KEEL_AF_INET 2
#define KEEL_AF_INET6 10

#define KEEL_MAX_SERVICES 65536
#define KEEL_MAX_BACKENDS 262144
#define KEEL_MAX_REVNAT 262144
#define KEEL_MAX_AFFINITY 262144

/* keel_svc_val.flags */
#define KEEL_SVC_F_NODEPORT (1u << 0)     /* key is a NodePort on a node address */
#define KEEL_SVC_F_EXTERNAL_IP (1u << 1)  /* key is an externalIP / LoadBalancer IP */
#define KEEL_SVC_F_LOCAL_ONLY (1u << 2)   /* internal/externalTrafficPolicy=Local already applied */

/* keel_l4addr.flags */
#define KEEL_BE_F_TERMINATING (1u << 0)

/* A service frontend: virtual IP (IPv4 in addr[0..4], rest zero), port and L4 protocol. */
struct keel_svc_key {
	__u8 addr[16];
	__be16 port;   /* network byte order */
	__u8 proto;    /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8 family;   /* KEEL_AF_INET / KEEL_AF_INET6 */
};

/*
 * Backends of service svc_id sit in keel_slots under (svc_id, 0 .. ready-1) for the ready ones,
 * then (svc_id, ready .. ready+terminating-1) for terminating ones, which are used only when no
 * ready backend exists.
 */
struct keel_svc_val {
	__u32 svc_id;
	__u16 ready;
	__u16 terminating;
	__u32 affinity_timeout; /* ClientIP session affinity, seconds; 0 = none */
	__u32 flags;            /* KEEL_SVC_F_* */
};

struct keel_slot_key {
	__u32 svc_id;
	__u32 slot;
};

/* An L4 address: a backend, or the original service address kept for reverse translation. */
struct keel_l4addr {
	__u8 addr[16];
	__be16 port;  /* network byte order */
	__u8 family;
	__u8 flags;   /* KEEL_BE_F_* for backends */
};

/* Reverse translation for a socket: (socket cookie, backend) -> service address. */
struct keel_revnat_key {
	__u64 cookie;
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

/* ClientIP affinity at the socket layer: the client is its network namespace. */
struct keel_affinity_key {
	__u64 client;   /* netns cookie */
	__u32 svc_id;
	__u32 pad;
};

struct keel_affinity_val {
	__u32 backend_id;
	__u32 pad;
	__u64 last_used_ns; /* bpf_ktime_get_ns() */
};

/* Per-service counters, a PERCPU_ARRAY indexed by svc_id. */
struct keel_svc_stats {
	__u64 connects;   /* TCP/UDP connect() translated */
	__u64 datagrams;  /* unconnected UDP sendmsg translated */
	__u64 refused;    /* no backend: connect refused */
};

/* --- NodePort path (tc and XDP, IPv4): conntrack, reverse NAT, Maglev --- */

/* Maglev lookup table size per service (prime). */
#define KEEL_MAGLEV_M 1021
#define KEEL_MAX_CT 524288

/* A connection as seen on the wire; for keel_tc_revnat it is the reply direction. */
struct keel_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* keel_ct_val.flags */
#define KEEL_CT_F_SNAT (1u << 0) /* the flow is masqueraded by the stack: only tc may forward it */

/* Conntrack: the backend a flow was sent to. */
struct keel_ct_val {
	__be32 backend_addr;
	__be16 backend_port;
	__u16 flags;  /* KEEL_CT_F_* */
	__u32 svc_id;
	__u32 pad2;
	__u64 last_seen_ns;
};

/* keel_xdp_fwd: how many entries per CPU (a power of two), and how long one is trusted. */
#define KEEL_XDP_FWD_SLOTS 2048
#define KEEL_XDP_FWD_NS (100ULL * 1000 * 1000)

/* The XDP NodePort program's per-CPU forwarding cache, one slot per flow hash: a flow as
 * received (before DNAT) with what else the decision took from the packet (the tag), its
 * backend (from conntrack) and bpf_fib_lookup's answer for it. Only the XDP program writes it. */
struct keel_xdp_fwd {
	struct keel_ct_key flow;
	__be32 backend_addr;
	__be16 backend_port;
	__u8 tos;
	__u8 pad;
	__u32 iif;         /* ingress ifindex */
	__u32 oif;         /* egress ifindex */
	__u8 smac[6];
	__u8 dmac[6];
	__u16 len_ok;      /* host order: the IPv4 total length the lookup passed (MTU check) */
	__u16 pad2;
	__u64 at_ns;       /* CLOCK_MONOTONIC_COARSE of the decision; 0: empty */
};

/* Reverse NAT of a reply: the service address the client used. */
struct keel_nat_val {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct keel_maglev_key {
	__u32 svc_id;
	__u32 idx; /* 0 .. KEEL_MAGLEV_M-1 */
};

#ifdef __bpf__
/* Pinned by name under the proxy's bpffs dir: a restarted proxy finds and keeps them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KEEL_MAX_SERVICES);
	__type(key, struct keel_svc_key);
	__type(value, struct keel_svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} keel_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KEEL_MAX_BACKENDS);
	__type(key, struct keel_slot_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} keel_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KEEL_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct keel_l4addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} keel_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KEEL_MAX_REVNAT);
	__type(key, struct keel_revnat_key);
	__type(value, struct keel_l4addr);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} keel_sock_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KEEL_MAX_AFFINITY);
	__type(key, struct keel_affinity_key);
	__type(value, struct keel_affinity_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} keel_sock_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KEEL_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct keel_svc_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} keel_stats SEC(".maps");
#endif /* __bpf__ */

#endif /* KEEL_MAPS_H */
