//! `#[repr(C)]` mirrors of the structs in c/lib/maps.h, plus conversions from std addresses.
//!
//! A test compares every size and field offset with what the C compiler computed (build.rs runs
//! a probe built from the same header). Padding fields are explicit and always zero.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

include!(concat!(env!("OUT_DIR"), "/layout_c.rs"));

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

pub const SVC_F_NODEPORT: u32 = 1 << 0;
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 1;
pub const SVC_F_LOCAL_ONLY: u32 = 1 << 2;
/// `keel_ct_val.flags`: the flow is masqueraded by the stack, so only tc may forward it.
pub const CT_F_SNAT: u16 = 1 << 0;

pub const BE_F_TERMINATING: u8 = 1 << 0;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// `struct keel_svc_key`: a service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `struct keel_svc_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcVal {
    pub svc_id: u32,
    pub ready: u16,
    pub terminating: u16,
    pub affinity_timeout: u32,
    pub flags: u32,
}

/// `struct keel_slot_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// `struct keel_l4addr`: a backend (or an original service address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
}

/// `struct keel_revnat_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevnatKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

/// `struct keel_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: u64,
    pub svc_id: u32,
    pub pad: u32,
}

/// `struct keel_affinity_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityVal {
    pub backend_id: u32,
    pub pad: u32,
    pub last_used_ns: u64,
}

/// `struct keel_svc_stats`: one per CPU per service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub connects: u64,
    pub datagrams: u64,
    pub refused: u64,
}

/// `struct keel_ct_key`: a flow as on the wire (reply direction for reverse NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Network byte order (as the packet holds it).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct keel_ct_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtVal {
    pub backend_addr: u32,
    pub backend_port: u16,
    /// `KEEL_CT_F_*` ([`CT_F_SNAT`]).
    pub flags: u16,
    pub svc_id: u32,
    pub pad2: u32,
    pub last_seen_ns: u64,
}

/// `struct keel_nat_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatVal {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct keel_xdp_fwd`: the XDP program's per-CPU forwarding cache (keel_xdp_fwd, not
/// pinned). Userspace only reads it in tests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpFwd {
    pub flow: CtKey,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub tos: u8,
    pub pad: u8,
    pub iif: u32,
    pub oif: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Host byte order.
    pub len_ok: u16,
    pub pad2: u16,
    pub at_ns: u64,
}

/// `struct keel_maglev_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    pub svc_id: u32,
    pub idx: u32,
}

// SAFETY: every type above is #[repr(C)], made only of integers and integer arrays, with all
// padding spelled out as fields (checked against the C layout by the test below), so any bit
// pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for SvcKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcVal {}
// SAFETY: as above.
unsafe impl aya::Pod for SlotKey {}
// SAFETY: as above.
unsafe impl aya::Pod for L4Addr {}
// SAFETY: as above.
unsafe impl aya::Pod for RevnatKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AffinityKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AffinityVal {}
// SAFETY: as above.
unsafe impl aya::Pod for SvcStats {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for CtVal {}
// SAFETY: as above.
unsafe impl aya::Pod for NatVal {}
// SAFETY: as above.
unsafe impl aya::Pod for MaglevKey {}
// SAFETY: as above.
unsafe impl aya::Pod for XdpFwd {}

/// The map encoding of an address: IPv4 in the first 4 bytes, the rest zero.
pub fn encode_ip(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, AF_INET)
        }
        IpAddr::V6(v6) => (v6.octets(), AF_INET6),
    }
}

/// The inverse of [`encode_ip`]; `None` for an unknown family.
pub fn decode_ip(addr: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

impl SvcKey {
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        let (addr, family) = encode_ip(ip);
        SvcKey {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        decode_ip(&self.addr, self.family)
    }

    /// Host byte order port.
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl L4Addr {
    pub fn new(ip: IpAddr, port: u16, flags: u8) -> Self {
        let (addr, family) = encode_ip(ip);
        L4Addr {
            addr,
            port: port.to_be(),
            family,
            flags,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        decode_ip(&self.addr, self.family)
    }

    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Name of a protocol number for display.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// (struct, field, offset, size) from the Rust side, in the same naming as C_LAYOUT.
    fn rust_layout() -> Vec<(&'static str, &'static str, usize, usize)> {
        macro_rules! s {
            ($c:literal, $t:ty) => {
                ($c, "", 0, size_of::<$t>())
            };
        }
        macro_rules! f {
            ($c:literal, $t:ty, $f:ident) => {{
                let v = <$t>::default();
                (
                    $c,
                    stringify!($f),
                    offset_of!($t, $f),
                    std::mem::size_of_val(&v.$f),
                )
            }};
        }
        vec![
            s!("keel_svc_key", SvcKey),
            f!("keel_svc_key", SvcKey, addr),
            f!("keel_svc_key", SvcKey, port),
            f!("keel_svc_key", SvcKey, proto),
            f!("keel_svc_key", SvcKey, family),
            s!("keel_svc_val", SvcVal),
            f!("keel_svc_val", SvcVal, svc_id),
            f!("keel_svc_val", SvcVal, ready),
            f!("keel_svc_val", SvcVal, terminating),
            f!("keel_svc_val", SvcVal, affinity_timeout),
            f!("keel_svc_val", SvcVal, flags),
            s!("keel_slot_key", SlotKey),
            f!("keel_slot_key", SlotKey, svc_id),
            f!("keel_slot_key", SlotKey, slot),
            s!("keel_l4addr", L4Addr),
            f!("keel_l4addr", L4Addr, addr),
            f!("keel_l4addr", L4Addr, port),
            f!("keel_l4addr", L4Addr, family),
            f!("keel_l4addr", L4Addr, flags),
            s!("keel_revnat_key", RevnatKey),
            f!("keel_revnat_key", RevnatKey, cookie),
            f!("keel_revnat_key", RevnatKey, addr),
            f!("keel_revnat_key", RevnatKey, port),
            f!("keel_revnat_key", RevnatKey, family),
            f!("keel_revnat_key", RevnatKey, pad),
            s!("keel_affinity_key", AffinityKey),
            f!("keel_affinity_key", AffinityKey, client),
            f!("keel_affinity_key", AffinityKey, svc_id),
            f!("keel_affinity_key", AffinityKey, pad),
            s!("keel_affinity_val", AffinityVal),
            f!("keel_affinity_val", AffinityVal, backend_id),
            f!("keel_affinity_val", AffinityVal, pad),
            f!("keel_affinity_val", AffinityVal, last_used_ns),
            s!("keel_svc_stats", SvcStats),
            f!("keel_svc_stats", SvcStats, connects),
            f!("keel_svc_stats", SvcStats, datagrams),
            f!("keel_svc_stats", SvcStats, refused),
            s!("keel_ct_key", CtKey),
            f!("keel_ct_key", CtKey, saddr),
            f!("keel_ct_key", CtKey, daddr),
            f!("keel_ct_key", CtKey, sport),
            f!("keel_ct_key", CtKey, dport),
            f!("keel_ct_key", CtKey, proto),
            f!("keel_ct_key", CtKey, pad),
            s!("keel_ct_val", CtVal),
            f!("keel_ct_val", CtVal, backend_addr),
            f!("keel_ct_val", CtVal, backend_port),
            f!("keel_ct_val", CtVal, flags),
            f!("keel_ct_val", CtVal, svc_id),
            f!("keel_ct_val", CtVal, pad2),
            f!("keel_ct_val", CtVal, last_seen_ns),
            s!("keel_nat_val", NatVal),
            f!("keel_nat_val", NatVal, addr),
            f!("keel_nat_val", NatVal, port),
            f!("keel_nat_val", NatVal, pad),
            s!("keel_xdp_fwd", XdpFwd),
            f!("keel_xdp_fwd", XdpFwd, flow),
            f!("keel_xdp_fwd", XdpFwd, backend_addr),
            f!("keel_xdp_fwd", XdpFwd, backend_port),
            f!("keel_xdp_fwd", XdpFwd, tos),
            f!("keel_xdp_fwd", XdpFwd, pad),
            f!("keel_xdp_fwd", XdpFwd, iif),
            f!("keel_xdp_fwd", XdpFwd, oif),
            f!("keel_xdp_fwd", XdpFwd, smac),
            f!("keel_xdp_fwd", XdpFwd, dmac),
            f!("keel_xdp_fwd", XdpFwd, len_ok),
            f!("keel_xdp_fwd", XdpFwd, pad2),
            f!("keel_xdp_fwd", XdpFwd, at_ns),
            s!("keel_maglev_key", MaglevKey),
            f!("keel_maglev_key", MaglevKey, svc_id),
            f!("keel_maglev_key", MaglevKey, idx),
        ]
    }

    #[test]
    fn rust_layouts_match_the_c_header() {
        let rust = rust_layout();
        assert_eq!(
            rust.len(),
            C_LAYOUT.len(),
            "every C struct field has a Rust mirror"
        );
        for (c, r) in C_LAYOUT.iter().zip(&rust) {
            assert_eq!(c, r, "C (left) and Rust (right) disagree");
        }
    }

    #[test]
    fn addresses_round_trip() {
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let k = SvcKey::new(v4, 80, IPPROTO_TCP);
        assert_eq!(k.addr[..4], [10, 96, 0, 10]);
        assert_eq!(k.addr[4..], [0; 12]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.ip(), Some(v4));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let b = L4Addr::new(v6, 8080, BE_F_TERMINATING);
        assert_eq!(
            (b.ip(), b.host_port(), b.family),
            (Some(v6), 8080, AF_INET6)
        );
    }

    #[test]
    fn object_holds_every_program() {
        for obj in [crate::SOCK_OBJECT, crate::TC_OBJECT, crate::XDP_OBJECT] {
            assert_eq!(&SOCK_OBJECT_MAGIC[..], &obj[..4]);
        }
    }

    const SOCK_OBJECT_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
}
