//! The tc NodePort program run on crafted packets through BPF_PROG_TEST_RUN (no interface, no
//! traffic): DNAT with valid checksums, conntrack hit, reverse NAT of the reply, no-backend
//! reject (the packet turned into a TCP RST / ICMP port unreachable back to the client, with
//! valid checksums; a RST only dropped), ClientIP affinity, Maglev stability when one of ten
//! backends goes. Maps are pinned in a bpffs mounted under the test's state root.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use keel_ebpf::{
    CtKey, CtVal, IPPROTO_TCP, IPPROTO_UDP, KEEL_MAGLEV_M, L4Addr, MaglevKey, SVC_F_NODEPORT,
    SvcKey, SvcStats, TC_OBJECT, TC_PROGRAM, map_names,
};
use keel_proxy::maglev;
use keel_testkit::StateRoot;

#[path = "support/prog_test.rs"]
mod prog_test;
use prog_test::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

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
        prog_test::service(
            &mut self.ebpf,
            key,
            svc_id,
            backends,
            affinity,
            SVC_F_NODEPORT,
        );
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
        prog_test::test_run(prog.fd()?.as_fd().as_raw_fd(), pkt)
    }
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
