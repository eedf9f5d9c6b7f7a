/* Host program run by build.rs: prints the layout of every map struct in lib/maps.h as Rust
 * source, which a keel-ebpf test compares with the #[repr(C)] mirrors. */
#include <stddef.h>
#include <stdio.h>
#include "lib/maps.h"

#define S(t) printf("    (\"%s\", \"\", 0, %zu),\n", #t, sizeof(struct t))
#define F(t, f) printf("    (\"%s\", \"%s\", %zu, %zu),\n", #t, #f, offsetof(struct t, f), sizeof(((struct t *)0)->f))

int main(void)
{
	printf("/// (struct, field or \"\" for the whole struct, offset, size) as the C compiler sees them.\n");
	printf("pub const C_LAYOUT: &[(&str, &str, usize, usize)] = &[\n");
	S(keel_svc_key); F(keel_svc_key, addr); F(keel_svc_key, port); F(keel_svc_key, proto); F(keel_svc_key, family);
	S(keel_svc_val); F(keel_svc_val, svc_id); F(keel_svc_val, ready); F(keel_svc_val, terminating);
	F(keel_svc_val, affinity_timeout); F(keel_svc_val, flags);
	S(keel_slot_key); F(keel_slot_key, svc_id); F(keel_slot_key, slot);
	S(keel_l4addr); F(keel_l4addr, addr); F(keel_l4addr, port); F(keel_l4addr, family); F(keel_l4addr, flags);
	S(keel_revnat_key); F(keel_revnat_key, cookie); F(keel_revnat_key, addr); F(keel_revnat_key, port);
	F(keel_revnat_key, family); F(keel_revnat_key, pad);
	S(keel_affinity_key); F(keel_affinity_key, client); F(keel_affinity_key, svc_id); F(keel_affinity_key, pad);
	S(keel_affinity_val); F(keel_affinity_val, backend_id); F(keel_affinity_val, pad); F(keel_affinity_val, last_used_ns);
	S(keel_svc_stats); F(keel_svc_stats, connects); F(keel_svc_stats, datagrams); F(keel_svc_stats, refused);
	S(keel_ct_key); F(keel_ct_key, saddr); F(keel_ct_key, daddr); F(keel_ct_key, sport); F(keel_ct_key, dport);
	F(keel_ct_key, proto); F(keel_ct_key, pad);
	S(keel_ct_val); F(keel_ct_val, backend_addr); F(keel_ct_val, backend_port); F(keel_ct_val, flags);
	F(keel_ct_val, svc_id); F(keel_ct_val, pad2); F(keel_ct_val, last_seen_ns);
	S(keel_nat_val); F(keel_nat_val, addr); F(keel_nat_val, port); F(keel_nat_val, pad);
	S(keel_xdp_fwd); F(keel_xdp_fwd, flow); F(keel_xdp_fwd, backend_addr); F(keel_xdp_fwd, backend_port);
	F(keel_xdp_fwd, tos); F(keel_xdp_fwd, pad); F(keel_xdp_fwd, iif); F(keel_xdp_fwd, oif);
	F(keel_xdp_fwd, smac); F(keel_xdp_fwd, dmac); F(keel_xdp_fwd, len_ok); F(keel_xdp_fwd, pad2);
	F(keel_xdp_fwd, at_ns);
	S(keel_maglev_key); F(keel_maglev_key, svc_id); F(keel_maglev_key, idx);
	printf("];\n");
	printf("pub const KEEL_MAGLEV_M: u32 = %u;\n", KEEL_MAGLEV_M);
	printf("pub const KEEL_MAX_SERVICES: u32 = %u;\n", KEEL_MAX_SERVICES);
	printf("pub const KEEL_MAX_BACKENDS: u32 = %u;\n", KEEL_MAX_BACKENDS);
	printf("pub const KEEL_XDP_FWD_SLOTS: u32 = %u;\n", KEEL_XDP_FWD_SLOTS);
	printf("pub const KEEL_XDP_FWD_NS: u64 = %llu;\n", KEEL_XDP_FWD_NS);
	return 0;
}
