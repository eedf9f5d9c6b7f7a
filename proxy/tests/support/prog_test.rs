//! Crafted frames and BPF_PROG_TEST_RUN, shared by the tests that run the NodePort programs
//! (tc and XDP) on packets without an interface: Ethernet + IPv4 + TCP/UDP builders with valid
//! checksums, checksum and address readers, the test-run syscall, and a service seeded into the
//! maps (slots, backends, Maglev table).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use keel_ebpf::{
    IPPROTO_TCP, KEEL_MAGLEV_M, L4Addr, MaglevKey, SlotKey, SvcKey, SvcVal, map_names,
};
use keel_proxy::maglev;
use keel_testkit::bpf_test_run::test_run as test_run_attr;
pub use keel_testkit::bpf_test_run::{TestRunAttr, csum, pseudo};

pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Runs the loaded program `prog_fd` once on `pkt` (in the calling thread's network
/// namespace); returns (verdict, packet after the program).
pub fn test_run(prog_fd: i32, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; pkt.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: pkt.len() as u32,
        data_size_out: out.len() as u32,
        data_in: pkt.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: data_in/data_out point to live buffers of the sizes given, which outlive the call.
    if let Err(e) = unsafe { test_run_attr(&mut attr) } {
        bail!("BPF_PROG_TEST_RUN: {e}");
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// The TCP header fields a test sets: flags, sequence and acknowledgment numbers.
#[derive(Clone, Copy)]
pub struct Tcp {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
}

/// Ethernet + IPv4 + TCP (SYN) or UDP with valid checksums and a small payload.
pub fn packet(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let syn = Tcp {
        flags: SYN,
        seq: 0,
        ack: 0,
    };
    l4_packet(proto, (src, sport), (dst, dport), syn, b"hello")
}

/// Ethernet (client -> node) + IPv4 + TCP (`tcp`'s fields) or UDP, valid checksums.
pub fn l4_packet(
    proto: u8,
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    tcp: Tcp,
    payload: &[u8],
) -> Vec<u8> {
    let l4len = if proto == IPPROTO_TCP { 20 } else { 8 } + payload.len();
    let mut p = vec![0u8; 14 + 20 + l4len];
    p[0..6].copy_from_slice(&NODE_MAC);
    p[6..12].copy_from_slice(&CLIENT_MAC);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p[34..36].copy_from_slice(&sport.to_be_bytes());
    p[36..38].copy_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        p[38..42].copy_from_slice(&tcp.seq.to_be_bytes());
        p[42..46].copy_from_slice(&tcp.ack.to_be_bytes());
        p[46] = 5 << 4;
        p[47] = tcp.flags;
        p[48..50].copy_from_slice(&64240u16.to_be_bytes());
        p[54..].copy_from_slice(payload);
    } else {
        p[38..40].copy_from_slice(&(l4len as u16).to_be_bytes());
        p[42..].copy_from_slice(payload);
    }
    let off = if proto == IPPROTO_TCP { 50 } else { 40 };
    let c = csum(&p[34..], pseudo(&p));
    p[off..off + 2].copy_from_slice(&c.to_be_bytes());
    p
}

pub fn addrs(p: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    ((ip(26), port(34)), (ip(30), port(36)))
}

pub fn assert_checksums(p: &[u8]) {
    assert_eq!(csum(&p[14..34], 0), 0, "IPv4 header checksum");
    assert_eq!(csum(&p[34..], pseudo(p)), 0, "L4 checksum");
}

fn map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> HashMap<&'a mut MapData, K, V> {
    HashMap::try_from(ebpf.map_mut(name).expect(name)).expect(name)
}

/// Service `svc_id` at `key` with `backends` (ids svc_id * 1000 + i; slots + Maglev table),
/// ClientIP affinity `affinity` seconds (0: none) and `KEEL_SVC_F_*` `flags`.
pub fn service(
    ebpf: &mut Ebpf,
    key: SvcKey,
    svc_id: u32,
    backends: &[L4Addr],
    affinity: u32,
    flags: u32,
) {
    for (i, be) in backends.iter().enumerate() {
        let id = svc_id * 1000 + i as u32;
        map::<u32, L4Addr>(ebpf, map_names::BACKENDS)
            .insert(id, be, 0)
            .unwrap();
        map::<SlotKey, u32>(ebpf, map_names::SLOTS)
            .insert(
                SlotKey {
                    svc_id,
                    slot: i as u32,
                },
                id,
                0,
            )
            .unwrap();
    }
    let t = maglev::table(backends, KEEL_MAGLEV_M as usize);
    let mut mg = map::<MaglevKey, u32>(ebpf, map_names::MAGLEV);
    for (idx, b) in t.iter().enumerate() {
        mg.insert(
            MaglevKey {
                svc_id,
                idx: idx as u32,
            },
            svc_id * 1000 + *b as u32,
            0,
        )
        .unwrap();
    }
    let val = SvcVal {
        svc_id,
        ready: backends.len() as u16,
        terminating: 0,
        affinity_timeout: affinity,
        flags,
    };
    map::<SvcKey, SvcVal>(ebpf, map_names::SERVICES)
        .insert(key, val, 0)
        .unwrap();
}
