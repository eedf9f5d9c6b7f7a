/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Bench only (bench proxy (4), the NodePort forwarding rate): a traffic generator and a sink,
 * the same for every node measured, so that the rate they show is the node's path. Never loaded
 * by keel itself.
 *
 * keel_bench_gen (XDP, run through BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, never
 * attached): writes the frame header (Ethernet + IPv4 + UDP, checksums complete) from
 * gen_hdr, sets the UDP source port to one of gen_flows ports counting up from the template's,
 * and redirects the frame to gen_ifindex, a veth, which transmits it to its peer like a frame
 * off the wire. The whole header is rewritten on every run: live-frame pages are recycled with
 * whatever the receiving side left in them (a DNATed destination, rewritten MACs), the kernel
 * does not restore their contents.
 *
 * keel_bench_sink (tc ingress on the backend's veth: after the backend's receive path) and
 * keel_bench_sink_xdp (XDP on the backend's veth: as the frame arrives, before any skb is built
 * for it) count a packet as delivered when it is IPv4 UDP to sink_addr:sink_port with a valid
 * IPv4 header checksum and a valid UDP checksum over SINK_UDP_LEN bytes (so a packet dropped or
 * mistranslated on the way counts against the path), any other IPv4 packet as other, and drop
 * both. Non-IPv4 (ARP, IPv6 neighbour discovery) passes: the node still has to resolve the
 * backend's address.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Ethernet + IPv4 (no options) + UDP. */
#define GEN_HDR_LEN 42
/* UDP header + the bench's 64-byte payload (keel_ebpf::BENCH_UDP_LEN). */
#define SINK_UDP_LEN 72

const volatile __u32 gen_ifindex = 0;
/* A power of two. */
const volatile __u32 gen_flows = 1;
const volatile __u8 gen_hdr[GEN_HDR_LEN] = {};

const volatile __be32 sink_addr = 0;
const volatile __be16 sink_port = 0;

/* Frames the generator has run on (one generator runs at a time: a plain counter). */
__u64 gen_frames = 0;

enum { SINK_DELIVERED, SINK_OTHER, SINK_COUNTERS };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SINK_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} keel_bench_sink_count SEC(".maps");

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

SEC("xdp")
int keel_bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *p = data;

	if (data + GEN_HDR_LEN > data_end)
		return XDP_ABORTED;
	/* In 8-byte words (5, then the last 2 bytes): the cheaper the generator, the more of each
	 * packet's cost is the path measured. */
#pragma unroll
	for (int i = 0; i < GEN_HDR_LEN / 8; i++)
		((__u64 *)p)[i] = ((const volatile __u64 *)gen_hdr)[i];
	*(__u16 *)(p + 40) = *(const volatile __u16 *)(gen_hdr + 40);
	struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	__u16 step = gen_frames & (gen_flows - 1);
	gen_frames++;
	/* source port + step, checksum - step (RFC 1624: the sum of the words grows by step). */
	udp->source = bpf_htons(bpf_ntohs(udp->source) + step);
	__u16 c = csum_fold((__u64)(__u16)~bpf_ntohs(udp->check) + step);
	c = ~c;
	udp->check = bpf_htons(c ? c : 0xffff);
	return bpf_redirect(gen_ifindex, 0);
}

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&keel_bench_sink_count, &which);

	if (n)
		*n += 1;
}

/* What the sinks make of a frame. */
enum { SINK_PASS, SINK_COUNTED };

/* Counts the frame [data, data_end) (see the file comment): SINK_PASS for non-IPv4, else
 * SINK_COUNTED (the caller drops it). */
static __always_inline int sink_count(void *data, void *data_end)
{
	struct ethhdr *eth = data;

	if (data + sizeof(*eth) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return SINK_PASS;
	struct iphdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)udp + SINK_UDP_LEN > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    ip->daddr != sink_addr || udp->dest != sink_port ||
	    udp->len != bpf_htons(SINK_UDP_LEN)) {
		count(SINK_OTHER);
		return SINK_COUNTED;
	}
	__s64 ip_sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	/* The pseudo-header's addresses and the UDP datagram lie back to back (no IP options): one
	 * sum over both, seeded with the pseudo-header's zero, protocol and UDP length word. */
	__s64 l4_sum = bpf_csum_diff(0, 0, &ip->saddr, 8 + SINK_UDP_LEN,
				     bpf_htonl((IPPROTO_UDP << 16) | SINK_UDP_LEN));
	if (ip_sum < 0 || l4_sum < 0 || csum_fold(ip_sum) != 0xffff || csum_fold(l4_sum) != 0xffff)
		count(SINK_OTHER);
	else
		count(SINK_DELIVERED);
	return SINK_COUNTED;
}

SEC("classifier")
int keel_bench_sink(struct __sk_buff *skb)
{
	if (sink_count((void *)(long)skb->data, (void *)(long)skb->data_end) == SINK_PASS)
		return TC_ACT_OK;
	return TC_ACT_SHOT;
}

SEC("xdp")
int keel_bench_sink_xdp(struct xdp_md *ctx)
{
	if (sink_count((void *)(long)ctx->data, (void *)(long)ctx->data_end) == SINK_PASS)
		return XDP_PASS;
	return XDP_DROP;
}

char _license[] SEC("license") = "Dual BSD/GPL";
