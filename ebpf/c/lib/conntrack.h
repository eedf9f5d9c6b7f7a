/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map definitions of the NodePort path (layouts in maps.h): conntrack, reverse NAT and Maglev
 * tables. Only the tc and XDP NodePort programs include this (via nodeport.h). ClientIP affinity shares keel_sock_affinity, with the
 * client's address tagged by bit 63 (socket-level clients are netns cookies, far below it).
 */
#ifndef KEEL_CONNTRACK_H
#define KEEL_CONNTRACK_H

#include "maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KEEL_MAX_CT);
	__type(key, struct keel_ct_key);
	__type(value, struct keel_ct_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} keel_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KEEL_MAX_CT);
	__type(key, struct keel_ct_key);
	__type(value, struct keel_nat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} keel_tc_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4 * 1024 * 1024);
	__type(key, struct keel_maglev_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} keel_maglev SEC(".maps");

#endif /* KEEL_CONNTRACK_H */
