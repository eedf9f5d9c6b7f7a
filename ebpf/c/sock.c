/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level service load balancing: the cgroup sock_addr attach point (connect, sendmsg,
 * recvmsg, getpeername, for IPv4 and IPv6). A client's connect() to a service address is
 * rewritten to a backend before any packet exists, so no per-packet NAT and no conntrack are
 * needed for clients on the node; recvmsg/getpeername translate the backend back to the service
 * address so applications see what they asked for.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/maps.h"
#include "lib/lb.h"

#define SYS_REJECT 0
#define SYS_PROCEED 1
#define KEEL_ECONNREFUSED 111

static __always_inline int sock_proto(struct bpf_sock_addr *ctx)
{
	__u32 proto = ctx->protocol;

	/* A raw or unspecified protocol socket is not a service client. */
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP)
		return proto;
	return 0;
}

static __always_inline void key_from_ctx4(struct bpf_sock_addr *ctx, struct keel_svc_key *key)
{
	__u32 ip = ctx->user_ip4;

	__builtin_memcpy(key->addr, &ip, 4);
	key->port = (__be16)ctx->user_port;
	key->family = KEEL_AF_INET;
}

static __always_inline void key_from_ctx6(struct bpf_sock_addr *ctx, struct keel_svc_key *key)
{
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];

	__builtin_memcpy(key->addr, &w0, 4);
	__builtin_memcpy(key->addr + 4, &w1, 4);
	__builtin_memcpy(key->addr + 8, &w2, 4);
	__builtin_memcpy(key->addr + 12, &w3, 4);
	key->port = (__be16)ctx->user_port;
	key->family = KEEL_AF_INET6;
}

static __always_inline void write_ctx(struct bpf_sock_addr *ctx, const struct keel_l4addr *a, int v6)
{
	__u32 w;

	if (v6) {
		__builtin_memcpy(&w, a->addr, 4);
		ctx->user_ip6[0] = w;
		__builtin_memcpy(&w, a->addr + 4, 4);
		ctx->user_ip6[1] = w;
		__builtin_memcpy(&w, a->addr + 8, 4);
		ctx->user_ip6[2] = w;
		__builtin_memcpy(&w, a->addr + 12, 4);
		ctx->user_ip6[3] = w;
	} else {
		__builtin_memcpy(&w, a->addr, 4);
		ctx->user_ip4 = w;
	}
	ctx->user_port = (__u32)a->port;
}

static __always_inline void revnat_remember(struct bpf_sock_addr *ctx, const struct keel_l4addr *be,
					    const struct keel_svc_key *svc)
{
	struct keel_revnat_key rk = {};
	struct keel_l4addr orig = {};

	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, be->addr, 16);
	rk.port = be->port;
	rk.family = be->family;
	__builtin_memcpy(orig.addr, svc->addr, 16);
	orig.port = svc->port;
	orig.family = svc->family;
	bpf_map_update_elem(&keel_sock_revnat, &rk, &orig, BPF_ANY);
}

/* connect() and unconnected sendmsg(): service address -> backend. */
static __always_inline int sock_xlate_fwd(struct bpf_sock_addr *ctx, int v6, int stat)
{
	struct keel_svc_key key = {};
	struct keel_svc_val *svc;
	struct keel_l4addr *be;
	__u32 backend_id = 0;
	int proto = sock_proto(ctx);

	if (!proto)
		return SYS_PROCEED;
	if (v6)
		key_from_ctx6(ctx, &key);
	else
		key_from_ctx4(ctx, &key);
	key.proto = proto;

	svc = lb_lookup_service(&key);
	if (!svc)
		return SYS_PROCEED;

	be = lb_pick(svc, bpf_get_netns_cookie(ctx), &backend_id);
	if (!be || be->family != key.family) {
		lb_count(svc->svc_id, LB_STAT_REFUSED);
		/* The application sees ECONNREFUSED at once, as with a TCP RST, not a hang. */
		bpf_set_retval(-KEEL_ECONNREFUSED);
		return SYS_REJECT;
	}
	lb_count(svc->svc_id, stat);
	/* TCP needs it for getpeername(), UDP for recvmsg() and getpeername(). */
	revnat_remember(ctx, be, &key);
	write_ctx(ctx, be, v6);
	return SYS_PROCEED;
}

/* recvmsg() and getpeername(): backend -> service address, for sockets we translated. */
static __always_inline int sock_xlate_rev(struct bpf_sock_addr *ctx, int v6)
{
	struct keel_revnat_key rk = {};
	struct keel_l4addr *orig;
	struct keel_svc_key tmp = {};

	if (v6)
		key_from_ctx6(ctx, &tmp);
	else
		key_from_ctx4(ctx, &tmp);
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, tmp.addr, 16);
	rk.port = tmp.port;
	rk.family = tmp.family;
	orig = bpf_map_lookup_elem(&keel_sock_revnat, &rk);
	if (!orig)
		return SYS_PROCEED;
	write_ctx(ctx, orig, v6);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int keel_connect4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, 0, LB_STAT_CONNECT);
}

SEC("cgroup/connect6")
int keel_connect6(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, 1, LB_STAT_CONNECT);
}

SEC("cgroup/sendmsg4")
int keel_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, 0, LB_STAT_DATAGRAM);
}

SEC("cgroup/sendmsg6")
int keel_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, 1, LB_STAT_DATAGRAM);
}

SEC("cgroup/recvmsg4")
int keel_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx, 0);
}

SEC("cgroup/recvmsg6")
int keel_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx, 1);
}

SEC("cgroup/getpeername4")
int keel_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx, 0);
}

SEC("cgroup/getpeername6")
int keel_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx, 1);
}

char _license[] SEC("license") = "Dual BSD/GPL";
