/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Rejecting a packet to a service frontend without backends, the way the kernel rejects a
 * packet to a closed port: the packet itself becomes the answer and goes back out of the
 * interface it came in on (bpf_redirect to skb->ifindex, egress).
 *
 * TCP: a RST from the frontend, as tcp_v4_send_reset builds it: if the segment carried an ACK,
 * seq = its ack and no ACK flag; else seq 0, RST+ACK, ack = its seq + payload + SYN + FIN.
 * Never a RST for a RST (that one is dropped). The segment is trimmed to the 54 bytes of
 * Ethernet + IPv4 + TCP without options and rewritten in place.
 *
 * UDP: ICMP destination unreachable / port unreachable from the frontend, quoting the original
 * IPv4 header and the first 8 bytes after it (RFC 792): the datagram is trimmed to those 28
 * bytes and 28 bytes of new IPv4 + ICMP header are inserted after the Ethernet header. No rate
 * limit (the kernel's icmp_ratelimit has no BPF counterpart here): one answer per datagram.
 *
 * Checksums. Most skbs carry complete checksums, and the new ones are computed in full
 * (bpf_csum_diff over the headers). An skb from a local socket through a veth is
 * CHECKSUM_PARTIAL: its L4 checksum is left to the device, which will sum from csum_start
 * (still the original L4 header) and store at csum_offset. BPF cannot read ip_summed, but
 * bpf_l4_csum_replace without BPF_F_PSEUDO_HDR leaves the field alone exactly when the skb is
 * CHECKSUM_PARTIAL, so a probe on a scratch field tells. Then:
 * - TCP: csum_start/offset still name the (new) TCP header and its check field, so the field
 *   gets the pseudo-header sum, as the stack leaves it for offload.
 * - ICMP: csum_start names the quoted UDP header, and the device will rewrite its check field
 *   (W = fold of those 8 bytes, never 0); the ICMP checksum is computed over the quote as it
 *   will be after that.
 * A CHECKSUM_COMPLETE skb (from a NIC) keeps a stale skb->csum, which the transmit path ignores.
 */
#ifndef KEEL_REJECT_H
#define KEEL_REJECT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define REJECT_IP_OFF ETH_HLEN
#define REJECT_L4_OFF (ETH_HLEN + sizeof(struct iphdr))
#define REJECT_TCP_CSUM_OFF (REJECT_L4_OFF + __builtin_offsetof(struct tcphdr, check))
#define REJECT_ICMP_CSUM_OFF (REJECT_L4_OFF + __builtin_offsetof(struct reject_icmp, checksum))
#define REJECT_TTL 64
#define REJECT_IP_DF 0x4000
/* tos of ICMP errors: the original's TOS bits with precedence "internetwork control". */
#define REJECT_ICMP_TOS(t) (((t) & 0x1e) | 0xc0)

/* linux/icmp.h pulls in libc's socket headers, which a BPF target does not have. */
#define REJECT_ICMP_DEST_UNREACH 3
#define REJECT_ICMP_PORT_UNREACH 3

struct reject_icmp {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused; /* zero for port unreachable */
};

struct reject_pseudo {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/* The IPv4 header and first 8 bytes of a rejected datagram, as the ICMP error quotes them. */
struct reject_quote {
	struct iphdr ip;
	struct udphdr udp;
};

/* Folds a 32-bit one's complement sum (bpf_csum_diff's result) and complements it. */
static __always_inline __u16 reject_fold(__s64 sum)
{
	__u32 c = (__u32)sum;

	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

/* Whether the skb is CHECKSUM_PARTIAL, probed on the 2 bytes at `off` (clobbered). */
static __always_inline int reject_csum_partial(struct __sk_buff *skb, __u32 off)
{
	__u16 v = 0;

	if (bpf_skb_store_bytes(skb, off, &v, sizeof(v), 0))
		return 0;
	if (bpf_l4_csum_replace(skb, off, 0, bpf_htons(1), sizeof(v)))
		return 0;
	if (bpf_skb_load_bytes(skb, off, &v, sizeof(v)))
		return 0;
	return v == 0;
}

static __always_inline void reject_ip(struct iphdr *ip, __u8 tos, __u16 tot_len, __u8 proto,
				      __be32 saddr, __be32 daddr)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos;
	ip->tot_len = bpf_htons(tot_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(REJECT_IP_DF);
	ip->ttl = REJECT_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = reject_fold(bpf_csum_diff(NULL, 0, (void *)ip, sizeof(*ip), 0));
}

static __always_inline void reject_swap_eth(struct ethhdr *out, const struct ethhdr *in)
{
	__builtin_memcpy(out->h_dest, in->h_source, ETH_ALEN);
	__builtin_memcpy(out->h_source, in->h_dest, ETH_ALEN);
	out->h_proto = bpf_htons(ETH_P_IP);
}

/* A TCP segment (IPv4 without options, as parse_flow admitted it) becomes the RST answering it. */
static __always_inline int reject_tcp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *th = (void *)(ip + 1);
	struct reject_pseudo ph = {};
	struct ethhdr reth;
	struct iphdr rip = {};
	struct tcphdr rth = {};
	__u32 tot, hl, seg;
	__s64 sum;
	__u16 check;

	if ((void *)(th + 1) > data_end)
		return TC_ACT_SHOT;
	if (th->rst)
		return TC_ACT_SHOT;
	tot = bpf_ntohs(ip->tot_len);
	hl = th->doff * 4;
	if (hl < sizeof(*th) || tot < sizeof(*ip) + hl)
		return TC_ACT_SHOT;
	seg = tot - sizeof(*ip) - hl + th->syn + th->fin;

	reject_swap_eth(&reth, eth);
	rth.source = th->dest;
	rth.dest = th->source;
	rth.doff = sizeof(rth) / 4;
	rth.rst = 1;
	if (th->ack) {
		rth.seq = th->ack_seq;
	} else {
		rth.ack = 1;
		rth.ack_seq = bpf_htonl(bpf_ntohl(th->seq) + seg);
	}
	reject_ip(&rip, ip->tos, sizeof(rip) + sizeof(rth), IPPROTO_TCP, ip->daddr, ip->saddr);
	ph.saddr = rip.saddr;
	ph.daddr = rip.daddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(rth));

	/* Packet pointers are invalid from here on. */
	if (bpf_skb_change_tail(skb, REJECT_L4_OFF + sizeof(rth), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &reth, sizeof(reth), 0) ||
	    bpf_skb_store_bytes(skb, REJECT_IP_OFF, &rip, sizeof(rip), 0) ||
	    bpf_skb_store_bytes(skb, REJECT_L4_OFF, &rth, sizeof(rth), 0))
		return TC_ACT_SHOT;
	sum = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), 0);
	if (reject_csum_partial(skb, REJECT_TCP_CSUM_OFF))
		check = (__u16)~reject_fold(sum);
	else
		check = reject_fold(bpf_csum_diff(NULL, 0, (void *)&rth, sizeof(rth), (__u32)sum));
	if (bpf_skb_store_bytes(skb, REJECT_TCP_CSUM_OFF, &check, sizeof(check), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* A UDP datagram becomes the ICMP port unreachable answering it. */
static __always_inline int reject_udp(struct __sk_buff *skb)
{
	struct reject_quote q;
	struct ethhdr eth, reth;
	struct iphdr rip = {};
	struct reject_icmp ic = {};
	__s64 sum;

	/* Shorter than an IPv4 header + 8 bytes: nothing a kernel would quote, just drop. */
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, REJECT_IP_OFF, &q, sizeof(q)))
		return TC_ACT_SHOT;
	reject_swap_eth(&reth, &eth);
	reject_ip(&rip, REJECT_ICMP_TOS(q.ip.tos), sizeof(rip) + sizeof(ic) + sizeof(q),
		  IPPROTO_ICMP, q.ip.daddr, q.ip.saddr);
	ic.type = REJECT_ICMP_DEST_UNREACH;
	ic.code = REJECT_ICMP_PORT_UNREACH;

	/* Keep the quote, then make room for the new headers in front of it. */
	if (bpf_skb_change_tail(skb, REJECT_IP_OFF + sizeof(q), 0))
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(rip) + sizeof(ic), BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, &reth, sizeof(reth), 0) ||
	    bpf_skb_store_bytes(skb, REJECT_IP_OFF, &rip, sizeof(rip), 0) ||
	    bpf_skb_store_bytes(skb, REJECT_L4_OFF, &ic, sizeof(ic), 0))
		return TC_ACT_SHOT;
	if (reject_csum_partial(skb, REJECT_ICMP_CSUM_OFF)) {
		__u16 w = reject_fold(bpf_csum_diff(NULL, 0, (void *)&q.udp, sizeof(q.udp), 0));

		q.udp.check = w ? w : 0xffff;
	}
	sum = bpf_csum_diff(NULL, 0, (void *)&ic, sizeof(ic), 0);
	ic.checksum = reject_fold(bpf_csum_diff(NULL, 0, (void *)&q, sizeof(q), (__u32)sum));
	if (bpf_skb_store_bytes(skb, REJECT_ICMP_CSUM_OFF, &ic.checksum, sizeof(ic.checksum), 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answers a TCP segment or UDP datagram to a frontend without backends (see the top). */
static __always_inline int reject(struct __sk_buff *skb, int is_udp)
{
	return is_udp ? reject_udp(skb) : reject_tcp(skb);
}

#endif /* KEEL_REJECT_H */
