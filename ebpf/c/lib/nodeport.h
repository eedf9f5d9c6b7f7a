/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The NodePort decision shared by the tc (tc_nodeport.c) and XDP (xdp_nodeport.c) programs, so
 * both paths agree on every flow: parsing, the flow hash, and the choice of a backend for a
 * packet to a service frontend, with the conntrack and reverse-NAT entries it creates. How the
 * packet is then rewritten differs per attach point and stays in the entry files.
 *
 * Choice: an existing conntrack entry wins, else ClientIP affinity (or the terminating fallback)
 * through lb_pick, else the service's Maglev table (stable when backends change).
 */
#ifndef KEEL_NODEPORT_H
#define KEEL_NODEPORT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "conntrack.h"
#include "lb.h"

/* Affinity clients of the NodePort path are addresses; bit 63 keeps them apart from netns
 * cookies. */
#define KEEL_TC_CLIENT_TAG (1ULL << 63)

static __always_inline __u32 flow_hash(const struct keel_ct_key *k)
{
	/* Jenkins-style mix; stable per flow, which is all Maglev needs. */
	__u32 h = k->saddr ^ (k->daddr * 0x9e3779b1u);

	h ^= ((__u32)k->sport << 16 | k->dport) + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= k->proto;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* The flow of an Ethernet + IPv4 TCP/UDP frame without IP options or fragment offset, from
 * direct packet access (skb->data or xdp_md->data); -1 for anything else. */
static __always_inline int np_parse_flow(void *data, void *data_end, struct keel_ct_key *ct)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__be16 *ports;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return -1;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	if (ip->frag_off & bpf_htons(0x1fff))
		return -1; /* later fragments carry no ports */
	ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return -1;
	ct->saddr = ip->saddr;
	ct->daddr = ip->daddr;
	ct->sport = ports[0];
	ct->dport = ports[1];
	ct->proto = ip->protocol;
	return 0;
}

/* np_choose's verdicts. */
#define NP_NOT_SERVICE 0 /* no frontend (nor conntrack entry) for this flow */
#define NP_FORWARD 1     /* DNAT to target */
#define NP_REJECT 2      /* a frontend without backends (not counted yet: the caller counts) */
#define NP_SNAT 3        /* the flow needs masquerade and the caller asked to leave those alone */
#define NP_REPLY 4       /* a backend's reply (reverse-NAT entry), when the caller asked */

struct np_target {
	__be32 addr;
	__be16 port;
	__u16 ct_flags; /* KEEL_CT_F_* of the flow */
	__u32 svc_id;
	__u32 created; /* this packet opened the flow (its conntrack entry is new) */
};

/*
 * Decides the flow `ct` (client -> frontend). A new flow to a frontend with a backend gets its
 * conntrack entry (flagged KEEL_CT_F_SNAT unless the service keeps the client address) and the
 * reverse-NAT entry of its replies, and is counted as a connect.
 *
 * `no_snat`: return NP_SNAT, creating and counting nothing, for a flow that needs masquerade
 * (a new flow of a service without KEEL_SVC_F_LOCAL_ONLY, or a conntrack entry flagged
 * KEEL_CT_F_SNAT): the XDP program forwards past netfilter, which would skip the masquerade,
 * so it leaves such flows to tc.
 *
 * `replies`: a flow without conntrack entry that has a reverse-NAT entry (a backend's reply) is
 * NP_REPLY, nothing created. For a caller that leaves replies alone (XDP): looked up only after
 * the conntrack miss, so a packet of a known flow costs one hash lookup.
 *
 * Times are CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns: no clock read, one tick of
 * resolution, plenty for conntrack ages), and a conntrack hit writes its entry at most once a
 * tick: packets of a flow on several CPUs do not bounce its cache line.
 */
static __always_inline int np_choose(const struct keel_ct_key *ct, struct np_target *t,
				     int no_snat, int replies)
{
	struct keel_svc_key sk = {};
	struct keel_ct_val nv = {};
	struct keel_ct_key rk = {};
	struct keel_nat_val rv = {};
	struct keel_maglev_key mk = {};
	struct keel_l4addr *be = NULL;
	struct keel_svc_val *svc;
	struct keel_ct_val *cv;
	__u32 *id, n, backend_id = 0;

	cv = bpf_map_lookup_elem(&keel_ct, ct);
	if (cv) {
		if (no_snat && (cv->flags & KEEL_CT_F_SNAT))
			return NP_SNAT;
		__u64 now = bpf_ktime_get_coarse_ns();

		if (cv->last_seen_ns != now)
			cv->last_seen_ns = now;
		t->addr = cv->backend_addr;
		t->port = cv->backend_port;
		t->ct_flags = cv->flags;
		t->svc_id = cv->svc_id;
		return NP_FORWARD;
	}
	if (replies && bpf_map_lookup_elem(&keel_tc_revnat, ct))
		return NP_REPLY;

	__builtin_memcpy(sk.addr, &ct->daddr, 4);
	sk.port = ct->dport;
	sk.proto = ct->proto;
	sk.family = KEEL_AF_INET;
	svc = lb_lookup_service(&sk);
	if (!svc)
		return NP_NOT_SERVICE;
	t->svc_id = svc->svc_id;
	t->ct_flags = (svc->flags & KEEL_SVC_F_LOCAL_ONLY) ? 0 : KEEL_CT_F_SNAT;
	if (no_snat && t->ct_flags)
		return NP_SNAT;
	n = svc->ready ? svc->ready : svc->terminating;
	if (n == 0)
		return NP_REJECT;
	if (svc->affinity_timeout || svc->ready == 0) {
		/* Affinity (client = source address) and the terminating fallback share the
		 * socket path's choice. */
		be = lb_pick(svc, KEEL_TC_CLIENT_TAG | ct->saddr, &backend_id);
	} else {
		mk.svc_id = svc->svc_id;
		mk.idx = flow_hash(ct) % KEEL_MAGLEV_M;
		id = bpf_map_lookup_elem(&keel_maglev, &mk);
		if (id) {
			backend_id = *id;
			be = lb_backend(backend_id);
		}
	}
	if (!be || be->family != KEEL_AF_INET)
		return NP_REJECT;
	lb_count(svc->svc_id, LB_STAT_CONNECT);
	t->created = 1;
	__builtin_memcpy(&t->addr, be->addr, 4);
	t->port = be->port;
	nv.backend_addr = t->addr;
	nv.backend_port = t->port;
	nv.flags = t->ct_flags;
	nv.svc_id = svc->svc_id;
	nv.last_seen_ns = bpf_ktime_get_coarse_ns();
	bpf_map_update_elem(&keel_ct, ct, &nv, BPF_ANY);
	rk.saddr = t->addr;
	rk.daddr = ct->saddr;
	rk.sport = t->port;
	rk.dport = ct->sport;
	rk.proto = ct->proto;
	rv.addr = ct->daddr;
	rv.port = ct->dport;
	bpf_map_update_elem(&keel_tc_revnat, &rk, &rv, BPF_ANY);
	return NP_FORWARD;
}

#endif /* KEEL_NODEPORT_H */
