/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup and backend choice, shared by every attach point.
 *
 * Choice: ClientIP affinity first (if the service has it and the remembered backend still
 * exists and is not terminating while ready ones exist), else uniformly random among the ready
 * backends, else among the terminating ones. NULL means "no backend": the caller refuses.
 */
#ifndef KEEL_LB_H
#define KEEL_LB_H

#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL

static __always_inline struct keel_svc_val *lb_lookup_service(struct keel_svc_key *key)
{
	return bpf_map_lookup_elem(&keel_svc, key);
}

static __always_inline struct keel_l4addr *lb_backend(__u32 backend_id)
{
	return bpf_map_lookup_elem(&keel_backends, &backend_id);
}

static __always_inline void lb_count(__u32 svc_id, int field)
{
	struct keel_svc_stats *st = bpf_map_lookup_elem(&keel_stats, &svc_id);

	if (!st)
		return;
	/* Per-CPU value: no atomics needed. */
	if (field == 0)
		st->connects++;
	else if (field == 1)
		st->datagrams++;
	else
		st->refused++;
}

#define LB_STAT_CONNECT 0
#define LB_STAT_DATAGRAM 1
#define LB_STAT_REFUSED 2

/*
 * Picks a backend of `svc` for `client` (an opaque client identity used for affinity).
 * Returns the backend and stores its id in *backend_id.
 */
static __always_inline struct keel_l4addr *
lb_pick(const struct keel_svc_val *svc, __u64 client, __u32 *backend_id)
{
	struct keel_affinity_key akey = {};
	struct keel_affinity_val *aval;
	struct keel_slot_key skey = {};
	struct keel_l4addr *be;
	__u32 *id;
	__u32 n = svc->ready, base = 0;
	__u64 now = 0;

	if (n == 0) {
		n = svc->terminating;
		base = svc->ready;
	}
	if (n == 0)
		return NULL;

	if (svc->affinity_timeout) {
		now = bpf_ktime_get_ns();
		akey.client = client;
		akey.svc_id = svc->svc_id;
		aval = bpf_map_lookup_elem(&keel_sock_affinity, &akey);
		if (aval && now - aval->last_used_ns <= (__u64)svc->affinity_timeout * NSEC_PER_SEC) {
			be = lb_backend(aval->backend_id);
			/* Backend ids are per service, so a removed backend is simply gone. */
			if (be && (!(be->flags & KEEL_BE_F_TERMINATING) || svc->ready == 0)) {
				aval->last_used_ns = now;
				*backend_id = aval->backend_id;
				return be;
			}
		}
	}

	skey.svc_id = svc->svc_id;
	skey.slot = base + bpf_get_prandom_u32() % n;
	id = bpf_map_lookup_elem(&keel_slots, &skey);
	if (!id)
		return NULL;
	be = lb_backend(*id);
	if (!be)
		return NULL;
	*backend_id = *id;

	if (svc->affinity_timeout) {
		struct keel_affinity_val nval = {
			.backend_id = *id,
			.last_used_ns = now,
		};
		bpf_map_update_elem(&keel_sock_affinity, &akey, &nval, BPF_ANY);
	}
	return be;
}

#endif /* KEEL_LB_H */
