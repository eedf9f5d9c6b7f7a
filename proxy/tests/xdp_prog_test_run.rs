//! The XDP NodePort program run on crafted frames through BPF_PROG_TEST_RUN, next to the tc
//! program on the same pinned maps: DNAT of an externalTrafficPolicy=Local flow with valid IPv4
//! and TCP/UDP checksums, conntrack hit on the next packet, the tc program agreeing on the flow;
//! FIB forwarding (XDP_REDIRECT with the next hop's MACs and TTL - 1) when the test's namespace
//! has a route and a neighbour, XDP_PASS of the DNATed frame when it has none; the per-CPU FIB
//! cache (used by the flow's later packets, within its lifetime, the flow's tag and the MTU
//! checked length only); what it leaves to
//! tc untouched (Cluster policy, also once tc made the flow; no backends; replies; anything not
//! a service).
//!
//! Each program run happens on a thread inside a network namespace the test made, so the FIB
//! lookup sees only that namespace's routes (the test run's ingress device is its loopback).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use keel_ebpf::{
    CT_F_SNAT, CtKey, CtVal, IPPROTO_TCP, IPPROTO_UDP, KEEL_XDP_FWD_NS, KEEL_XDP_FWD_SLOTS, L4Addr,
    NatVal, SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SvcKey, SvcStats, TC_OBJECT, TC_PROGRAM, XDP_OBJECT,
    XDP_PROGRAM, XdpFwd, map_names,
};
use keel_testkit::{NetnsGuard, StateRoot, VethPair};

#[path = "support/prog_test.rs"]
mod prog_test;
use prog_test::*;

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const LOCAL: u32 = SVC_F_NODEPORT | SVC_F_LOCAL_ONLY;
const CLUSTER: u32 = SVC_F_NODEPORT;

struct Harness {
    xdp: Ebpf,
    tc: Ebpf,
    /// Where the programs run: a fresh namespace (no routes, forwarding off) unless a test
    /// gives it a route.
    ns: NetnsGuard,
    _root: StateRoot,
}

impl Harness {
    fn new() -> Result<Harness> {
        let root = StateRoot::new()?;
        let pins = root.subdir("bpffs")?;
        keel_testkit::run("mount", &["-t", "bpf", "bpf", pins.to_str().unwrap()])?;
        let load = |obj: &[u8]| EbpfLoader::new().default_map_pin_directory(&pins).load(obj);
        let mut xdp = load(XDP_OBJECT)?;
        let p: &mut Xdp = xdp.program_mut(XDP_PROGRAM).context("xdp")?.try_into()?;
        p.load()?;
        let mut tc = load(TC_OBJECT)?;
        let p: &mut SchedClassifier = tc.program_mut(TC_PROGRAM).context("tc")?.try_into()?;
        p.load()?;
        Ok(Harness {
            xdp,
            tc,
            ns: NetnsGuard::new()?,
            _root: root,
        })
    }

    fn service(&mut self, svc_id: u32, port: u16, proto: u8, backends: &[L4Addr], flags: u32) {
        let key = SvcKey::new(VIP.into(), port, proto);
        service(&mut self.xdp, key, svc_id, backends, 0, flags);
    }

    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.xdp.map_mut(name).expect(name)).expect(name)
    }

    fn stats(&self, svc_id: u32) -> SvcStats {
        let arr: PerCpuArray<&MapData, SvcStats> =
            PerCpuArray::try_from(self.xdp.map(map_names::STATS).unwrap()).unwrap();
        arr.get(&svc_id, 0)
            .unwrap()
            .iter()
            .fold(SvcStats::default(), |a, s| SvcStats {
                connects: a.connects + s.connects,
                datagrams: a.datagrams + s.datagrams,
                refused: a.refused + s.refused,
            })
    }

    /// Makes the harness namespace forward and reach 10.2.0.0/24 over x0 (MAC
    /// 02:00:00:00:00:bb), with a permanent neighbour entry for BE1 (02:00:00:00:00:aa); the
    /// routes go with the returned guards.
    fn route_to_backends(&self) -> Result<(VethPair, NetnsGuard)> {
        let peer = NetnsGuard::new()?;
        let veth = VethPair::between(&self.ns, "x0", &peer, "x1")?;
        let ns = &self.ns;
        ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
        ns.exec("ip", &["link", "set", "x0", "address", "02:00:00:00:00:bb"])?;
        ns.exec("ip", &["addr", "add", "10.2.0.254/24", "dev", "x0"])?;
        ns.exec("ip", &["link", "set", "x0", "up"])?;
        peer.exec("ip", &["link", "set", "x1", "up"])?;
        let neigh = "neigh replace 10.2.0.1 lladdr 02:00:00:00:00:aa dev x0 nud permanent";
        ns.exec("ip", &neigh.split(' ').collect::<Vec<_>>())?;
        Ok((veth, peer))
    }

    /// Runs the XDP program once on `pkt` inside the harness's namespace.
    fn xdp(&self, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
        let p: &Xdp = self.xdp.program(XDP_PROGRAM).unwrap().try_into()?;
        run_in(&self.ns.path(), p.fd()?.as_fd().as_raw_fd(), pkt)
    }

    /// Runs the tc ingress program once on `pkt`.
    fn tc(&self, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
        let p: &SchedClassifier = self.tc.program(TC_PROGRAM).unwrap().try_into()?;
        run_in(&self.ns.path(), p.fd()?.as_fd().as_raw_fd(), pkt)
    }

    fn ct(&mut self, sport: u16, dport: u16, proto: u8) -> Option<CtVal> {
        let key = CtKey {
            saddr: u32::from_ne_bytes(CLIENT.octets()),
            daddr: u32::from_ne_bytes(VIP.octets()),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            pad: [0; 3],
        };
        self.map::<CtKey, CtVal>(map_names::CT).get(&key, 0).ok()
    }
}

/// BPF_PROG_TEST_RUN on a thread that entered `ns`.
fn run_in(ns: &Path, fd: i32, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
    let file = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    let pkt = pkt.to_vec();
    std::thread::spawn(move || -> Result<(u32, Vec<u8>)> {
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        test_run(fd, &pkt)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("test-run thread panicked"))?
}

fn be(i: u8) -> L4Addr {
    L4Addr::new(Ipv4Addr::new(10, 2, 0, i).into(), 8080, 0)
}

const BE1: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 2, 0, 1), 8080);

macro_rules! privileged {
    ($name:literal) => {
        if !keel_testkit::privileged($name) {
            return Ok(());
        }
    };
}

#[test]
fn xdp_dnat_of_a_local_policy_flow_without_a_route_passes_it_to_the_stack() -> Result<()> {
    privileged!("xdp_dnat_of_a_local_policy_flow_without_a_route_passes_it_to_the_stack");
    let mut h = Harness::new()?;
    h.service(1, 80, IPPROTO_TCP, &[be(1)], LOCAL);
    let syn = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80);
    let (verdict, out) = h.xdp(&syn)?;
    // The namespace has no route (and forwarding is off): the FIB lookup fails, so the DNATed
    // frame goes to the stack, MACs and TTL as they came.
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addrs(&out), ((CLIENT, 40000), BE1), "DNAT");
    assert_checksums(&out);
    assert_eq!(&out[..12], &syn[..12], "MACs untouched");
    assert_eq!(out[22], syn[22], "TTL untouched");
    let ct = h.ct(40000, 80, IPPROTO_TCP).context("conntrack entry")?;
    assert_eq!(ct.flags, 0, "a Local flow is not masqueraded");
    assert_eq!(h.stats(1).connects, 1);
    let reply = CtKey {
        saddr: u32::from_ne_bytes([10, 2, 0, 1]),
        daddr: u32::from_ne_bytes(CLIENT.octets()),
        sport: 8080u16.to_be(),
        dport: 40000u16.to_be(),
        proto: IPPROTO_TCP,
        pad: [0; 3],
    };
    let nat = h
        .map::<CtKey, NatVal>(map_names::TC_REVNAT)
        .get(&reply, 0)?;
    assert_eq!(
        (nat.addr, u16::from_be(nat.port)),
        (u32::from_ne_bytes(VIP.octets()), 80),
        "reverse NAT for tc"
    );

    // Conntrack hit: the flow keeps its backend although the service now names another; a new
    // flow takes the new one.
    h.service(1, 80, IPPROTO_TCP, &[be(2)], LOCAL);
    let (verdict, out) = h.xdp(&syn)?;
    assert_eq!((verdict, addrs(&out).1), (XDP_PASS, BE1), "conntrack hit");
    assert_checksums(&out);
    let (_, out) = h.xdp(&packet(IPPROTO_TCP, CLIENT, 40001, VIP, 80))?;
    assert_eq!(addrs(&out).1, (Ipv4Addr::new(10, 2, 0, 2), 8080));
    assert_eq!(h.stats(1).connects, 2, "one connect per new flow");

    // tc agrees on the flow XDP made (as when a packet of it reaches tc first).
    let (verdict, out) = h.tc(&syn)?;
    assert_eq!(
        (verdict, addrs(&out).1),
        (TC_ACT_OK, BE1),
        "tc: same backend"
    );
    Ok(())
}

#[test]
fn xdp_udp_dnat_keeps_checksums_valid() -> Result<()> {
    privileged!("xdp_udp_dnat_keeps_checksums_valid");
    let mut h = Harness::new()?;
    h.service(2, 53, IPPROTO_UDP, &[be(5)], LOCAL);
    let (verdict, out) = h.xdp(&packet(IPPROTO_UDP, CLIENT, 5000, VIP, 53))?;
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(addrs(&out).1, (Ipv4Addr::new(10, 2, 0, 5), 8080));
    assert_checksums(&out);
    // Many flows: every checksum the incremental update produces verifies (ports and
    // addresses vary the carries).
    for sport in (1u16..65000).step_by(997) {
        let (_, out) = h.xdp(&packet(IPPROTO_UDP, CLIENT, sport, VIP, 53))?;
        assert_checksums(&out);
        let (_, out) = h.xdp(&packet(IPPROTO_TCP, CLIENT, sport, VIP, 53))?;
        assert_eq!(addrs(&out).1.1, 53, "TCP/53 is no service: untouched");
    }
    // A datagram without checksum (0) keeps none.
    let mut nocsum = packet(IPPROTO_UDP, CLIENT, 5001, VIP, 53);
    nocsum[40..42].copy_from_slice(&[0, 0]);
    let (_, out) = h.xdp(&nocsum)?;
    assert_eq!(addrs(&out).1, (Ipv4Addr::new(10, 2, 0, 5), 8080));
    assert_eq!(&out[40..42], &[0, 0], "no UDP checksum stays none");
    assert_eq!(csum(&out[14..34], 0), 0, "IPv4 header checksum");
    Ok(())
}

#[test]
fn xdp_forwards_by_the_fib_when_route_and_neighbour_exist() -> Result<()> {
    privileged!("xdp_forwards_by_the_fib_when_route_and_neighbour_exist");
    let mut h = Harness::new()?;
    h.service(3, 80, IPPROTO_TCP, &[be(1)], LOCAL);
    let _route = h.route_to_backends()?;
    let syn = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80);
    let (verdict, out) = h.xdp(&syn)?;
    assert_eq!(verdict, XDP_REDIRECT, "forwarded without the stack");
    assert_eq!(addrs(&out), ((CLIENT, 40000), BE1), "DNAT");
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&[0x02, 0, 0, 0, 0, 0xaa][..], &[0x02, 0, 0, 0, 0, 0xbb][..]),
        "next hop's MAC, egress interface's MAC"
    );
    assert_eq!(out[22], syn[22] - 1, "TTL decremented");
    assert_checksums(&out);
    // A TTL about to expire goes to the stack (which answers it), still DNATed.
    let mut last_hop = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80);
    last_hop[22] = 1;
    let c = csum(&[&last_hop[14..24], &[0, 0], &last_hop[26..34]].concat(), 0);
    last_hop[24..26].copy_from_slice(&c.to_be_bytes());
    let (verdict, out) = h.xdp(&last_hop)?;
    assert_eq!((verdict, addrs(&out).1), (XDP_PASS, BE1));
    assert_checksums(&out);
    Ok(())
}

/// CLOCK_MONOTONIC_COARSE in ns: the forwarding cache's clock (bpf_ktime_get_coarse_ns).
fn coarse_now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` outlives the call.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) },
        0
    );
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The XDP program's forwarding cache slots holding a flow to `backend` (network byte order):
/// (slot, CPU, entry).
fn fwd_cache_entries(h: &Harness, backend: u32) -> Vec<(u32, usize, XdpFwd)> {
    let arr: PerCpuArray<&MapData, XdpFwd> =
        PerCpuArray::try_from(h.xdp.map(map_names::XDP_FWD).unwrap()).unwrap();
    let mut found = Vec::new();
    for slot in 0..KEEL_XDP_FWD_SLOTS {
        for (cpu, e) in arr.get(&slot, 0).unwrap().iter().enumerate() {
            if e.at_ns != 0 && e.backend_addr == backend {
                found.push((slot, cpu, *e));
            }
        }
    }
    found
}

/// Writes `entry` into `slot` on every CPU (the test run may land on any).
fn plant_fwd_cache(h: &mut Harness, slot: u32, entry: XdpFwd) {
    let mut arr: PerCpuArray<&mut MapData, XdpFwd> =
        PerCpuArray::try_from(h.xdp.map_mut(map_names::XDP_FWD).unwrap()).unwrap();
    let n = aya::util::nr_cpus().unwrap();
    arr.set(
        slot,
        aya::maps::PerCpuValues::try_from(vec![entry; n]).unwrap(),
        0,
    )
    .unwrap();
}

#[test]
fn xdp_forwarding_cache_serves_a_flow_within_its_lifetime_and_mtu_only() -> Result<()> {
    privileged!("xdp_forwarding_cache_serves_a_flow_within_its_lifetime_and_mtu_only");
    let mut h = Harness::new()?;
    h.service(3, 80, IPPROTO_TCP, &[be(1)], LOCAL);
    let _route = h.route_to_backends()?;
    h.ns.exec("ip", &["link", "set", "x0", "mtu", "1000"])?;
    let backend = u32::from_ne_bytes(BE1.0.octets());
    let dmac = |out: &[u8]| -> [u8; 6] { out[0..6].try_into().unwrap() };
    let syn = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80);

    // The first packet's lookup fills exactly one slot, tagged with the DNATed flow.
    let (verdict, out) = h.xdp(&syn)?;
    assert_eq!((verdict, dmac(&out)), (XDP_REDIRECT, [2, 0, 0, 0, 0, 0xaa]));
    let cached = fwd_cache_entries(&h, backend);
    assert_eq!(cached.len(), 1, "one slot on one CPU: {cached:?}");
    let (slot, _, entry) = cached[0];
    assert_eq!(
        (
            entry.flow.sport,
            entry.flow.dport,
            entry.flow.proto,
            entry.backend_port,
            entry.dmac,
            entry.smac
        ),
        (
            40000u16.to_be(),
            80u16.to_be(),
            IPPROTO_TCP,
            BE1.1.to_be(),
            [2, 0, 0, 0, 0, 0xaa],
            [2, 0, 0, 0, 0, 0xbb]
        )
    );
    assert_eq!(usize::from(entry.len_ok), syn.len() - 14);

    // The flow's next packet takes the cached decision, no conntrack or FIB lookup: a planted
    // backend port and next hop are what it gets (checksums still right for them).
    let planted = XdpFwd {
        backend_port: 9090u16.to_be(),
        dmac: [2, 0, 0, 0, 0, 0xee],
        at_ns: coarse_now_ns(),
        ..entry
    };
    plant_fwd_cache(&mut h, slot, planted);
    let (verdict, out) = h.xdp(&syn)?;
    assert_eq!(
        (verdict, dmac(&out), addrs(&out).1),
        (XDP_REDIRECT, [2, 0, 0, 0, 0, 0xee], (BE1.0, 9090))
    );
    assert_checksums(&out);

    // A longer packet than the lookup passed is looked up again: over x0's MTU it goes to the
    // stack (which answers it), and the slot of the CPU it ran on is emptied (the planted
    // copies on the others stay).
    let big = l4_packet(
        IPPROTO_TCP,
        (CLIENT, 40000),
        (VIP, 80),
        Tcp {
            flags: ACK,
            seq: 1,
            ack: 1,
        },
        &[0x6b; 1200],
    );
    let (verdict, out) = h.xdp(&big)?;
    assert_eq!((verdict, addrs(&out).1), (XDP_PASS, BE1));
    let left = fwd_cache_entries(&h, backend);
    assert_eq!(left.len(), aya::util::nr_cpus().unwrap() - 1, "{left:?}");

    // An entry older than its lifetime is decided again: conntrack's backend and the real
    // neighbour, not the planted ones.
    plant_fwd_cache(
        &mut h,
        slot,
        XdpFwd {
            at_ns: coarse_now_ns() - KEEL_XDP_FWD_NS - 1_000_000,
            ..planted
        },
    );
    let (verdict, out) = h.xdp(&syn)?;
    assert_eq!(
        (verdict, dmac(&out), addrs(&out).1),
        (XDP_REDIRECT, [2, 0, 0, 0, 0, 0xaa], BE1)
    );

    // Only the tag's flow matches: with the first flow's fresh planted entry in every slot,
    // another client port is decided and looked up (conntrack's backend, the real neighbour).
    let fresh = XdpFwd {
        at_ns: coarse_now_ns(),
        ..planted
    };
    for slot in 0..KEEL_XDP_FWD_SLOTS {
        plant_fwd_cache(&mut h, slot, fresh);
    }
    let other = packet(IPPROTO_TCP, CLIENT, 40001, VIP, 80);
    let (verdict, out) = h.xdp(&other)?;
    assert_eq!(
        (verdict, dmac(&out), addrs(&out).1),
        (XDP_REDIRECT, [2, 0, 0, 0, 0, 0xaa], BE1)
    );
    Ok(())
}

#[test]
fn xdp_leaves_cluster_policy_no_backends_replies_and_other_traffic_to_tc() -> Result<()> {
    privileged!("xdp_leaves_cluster_policy_no_backends_replies_and_other_traffic_to_tc");
    let mut h = Harness::new()?;
    h.service(4, 80, IPPROTO_TCP, &[be(1)], CLUSTER);
    h.service(5, 81, IPPROTO_TCP, &[], LOCAL);
    h.service(6, 82, IPPROTO_TCP, &[be(3)], LOCAL);

    // Cluster policy needs masquerade (netfilter, after tc's mark): untouched, nothing created.
    let cluster = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 80);
    let (verdict, out) = h.xdp(&cluster)?;
    assert_eq!((verdict, &out), (XDP_PASS, &cluster), "Cluster: untouched");
    assert!(h.ct(40000, 80, IPPROTO_TCP).is_none(), "no conntrack entry");
    assert_eq!(h.stats(4).connects, 0);
    // Once tc has made the flow (flagged for masquerade), XDP still leaves it alone.
    let (verdict, out) = h.tc(&cluster)?;
    assert_eq!((verdict, addrs(&out).1), (TC_ACT_OK, BE1));
    let ct = h.ct(40000, 80, IPPROTO_TCP).context("tc's entry")?;
    assert_eq!(ct.flags, CT_F_SNAT);
    let (verdict, out) = h.xdp(&cluster)?;
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &cluster),
        "SNAT flow: untouched"
    );

    // No backends: tc rejects and counts it; XDP neither answers nor counts.
    let empty = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 81);
    let (verdict, out) = h.xdp(&empty)?;
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &empty),
        "no backends: untouched"
    );
    assert_eq!(h.stats(5).refused, 0, "left for tc to count");

    // A reply of a backend (a reverse-NAT hit) is tc's.
    let (_, _) = h.xdp(&packet(IPPROTO_TCP, CLIENT, 40002, VIP, 82))?;
    let reply = packet(IPPROTO_TCP, Ipv4Addr::new(10, 2, 0, 3), 8080, CLIENT, 40002);
    let (verdict, out) = h.xdp(&reply)?;
    assert_eq!((verdict, &out), (XDP_PASS, &reply), "reply: untouched");

    // Not a service, or not TCP/UDP over IPv4: untouched.
    let other = packet(IPPROTO_TCP, CLIENT, 40000, Ipv4Addr::new(192, 0, 2, 99), 80);
    let (verdict, out) = h.xdp(&other)?;
    assert_eq!((verdict, &out), (XDP_PASS, &other), "not a service");
    let mut arp = packet(IPPROTO_TCP, CLIENT, 40000, VIP, 82);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (verdict, out) = h.xdp(&arp)?;
    assert_eq!((verdict, &out), (XDP_PASS, &arp), "not IPv4");
    Ok(())
}
