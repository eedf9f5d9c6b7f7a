/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The tc attach point (ingress of the node's external interface and of pod veths) for traffic
 * that did not pass a socket hook: NodePort / externalIPs / LoadBalancer IPs from outside.
 *
 * A packet from a backend that matches a reverse-NAT entry gets its source rewritten back to the
 * service address. A packet to a service frontend is DNATed to a backend: an existing conntrack
 * entry wins, else ClientIP affinity, else the service's Maglev table (stable when backends
 * change). A service without backends rejects the packet as a closed port would, and counts it
 * as refused: a TCP segment is answered by a RST, a UDP datagram by ICMP port unreachable, both
 * sent back out of the interface the packet came in on (lib/reject.h); a RST is only dropped.
 * IPv4, TCP and UDP, no IP options (anything else passes untouched).
 *
 * Unless the service keeps the client's address (externalTrafficPolicy=Local), the first packet
 * of a flow gets KEEL_MARK_SNAT: the proxy's masquerade rule (netfilter, POSTROUTING) then gives
 * it the node's source address, so the backend, maybe on another node, replies through this
 * node. That reply comes back un-masqueraded by conntrack and leaves through the external
 * interface again, where keel_tc_revnat_egress turns its source back into the service address.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/reject.h"

/* Affinity clients of the tc path are addresses; bit 63 keeps them apart from netns cookies. */
#define KEEL_TC_CLIENT_TAG (1ULL << 63)
/* skb->mark bit for the proxy's masquerade rule (mirrored as keel_ebpf::MARK_SNAT). */
#define KEEL_MARK_SNAT 0x00400000
#define IP_OFF ETH_HLEN
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)

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

static __always_inline int rewrite(struct __sk_buff *skb, int l4_csum_off, int is_udp, int ip_off,
				   __be32 old_ip, __be32 new_ip, int port_off, __be16 old_port,
				   __be16 new_port)
{
	__u64 l4flags = BPF_F_PSEUDO_HDR | (is_udp ? BPF_F_MARK_MANGLED_0 : 0);

	if (bpf_l4_csum_replace(skb, l4_csum_off, old_ip, new_ip, l4flags | 4))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, 4))
		return -1;
	if (bpf_skb_store_bytes(skb, ip_off, &new_ip, 4, 0))
		return -1;
	if (bpf_l4_csum_replace(skb, l4_csum_off, old_port, new_port,
				(is_udp ? BPF_F_MARK_MANGLED_0 : 0) | 2))
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
		return -1;
	return 0;
}

/* The flow of an IPv4 TCP/UDP packet without options or fragment offset; -1 for anything else. */
static __always_inline int parse_flow(struct __sk_buff *skb, struct keel_ct_key *ct)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
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

SEC("classifier")
int keel_tc_nodeport(struct __sk_buff *skb)
{
	struct keel_ct_key ct = {};
	struct keel_nat_val *nat;
	struct keel_ct_val *cv;
	struct keel_svc_key sk = {};
	struct keel_svc_val *svc;
	__be32 new_addr;
	__be16 new_port;
	int is_udp, csum_off;

	if (parse_flow(skb, &ct))
		return TC_ACT_OK;
	is_udp = ct.proto == IPPROTO_UDP;
	csum_off = L4_OFF + (is_udp ? 6 : 16);

	/* A reply from a backend: source back to the service address. */
	nat = bpf_map_lookup_elem(&keel_tc_revnat, &ct);
	if (nat) {
		if (rewrite(skb, csum_off, is_udp, IP_SRC_OFF, ct.saddr, nat->addr, L4_OFF,
			    ct.sport, nat->port))
			return TC_ACT_SHOT;
		return TC_ACT_OK;
	}

	cv = bpf_map_lookup_elem(&keel_ct, &ct);
	if (cv) {
		cv->last_seen_ns = bpf_ktime_get_ns();
		new_addr = cv->backend_addr;
		new_port = cv->backend_port;
	} else {
		struct keel_ct_val nv = {};
		struct keel_ct_key rk = {};
		struct keel_nat_val rv = {};
		struct keel_l4addr *be = NULL;
		struct keel_maglev_key mk = {};
		__u32 *id, n, backend_id = 0;

		__builtin_memcpy(sk.addr, &ct.daddr, 4);
		sk.port = ct.dport;
		sk.proto = ct.proto;
		sk.family = KEEL_AF_INET;
		svc = lb_lookup_service(&sk);
		if (!svc)
			return TC_ACT_OK;
		n = svc->ready ? svc->ready : svc->terminating;
		if (n == 0) {
			lb_count(svc->svc_id, LB_STAT_REFUSED);
			return reject(skb, is_udp);
		}
		if (svc->affinity_timeout || svc->ready == 0) {
			/* Affinity (client = source address) and the terminating fallback share the
			 * socket path's choice. */
			be = lb_pick(svc, KEEL_TC_CLIENT_TAG | ct.saddr, &backend_id);
		} else {
			mk.svc_id = svc->svc_id;
			mk.idx = flow_hash(&ct) % KEEL_MAGLEV_M;
			id = bpf_map_lookup_elem(&keel_maglev, &mk);
			if (id) {
				backend_id = *id;
				be = lb_backend(backend_id);
			}
		}
		if (!be || be->family != KEEL_AF_INET) {
			lb_count(svc->svc_id, LB_STAT_REFUSED);
			return reject(skb, is_udp);
		}
		lb_count(svc->svc_id, LB_STAT_CONNECT);
		__builtin_memcpy(&new_addr, be->addr, 4);
		new_port = be->port;
		nv.backend_addr = new_addr;
		nv.backend_port = new_port;
		nv.svc_id = svc->svc_id;
		nv.last_seen_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&keel_ct, &ct, &nv, BPF_ANY);
		rk.saddr = new_addr;
		rk.daddr = ct.saddr;
		rk.sport = new_port;
		rk.dport = ct.sport;
		rk.proto = ct.proto;
		rv.addr = ct.daddr;
		rv.port = ct.dport;
		bpf_map_update_elem(&keel_tc_revnat, &rk, &rv, BPF_ANY);
		if (!(svc->flags & KEEL_SVC_F_LOCAL_ONLY))
			skb->mark |= KEEL_MARK_SNAT;
	}
	if (rewrite(skb, csum_off, is_udp, IP_DST_OFF, ct.daddr, new_addr, L4_OFF + 2, ct.dport,
		    new_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* Egress of the external interface: replies of backends (local, or remote ones un-masqueraded by
 * conntrack) leave with the service address as their source. Nothing else is touched. */
SEC("classifier")
int keel_tc_revnat_egress(struct __sk_buff *skb)
{
	struct keel_ct_key ct = {};
	struct keel_nat_val *nat;
	int is_udp;

	if (parse_flow(skb, &ct))
		return TC_ACT_OK;
	is_udp = ct.proto == IPPROTO_UDP;
	nat = bpf_map_lookup_elem(&keel_tc_revnat, &ct);
	if (nat && rewrite(skb, L4_OFF + (is_udp ? 6 : 16), is_udp, IP_SRC_OFF, ct.saddr, nat->addr,
			   L4_OFF, ct.sport, nat->port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
