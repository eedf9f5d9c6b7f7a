//! The tc NodePort program run on crafted packets through BPF_PROG_TEST_RUN (no interface, no
//! traffic): DNAT with valid checksums, conntrack hit, reverse NAT of the reply, no-backend
//! reject (the packet turned into a TCP RST / ICMP port unreachable back to the client, with
//! valid checksums; a RST only dropped), ClientIP affinity, Maglev stability when one of ten
//! backends goes. Maps are pinned in a bpffs mounted under the test's state root.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use keel_ebpf::{
    CtKey, CtVal, IPPROTO_TCP, IPPROTO_UDP, KEEL_MAGLEV_M, L4Addr, MaglevKey, SVC_F_NODEPORT,
    SlotKey, SvcKey, SvcStats, SvcVal, TC_OBJECT, TC_PROGRAM, map_names,
};
use keel_proxy::maglev;
use keel_testkit::StateRoot;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

struct Harness {
    ebpf: Ebpf,
    _root: StateRoot,
}

impl Harness {
    fn new() -> Result<Harness> {
        let root = StateRoot::new()?;
        let pins = root.subdir("bpffs")?;
        keel_testkit::run("mount", &["-t", "bpf", "bpf", pins.to_str().unwrap()])?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load(TC_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .context("program")?
            .try_into()?;
        prog.load()?;
        Ok(Harness { ebpf, _root: root })
    }

    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect(name)).expect(name)
    }

    /// One service with `backends` (slots + Maglev table) and optional affinity.
    fn service(&mut self, svc_id: u32, port: u16, proto: u8, backends: &[L4Addr], affinity: u32) {
        let key = SvcKey::new(VIP.into(), port, proto);
        for (i, be) in backends.iter().enumerate() {
            let id = svc_id * 1000 + i as u32;
            self.map::<u32, L4Addr>(map_names::BACKENDS)
                .insert(id, be, 0)
                .unwrap();
            self.map::<SlotKey, u32>(map_names::SLOTS)
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
        let mut mg = self.map::<MaglevKey, u32>(map_names::MAGLEV);
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
            flags: SVC_F_NODEPORT,
        };
        self.map::<SvcKey, SvcVal>(map_names::SERVICES)
            .insert(key, val, 0)
            .unwrap();
    }

    fn clear_conntrack(&mut self) {
        let mut ct = self.map::<CtKey, CtVal>(map_names::CT);
        let keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = ct.remove(&k);
        }
    }

    fn refused(&self, svc_id: u32) -> u64 {
        let arr: PerCpuArray<&MapData, SvcStats> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).unwrap()).unwrap();
        arr.get(&svc_id, 0).unwrap().iter().map(|s| s.refused).sum()
    }

    /// Runs the program once on `pkt`; returns (verdict, packet after the program).
    fn run(&self, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(TC_PROGRAM).unwrap().try_into()?;
        let fd = prog.fd()?.as_fd().as_raw_fd();
        let mut out = vec![0u8; pkt.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: pkt.len() as u32,
            data_size_out: out.len() as u32,
            data_in: pkt.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: attr is a valid bpf_attr prefix for BPF_PROG_TEST_RUN; data_in/data_out point
        // to live buffers of the sizes given, which outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10, /* BPF_PROG_TEST_RUN */
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        if rc != 0 {
            bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
        }
        out.truncate(attr.data_size_out as usize);
        Ok((attr.retval, out))
    }
}

/// `bpf_attr.test` of BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(pkt: &[u8]) -> u32 {
    let ip = &pkt[14..34];
    let l4len = pkt.len() - 34;
    let mut s = 0u32;
    for c in ip[12..20].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s + u32::from(ip[9]) + l4len as u32
}

/// The TCP header fields a test sets: flags, sequence and acknowledgment numbers.
#[derive(Clone, Copy)]
struct Tcp {
    flags: u8,
    seq: u32,
    ack: u32,
}

/// Ethernet + IPv4 + TCP (SYN) or UDP with valid checksums and a small payload.
fn packet(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let syn = Tcp {
        flags: SYN,
        seq: 0,
        ack: 0,
    };
    l4_packet(proto, (src, sport), (dst, dport), syn, b"hello")
}

/// Ethernet (client -> node) + IPv4 + TCP (`tcp`'s fields) or UDP, valid checksums.
fn l4_packet(
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

fn addrs(p: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    ((ip(26), port(34)), (ip(30), port(36)))
}

fn assert_checksums(p: &[u8]) {
    assert_eq!(csum(&p[14..34], 0), 0, "IPv4 header checksum");
    assert_eq!(csum(&p[34..], pseudo(p)), 0, "L4 checksum");
}

fn be(i: u8) -> L4Addr {
    L4Addr::new(Ipv4Addr::new(10, 2, 0, i).into(), 8080, 0)
}

macro_rules! privileged {
    ($name:literal) => {
        if !keel_testkit::privileged($name) {
            return Ok(());
        }
    };
}

#[test]
fn dnat_conntrack_hit_and_reverse_nat_of_the_reply() -> Result<()> {
    privileged!("dnat_conntrack_hit_and_reverse_nat_of_the_reply");
    let mut h = Harness::new()?;
    h.service(1, 80, IPPROTO_TCP, &[be(1)], 0);
    let (verdict, out) = h.run(&packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80))?;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        addrs(&out),
        ((CLIENT, 40000), (Ipv4Addr::new(10, 2, 0, 1), 8080)),
        "DNAT"
    );
    assert_checksums(&out);

    // Conntrack hit: the flow keeps its backend although the service now names another.
    h.service(1, 80, IPPROTO_TCP, &[be(2)], 0);
    let (_, out) = h.run(&packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80))?;
    assert_eq!(
        addrs(&out).1,
        (Ipv4Addr::new(10, 2, 0, 1), 8080),
        "conntrack hit"
    );
    let (_, out) = h.run(&packet(IPPROTO_TCP, CLIENT, 40001, VIP, 80))?;
    assert_eq!(
        addrs(&out).1,
        (Ipv4Addr::new(10, 2, 0, 2), 8080),
        "a new flow takes the new backend"
    );

    // The backend's reply leaves with the service address as its source.
    let reply = packet(IPPROTO_TCP, Ipv4Addr::new(10, 2, 0, 1), 8080, CLIENT, 40000);
    let (verdict, out) = h.run(&reply)?;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(addrs(&out), ((VIP, 80), (CLIENT, 40000)), "reverse NAT");
    assert_checksums(&out);
    Ok(())
}

#[test]
fn udp_dnat_keeps_checksums_valid() -> Result<()> {
    privileged!("udp_dnat_keeps_checksums_valid");
    let mut h = Harness::new()?;
    h.service(2, 53, IPPROTO_UDP, &[be(5)], 0);
    let (verdict, out) = h.run(&packet(IPPROTO_UDP, CLIENT, 5000, VIP, 53))?;
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(addrs(&out).1, (Ipv4Addr::new(10, 2, 0, 5), 8080));
    assert_checksums(&out);
    Ok(())
}

/// Checks the frame is a bare RST from the VIP:80 back to the client (MACs swapped, no
/// options, no payload, valid checksums); returns (flags, seq, ack).
fn rst_fields(out: &[u8]) -> (u8, u32, u32) {
    assert_eq!(
        out.len(),
        54,
        "Ethernet + IPv4 + TCP without options or payload"
    );
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&CLIENT_MAC[..], &NODE_MAC[..]),
        "MACs swapped"
    );
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(out[14], 0x45, "IPv4, no options");
    assert_eq!(
        u16::from_be_bytes([out[16], out[17]]),
        40,
        "IPv4 total length"
    );
    assert_eq!((out[22], out[23]), (64, IPPROTO_TCP), "TTL, protocol");
    assert_eq!(
        addrs(out),
        ((VIP, 80), (CLIENT, 40000)),
        "addresses and ports swapped"
    );
    assert_eq!(out[46] >> 4, 5, "TCP data offset");
    assert_checksums(out);
    let word = |o: usize| u32::from_be_bytes([out[o], out[o + 1], out[o + 2], out[o + 3]]);
    (out[47], word(38), word(42))
}

#[test]
fn tcp_to_a_service_without_backend_is_answered_by_a_rst() -> Result<()> {
    privileged!("tcp_to_a_service_without_backend_is_answered_by_a_rst");
    let mut h = Harness::new()?;
    h.service(3, 80, IPPROTO_TCP, &[], 0);
    let seg = |flags, seq, ack, payload: &[u8]| {
        let tcp = Tcp { flags, seq, ack };
        l4_packet(IPPROTO_TCP, (CLIENT, 40000), (VIP, 80), tcp, payload)
    };

    // A SYN (carrying data, as with TCP Fast Open): RST+ACK, seq 0, ack = seq + SYN + data.
    let (verdict, out) = h.run(&seg(SYN, 0x1234_5678, 0, b"hello"))?;
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    assert_eq!(rst_fields(&out), (RST | ACK, 0, 0x1234_5678 + 1 + 5));
    assert_eq!(h.refused(3), 1);

    // The sequence number wraps; a plain SYN acks just the SYN.
    let (verdict, out) = h.run(&seg(SYN, u32::MAX, 0, b""))?;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(rst_fields(&out), (RST | ACK, 0, 0));

    // A segment with an ACK (a flow the service lost its backends under): RST with seq = its
    // ack and no ACK, as tcp_v4_send_reset answers.
    let (verdict, out) = h.run(&seg(ACK | PSH, 1000, 0xdead_beef, b"hello"))?;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(rst_fields(&out), (RST, 0xdead_beef, 0));

    // A FIN without ACK counts for one, like the SYN.
    let (verdict, out) = h.run(&seg(FIN, 7, 0, b"hello"))?;
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(rst_fields(&out), (RST | ACK, 0, 7 + 5 + 1));
    assert_eq!(h.refused(3), 4);

    // Traffic to anything that is not a service passes untouched.
    let other = packet(IPPROTO_TCP, CLIENT, 40000, Ipv4Addr::new(192, 0, 2, 99), 80);
    let (verdict, out) = h.run(&other)?;
    assert_eq!((verdict, out), (TC_ACT_OK, other));
    Ok(())
}

#[test]
fn rst_to_a_service_without_backend_is_dropped_not_answered() -> Result<()> {
    privileged!("rst_to_a_service_without_backend_is_dropped_not_answered");
    let mut h = Harness::new()?;
    h.service(8, 80, IPPROTO_TCP, &[], 0);
    for flags in [RST, RST | ACK] {
        let tcp = Tcp {
            flags,
            seq: 1,
            ack: 2,
        };
        let rst = l4_packet(IPPROTO_TCP, (CLIENT, 40000), (VIP, 80), tcp, b"");
        let (verdict, _) = h.run(&rst)?;
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "flags {flags:#x}: dropped, never a RST for a RST"
        );
    }
    assert_eq!(h.refused(8), 2, "still counted as refused");
    Ok(())
}

#[test]
fn udp_to_a_service_without_backend_is_answered_by_icmp_port_unreachable() -> Result<()> {
    privileged!("udp_to_a_service_without_backend_is_answered_by_icmp_port_unreachable");
    let mut h = Harness::new()?;
    h.service(7, 53, IPPROTO_UDP, &[], 0);
    let dgram = packet(IPPROTO_UDP, CLIENT, 5000, VIP, 53);
    let (verdict, out) = h.run(&dgram)?;
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the interface");
    assert_eq!(
        out.len(),
        14 + 20 + 8 + 28,
        "Ethernet + IPv4 + ICMP + quote"
    );
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&CLIENT_MAC[..], &NODE_MAC[..]),
        "MACs swapped"
    );
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(out[14], 0x45, "IPv4, no options");
    assert_eq!(
        u16::from_be_bytes([out[16], out[17]]),
        56,
        "IPv4 total length"
    );
    assert_eq!((out[22], out[23]), (64, 1), "TTL, protocol ICMP");
    let ip = |o: usize| Ipv4Addr::new(out[o], out[o + 1], out[o + 2], out[o + 3]);
    assert_eq!(
        (ip(26), ip(30)),
        (VIP, CLIENT),
        "from the frontend to the client"
    );
    assert_eq!(csum(&out[14..34], 0), 0, "IPv4 header checksum");
    assert_eq!(
        (out[34], out[35]),
        (3, 3),
        "destination unreachable, port unreachable"
    );
    assert_eq!(&out[38..42], &[0; 4], "unused field is zero");
    assert_eq!(csum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(
        &out[42..],
        &dgram[14..42],
        "quotes the original IPv4 header and 8 bytes"
    );
    assert_eq!(h.refused(7), 1);
    Ok(())
}

#[test]
fn client_ip_affinity_holds_across_flows() -> Result<()> {
    privileged!("client_ip_affinity_holds_across_flows");
    let mut h = Harness::new()?;
    h.service(4, 80, IPPROTO_TCP, &[be(1), be(2), be(3)], 600);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41030 {
        let (_, out) = h.run(&packet(IPPROTO_TCP, CLIENT, sport, VIP, 80))?;
        seen.insert(addrs(&out).1);
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    Ok(())
}

#[test]
fn maglev_moves_about_a_tenth_of_flows_when_one_of_ten_backends_goes() -> Result<()> {
    privileged!("maglev_moves_about_a_tenth_of_flows_when_one_of_ten_backends_goes");
    let mut h = Harness::new()?;
    let ten: Vec<L4Addr> = (1..=10).map(be).collect();
    h.service(5, 80, IPPROTO_TCP, &ten, 0);
    let flows: Vec<(Ipv4Addr, u16)> = (0..1000u32)
        .map(|i| {
            (
                Ipv4Addr::new(198, 51, (i / 250) as u8, (i % 250) as u8 + 1),
                30000 + i as u16,
            )
        })
        .collect();
    let pick = |h: &Harness| -> Result<Vec<(Ipv4Addr, u16)>> {
        flows
            .iter()
            .map(|(ip, port)| Ok(addrs(&h.run(&packet(IPPROTO_TCP, *ip, *port, VIP, 80))?.1).1))
            .collect()
    };
    let before = pick(&h)?;
    let used: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(used.len(), 10, "all ten backends used");
    // Backend 10.2.0.4 goes; conntrack is cleared so every flow is decided afresh by Maglev.
    let nine: Vec<L4Addr> = ten.iter().copied().filter(|b| *b != be(4)).collect();
    let mut mg = h.map::<MaglevKey, u32>(map_names::MAGLEV);
    for idx in 0..KEEL_MAGLEV_M {
        let _ = mg.remove(&MaglevKey { svc_id: 5, idx });
    }
    h.service(6, 81, IPPROTO_TCP, &[], 0); // unrelated, keeps ids apart
    let t = maglev::table(&nine, KEEL_MAGLEV_M as usize);
    {
        let mut mg = h.map::<MaglevKey, u32>(map_names::MAGLEV);
        for (idx, b) in t.iter().enumerate() {
            let id = 5000 + ten.iter().position(|x| *x == nine[*b]).unwrap() as u32;
            mg.insert(
                MaglevKey {
                    svc_id: 5,
                    idx: idx as u32,
                },
                id,
                0,
            )?;
        }
    }
    h.clear_conntrack();
    let after = pick(&h)?;
    let gone = (Ipv4Addr::new(10, 2, 0, 4), 8080);
    assert!(!after.contains(&gone));
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let forced = before.iter().filter(|b| **b == gone).count();
    let extra = moved - forced;
    eprintln!("maglev: {moved} of 1000 flows moved, {forced} had to (their backend went)");
    assert!(moved <= 150, "{moved} of 1000 flows moved");
    assert!(extra <= 50, "{extra} flows of surviving backends moved");
    Ok(())
}
