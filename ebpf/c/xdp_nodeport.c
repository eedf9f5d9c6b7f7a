/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The XDP attach point (the node's external interface, native mode where the driver allows,
 * else generic) for NodePort / externalIPs traffic: the fast path in front of the tc program,
 * on the same maps (services, backends, Maglev, keel_ct, keel_tc_revnat, affinity, stats), so
 * a flow gets the same backend whichever program sees it first.
 *
 * A packet to a service frontend whose service keeps the client's address
 * (externalTrafficPolicy=Local, KEEL_SVC_F_LOCAL_ONLY) gets the backend lib/nodeport.h chooses
 * (conntrack, ClientIP affinity, Maglev, creating the conntrack and reverse-NAT entries), is
 * DNATed in place (checksums updated incrementally, RFC 1624) and looked up in the FIB:
 * - found with a neighbour: MACs rewritten, TTL decremented, XDP_REDIRECT to the egress
 *   interface: forwarded without the stack;
 * - anything else (no neighbour yet, no route, forwarding off, TTL expiring): XDP_PASS of the
 *   DNATed packet; the stack routes it (and resolves the neighbour for the next packets), tc's
 *   ingress program sees a packet to a backend and leaves it alone.
 * Replies come back through the stack either way: tc's reverse NAT (on the backend-facing
 * ingress or the external egress) turns their source back into the service address.
 * A flow's later packets on the same CPU take the decision and the FIB answer from a per-CPU
 * forwarding cache (keel_xdp_fwd, below) for up to KEEL_XDP_FWD_NS: no hash or FIB lookup.
 *
 * Left to tc (XDP_PASS, untouched, nothing created or counted):
 * - flows that need masquerade (externalTrafficPolicy=Cluster, or a conntrack entry flagged
 *   KEEL_CT_F_SNAT): their SNAT is netfilter's (tc marks, POSTROUTING masquerades), which a
 *   packet forwarded by XDP would skip;
 * - a frontend without backends: tc answers with a RST / ICMP port unreachable (lib/reject.h)
 *   and counts the refusal once;
 * - replies (a reverse-NAT hit) and anything that is not IPv4 TCP/UDP to a frontend.
 *
 * Checksums: the update assumes the L4 checksum is complete, as it is in every frame a NIC
 * receives (native XDP runs before any skb, and drivers do not hand XDP offloaded checksums).
 * A CHECKSUM_PARTIAL skb (a local socket sending through a veth with tx-checksumming on) holds
 * only the pseudo-header sum there, and XDP has no way to tell (xdp_md carries no ip_summed, no
 * metadata kfunc reports it; guessing from the field's value would corrupt one complete checksum
 * in 65536). What that costs, on a veth only:
 * - native mode: the redirected frame loses the skb's checksum state, the backend's stack
 *   verifies the wrongly updated field and drops the datagram / segment (bench proxy (4) with
 *   tx-checksumming on: none of 1.2 M datagrams arrived);
 * - generic mode: the skb stays CHECKSUM_PARTIAL and is delivered (trusted) to the local backend
 *   (bench proxy (4) with tx-checksumming on: all arrived); only a NIC's checksum offload,
 *   should the packet leave the node, would start from the wrong field.
 * So a veth whose far end is a local sender (tests, benchmarks, a client in a netns of this
 * node) needs tx-checksumming off on that far end to be put behind this program. A UDP checksum
 * of 0 (none) stays 0.
 *
 * keel_xdp_pass: XDP_PASS, nothing else. Native XDP_REDIRECT into a veth needs the peer's NAPI
 * (veth_xdp_xmit drops the frame otherwise), which the kernel enables when the peer has an XDP
 * program or GRO on: attach this one to the far end of a veth the NodePort program redirects
 * into (a pod's eth0), or switch GRO on there (`ethtool -K eth0 gro on` in the pod's netns;
 * bench proxy (4) does that).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/nodeport.h"

/* Not pinned: a cache, which a new program may start empty. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KEEL_XDP_FWD_SLOTS);
	__type(key, __u32);
	__type(value, struct keel_xdp_fwd);
} keel_xdp_fwd SEC(".maps");

/* Folds a 32-bit ones' complement sum of 16-bit words into 16 bits. */
static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m') for a 32-bit field m -> m'. Words are taken as they
 * lie in memory: the ones' complement sum does not depend on byte order. */
static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__u32 s = (__u16)~check;

	s += (__u16)~(from & 0xffff);
	s += (__u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	return (__u16)~csum_fold32(s);
}

static __always_inline __u16 csum_replace2(__u16 check, __u16 from, __u16 to)
{
	__u32 s = (__u16)~check;

	s += (__u16)~from;
	s += to;
	return (__u16)~csum_fold32(s);
}

/*
 * The forwarding cache (keel_xdp_fwd): a flow's decision (its backend, from conntrack) and
 * bpf_fib_lookup's answer for it, reused for KEEL_XDP_FWD_NS by the flow's later packets on
 * this CPU without a hash lookup (a per-CPU array slot is a pointer computation). The tag is
 * the flow as received plus what else the lookup takes from the packet (TOS, ingress
 * interface); a longer packet than the lookup passed is decided again (the MTU check). So a
 * changed route or neighbour, a conntrack entry gone, is seen within KEEL_XDP_FWD_NS, and the
 * flow's conntrack entry is refreshed (LRU, last_seen) as often. Anything that does not end in
 * a redirect leaves the slot empty. Per CPU: no lock, no shared cache line; a slot two flows hash to
 * is the last one's.
 */
static __always_inline int fwd_hit(const struct keel_xdp_fwd *fc, const struct keel_ct_key *ct,
				   const struct iphdr *ip, __u32 iif)
{
	return fc->at_ns && bpf_ktime_get_coarse_ns() - fc->at_ns < KEEL_XDP_FWD_NS &&
	       fc->flow.saddr == ct->saddr && fc->flow.daddr == ct->daddr &&
	       fc->flow.sport == ct->sport && fc->flow.dport == ct->dport &&
	       fc->flow.proto == ct->proto && fc->tos == ip->tos && fc->iif == iif &&
	       bpf_ntohs(ip->tot_len) <= fc->len_ok;
}

static __always_inline void fwd_fill(struct keel_xdp_fwd *fc, const struct keel_ct_key *ct,
				     const struct np_target *t, const struct iphdr *ip, __u32 iif,
				     const struct bpf_fib_lookup *fib)
{
	fc->flow = *ct;
	fc->backend_addr = t->addr;
	fc->backend_port = t->port;
	fc->tos = ip->tos;
	fc->len_ok = bpf_ntohs(ip->tot_len);
	fc->iif = iif;
	fc->oif = fib->ifindex;
	__builtin_memcpy(fc->smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(fc->dmac, fib->dmac, ETH_ALEN);
	fc->at_ns = bpf_ktime_get_coarse_ns();
}

SEC("xdp")
int keel_xdp_nodeport(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bpf_fib_lookup fib = {};
	struct keel_ct_key ct = {};
	struct np_target t = {};
	struct ethhdr *eth = data;
	struct keel_xdp_fwd *fc;
	struct iphdr *ip;
	__be16 *ports;
	__u16 *check, old_word;
	__u32 slot, iif = ctx->ingress_ifindex;
	int hit, rc;

	if (np_parse_flow(data, data_end, &ct))
		return XDP_PASS;
	/* The verifier wants the bounds proven again on these registers. */
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	ports = (void *)(ip + 1);
	if (ct.proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)ports;

		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		check = &th->check;
	} else {
		struct udphdr *uh = (void *)ports;

		if ((void *)(uh + 1) > data_end)
			return XDP_PASS;
		check = &uh->check;
	}

	slot = flow_hash(&ct) & (KEEL_XDP_FWD_SLOTS - 1);
	fc = bpf_map_lookup_elem(&keel_xdp_fwd, &slot);
	if (!fc)
		return XDP_PASS; /* never: the slot is in range */
	hit = fwd_hit(fc, &ct, ip, iif);
	if (hit) {
		t.addr = fc->backend_addr;
		t.port = fc->backend_port;
	} else {
		fc->at_ns = 0;
		/* Replies (NP_REPLY) are tc's reverse NAT. */
		if (np_choose(&ct, &t, 1, 1) != NP_FORWARD)
			return XDP_PASS;
	}

	/* DNAT: the pseudo-header's destination and the destination port. */
	if (ct.proto == IPPROTO_TCP || *check) {
		__u16 c = csum_replace4(*check, ct.daddr, t.addr);

		c = csum_replace2(c, ct.dport, t.port);
		if (ct.proto == IPPROTO_UDP && c == 0)
			c = 0xffff; /* 0 would mean "no checksum" */
		*check = c;
	}
	ip->check = csum_replace4(ip->check, ct.daddr, t.addr);
	ip->daddr = t.addr;
	ports[1] = t.port;

	if (ip->ttl <= 1)
		return XDP_PASS; /* the stack answers an expiring TTL */
	if (!hit) {
		fib.family = KEEL_AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.sport = ports[0];
		fib.dport = ports[1];
		fib.tot_len = bpf_ntohs(ip->tot_len);
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
		fib.ifindex = iif;
		rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
		if (rc != BPF_FIB_LKUP_RET_SUCCESS)
			return XDP_PASS; /* the stack forwards it (and resolves the neighbour) */
		fwd_fill(fc, &ct, &t, ip, iif, &fib);
	}

	/* Forwarded as the stack would: TTL down, the next hop's MACs. */
	old_word = *(__u16 *)&ip->ttl;
	ip->ttl--;
	ip->check = csum_replace2(ip->check, old_word, *(__u16 *)&ip->ttl);
	__builtin_memcpy(eth->h_dest, fc->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fc->smac, ETH_ALEN);
	return bpf_redirect(fc->oif, 0);
}

SEC("xdp")
int keel_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
