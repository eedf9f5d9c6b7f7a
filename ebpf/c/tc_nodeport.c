/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The tc attach point (ingress of the node's external interface and of pod veths) for traffic
 * that did not pass a socket hook: NodePort / externalIPs / LoadBalancer IPs from outside.
 *
 * A packet from a backend that matches a reverse-NAT entry gets its source rewritten back to the
 * service address. A packet to a service frontend is DNATed to a backend chosen as lib/nodeport.h
 * says (conntrack, else ClientIP affinity, else Maglev), the choice the XDP program
 * (xdp_nodeport.c) shares; where it runs, it forwards Local-policy flows before this program
 * sees them. A service without backends rejects the packet as a closed port would, and counts
 * it as refused: a TCP segment is answered by a RST, a UDP datagram by ICMP port unreachable, both
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

#include "lib/nodeport.h"
#include "lib/reject.h"

/* skb->mark bit for the proxy's masquerade rule (mirrored as keel_ebpf::MARK_SNAT). */
#define KEEL_MARK_SNAT 0x00400000
#define IP_OFF ETH_HLEN
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))
#define IP_CSUM_OFF (IP_OFF + 10)
#define IP_SRC_OFF (IP_OFF + 12)
#define IP_DST_OFF (IP_OFF + 16)

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

static __always_inline int parse_flow(struct __sk_buff *skb, struct keel_ct_key *ct)
{
	return np_parse_flow((void *)(long)skb->data, (void *)(long)skb->data_end, ct);
}

SEC("classifier")
int keel_tc_nodeport(struct __sk_buff *skb)
{
	struct keel_ct_key ct = {};
	struct np_target t = {};
	struct keel_nat_val *nat;
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

	switch (np_choose(&ct, &t, 0, 0)) {
	case NP_FORWARD:
		break;
	case NP_REJECT:
		lb_count(t.svc_id, LB_STAT_REFUSED);
		return reject(skb, is_udp);
	default:
		return TC_ACT_OK;
	}
	if (t.created && (t.ct_flags & KEEL_CT_F_SNAT))
		skb->mark |= KEEL_MARK_SNAT;
	if (rewrite(skb, csum_off, is_udp, IP_DST_OFF, ct.daddr, t.addr, L4_OFF + 2, ct.dport,
		    t.port))
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
