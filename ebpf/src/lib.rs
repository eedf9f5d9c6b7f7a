//! keel-ebpf: the eBPF programs (C sources under ebpf/c, one entry file per attach point, shared
//! logic in c/lib/*.h) compiled by clang at build time, and the `#[repr(C)]` map key/value
//! layouts mirrored by the one C header c/lib/maps.h.
//!
//! Owns the kernel-facing data layouts and the object bytes; loading and attaching belong to
//! keel-proxy.

pub mod layout;

pub use layout::*;

/// The socket-level load balancer (cgroup connect/sendmsg/recvmsg/getpeername, v4 and v6),
/// built from c/sock.c.
pub static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));

/// The tc NodePort program (`keel_tc_nodeport`, DNAT + conntrack + reverse NAT + Maglev; TCP RST
/// / ICMP port unreachable for a frontend without backends), built from c/tc_nodeport.c.
pub static TC_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tc_nodeport.o"));

/// The ingress program in [`TC_OBJECT`] (DNAT to backends, reverse NAT of replies).
pub const TC_PROGRAM: &str = "keel_tc_nodeport";

/// The egress program in [`TC_OBJECT`] (reverse NAT of replies leaving the node).
pub const TC_EGRESS_PROGRAM: &str = "keel_tc_revnat_egress";

/// The XDP NodePort program (`keel_xdp_nodeport`: DNAT of externalTrafficPolicy=Local flows and
/// forwarding by FIB lookup + redirect; everything else passed to tc) and `keel_xdp_pass`, built
/// from c/xdp_nodeport.c. Shares the tc program's maps.
pub static XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_nodeport.o"));

/// The NodePort program in [`XDP_OBJECT`], for the node's external interface.
pub const XDP_PROGRAM: &str = "keel_xdp_nodeport";

/// The XDP_PASS program in [`XDP_OBJECT`]: on the far end of a veth that native XDP redirects
/// into (veth needs an XDP program on the receiving peer for that).
pub const XDP_PASS_PROGRAM: &str = "keel_xdp_pass";

/// The skb mark bit the tc program sets on flows to masquerade (`KEEL_MARK_SNAT`).
pub const MARK_SNAT: u32 = 0x0040_0000;

/// The programs in [`SOCK_OBJECT`]: (program name, attach type name as in `cgroup/<name>`).
pub const SOCK_PROGRAMS: &[(&str, &str)] = &[
    ("keel_connect4", "connect4"),
    ("keel_connect6", "connect6"),
    ("keel_sendmsg4", "sendmsg4"),
    ("keel_sendmsg6", "sendmsg6"),
    ("keel_recvmsg4", "recvmsg4"),
    ("keel_recvmsg6", "recvmsg6"),
    ("keel_getpeername4", "getpeername4"),
    ("keel_getpeername6", "getpeername6"),
];

/// Names of the maps the programs pin by name (LIBBPF_PIN_BY_NAME) in the proxy's bpffs dir, and
/// of the one map that is not pinned.
pub mod map_names {
    pub const SERVICES: &str = "keel_svc";
    pub const SLOTS: &str = "keel_slots";
    pub const BACKENDS: &str = "keel_backends";
    pub const SOCK_REVNAT: &str = "keel_sock_revnat";
    pub const SOCK_AFFINITY: &str = "keel_sock_affinity";
    pub const STATS: &str = "keel_stats";
    pub const CT: &str = "keel_ct";
    pub const TC_REVNAT: &str = "keel_tc_revnat";
    pub const MAGLEV: &str = "keel_maglev";
    /// Every map the socket programs pin.
    pub const ALL: &[&str] = &[SERVICES, SLOTS, BACKENDS, SOCK_REVNAT, SOCK_AFFINITY, STATS];
    /// The maps only the NodePort programs (tc and XDP) add.
    pub const TC: &[&str] = &[CT, TC_REVNAT, MAGLEV];
    /// Not pinned: the XDP program's per-CPU forwarding cache ([`crate::XdpFwd`]).
    pub const XDP_FWD: &str = "keel_xdp_fwd";
}

/// Bench only (`bench proxy` (4), the NodePort forwarding rate): a traffic generator and a sink,
/// built from c/bench_trafficgen.c. keel never loads them.
pub mod bench {
    /// The object holding [`GEN_PROGRAM`] and [`SINK_PROGRAM`].
    pub static OBJECT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench_trafficgen.o"));

    /// XDP, run by BPF_PROG_TEST_RUN in live-frames mode: writes [`GEN_HDR`] (with the source
    /// port rotated over [`GEN_FLOWS`] ports) into each frame and redirects it to
    /// [`GEN_IFINDEX`].
    pub const GEN_PROGRAM: &str = "keel_bench_gen";

    /// tc ingress: counts IPv4 UDP packets to [`SINK_ADDR`]:[`SINK_PORT`] with valid checksums
    /// and [`UDP_LEN`] bytes of UDP (`SINK_DELIVERED`) and any other IPv4 packet (`SINK_OTHER`)
    /// in [`SINK_COUNT_MAP`], and drops them; passes the rest (ARP, IPv6).
    pub const SINK_PROGRAM: &str = "keel_bench_sink";
    /// The same count as [`SINK_PROGRAM`] as XDP (native, on a veth): where the frame arrives,
    /// before the receiving stack (XDP_DROP; XDP_PASS for the rest).
    pub const SINK_XDP_PROGRAM: &str = "keel_bench_sink_xdp";

    /// Globals (const volatile) set at load time: the generator's target ifindex (u32), number
    /// of source ports (u32, a power of two), frame header template ([u8; GEN_HDR_LEN]).
    pub const GEN_IFINDEX: &str = "gen_ifindex";
    pub const GEN_FLOWS: &str = "gen_flows";
    pub const GEN_HDR: &str = "gen_hdr";
    /// Ethernet + IPv4 + UDP header bytes the generator writes.
    pub const GEN_HDR_LEN: usize = 42;

    /// Globals: the sink's expected destination (network byte order, u32 and u16).
    pub const SINK_ADDR: &str = "sink_addr";
    pub const SINK_PORT: &str = "sink_port";
    /// The UDP length (header + payload) the sink checks and checksums (c: SINK_UDP_LEN).
    pub const UDP_LEN: usize = 72;

    /// Per-CPU array of u64: index [`SINK_DELIVERED`], [`SINK_OTHER`].
    pub const SINK_COUNT_MAP: &str = "keel_bench_sink_count";
    pub const SINK_DELIVERED: u32 = 0;
    pub const SINK_OTHER: u32 = 1;
}
