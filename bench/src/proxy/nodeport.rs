//! `bench proxy` (4): NodePort small-UDP packet rate from outside the node, counted at the
//! backend (so drops count against the path): keel's XDP program and keel's tc programs against
//! kube-proxy's NodePort DNAT (KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVL -> KUBE-SEP).
//!
//! Three measurements on the same nodes, each printed as its own table:
//! - the forwarding rate at the backend's interface, the one the target (keel XDP >= 2x
//!   iptables) is judged on: a cheap generator and a cheap sink, the same for every node, as a
//!   forwarding path is measured (pktgen -> device under test -> sink on the wire). The kernel
//!   has no pktgen here, so the generator is an XDP program (keel-ebpf's bench::GEN_PROGRAM) run
//!   by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, as xdp-tools' xdp-trafficgen does: it
//!   writes a 64-byte UDP datagram with complete checksums (source port rotated over NP_FLOWS
//!   ports, many flows as NodePort traffic is) and redirects it out of the client's e0, so n0
//!   receives it as a frame off the wire. The sink is a native XDP program on the backend's
//!   eth0 (bench::SINK_XDP_PROGRAM) that counts a packet as delivered only when it is addressed
//!   to the backend (10.89.0.2:8053) with valid IPv4 and UDP checksums, counts any other IPv4
//!   packet as other, and drops both: a drop or a wrong translation counts against the path. It
//!   sees each frame as it arrives, before the backend's stack builds anything for it, so what
//!   is counted is what the node's path costs, up to handing the frame to the backend's device
//!   (and freeing it there: iptables' skb, keel's frame; veth hands the node's skbs to XDP
//!   without a copy, their headroom is an XDP frame's). Everything runs in the generator's
//!   softirq on one CPU (veth hands frames to the peer's NAPI on the sending CPU), so the rate
//!   is one over the per-packet cost of generator + node + sink, where generator and sink are a
//!   small, equal part;
//! - the same rate into the backend's stack: the sink on tc ingress (bench::SINK_PROGRAM), which
//!   also charges each path the backend's receive (an skb built from keel's frame, GRO, the
//!   checksum verified), as a local backend pod pays it;
//! - the view with a userspace sender and receiver (sendmmsg in the client netns, recvmmsg in
//!   the backend's): closer to what an application sees, but on a 2-core VM all softirq work
//!   runs on the sender's CPU and the sender's and receiver's socket work is most of each
//!   packet's cost, so the node's path is a small share and no ratio between nodes can show.
//!
//! Topology, as proxy/tests/nodeport.rs has it: an "external" client netns, a "node" netns with
//! the NodePort address on its external veth (n0) and a backend netns behind a second veth (n1)
//! (10.88.0.0/24 and 10.89.0.0/24, only inside these namespaces). Made five times, so that no
//! node sees another's programs or netfilter tables: two nodes for keel's XDP program on n0 (with
//! the tc programs beside it, as `keel proxy --xdp-iface n0 --tc-iface n0 --tc-iface n1` has
//! them), one in native mode and one in generic mode (veth refuses native XDP while its peer's
//! MTU is above a page, so the loader falls back as on a driver without native XDP), one for
//! keel's tc programs alone, one for kube-proxy's rules, and one that translates nothing (the
//! client sends to the backend's own address): the rate of the node's forwarding path alone,
//! the ceiling of anything that still goes through the node's stack.
//!
//! On a veth, native XDP is not the fast path it is on a NIC: veth converts each skb from the
//! sender into an xdp_buff, copying it into a page-pool page when its headroom is under
//! XDP_PACKET_HEADROOM (a UDP socket's skb always is), and the backend's veth builds a new skb
//! from the redirected frame. Generic XDP runs on the skb itself (its headroom expanded in
//! place) and hands it on: all it skips is the node's IP stack.
//!
//! Set on every side alike (same sender, same receiver, same generator and sink):
//! - the client's veth (e0) sends complete UDP checksums (tx-checksumming off), as frames off a
//!   NIC have them: XDP cannot see a veth's CHECKSUM_PARTIAL, its incremental update assumes a
//!   complete checksum (ebpf/c/xdp_nodeport.c), and a partial one redirected by native XDP
//!   reaches the backend as a bad checksum (with tx-checksumming on, none of 1.2 M arrived);
//! - the backend's veth (eth0) has GRO on, which gives it a NAPI context: native XDP_REDIRECT
//!   into a veth (n1) hands the frame to the peer's NAPI and drops it when the peer has none
//!   (drivers/net/veth.c, veth_xdp_xmit). An XDP program on the peer (keel_xdp_pass) does the
//!   same; GRO is what a pod's veth can have without loading anything;
//! - the receiver polls (MSG_DONTWAIT) instead of sleeping (see `udp_count`);
//! - for the forwarding rate, n0 too has GRO on (switched on after the socket view, which keeps
//!   its setting of earlier runs): the generator's frames are XDP frames transmitted into e0,
//!   which veth_xdp_xmit hands to n0's NAPI and drops without one (keel's native-XDP node has one
//!   from its program anyway). The sink passes ARP and IPv6 so the node still resolves the
//!   backend's address.
//!
//! The XDP side's node-stack counters (Ip InReceives, ForwDatagrams of the node's netns) show
//! whether its datagrams took the redirect or fell through to the stack (XDP_PASS).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_proxy::model::NodeContext;
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, VethPair};

use keel_testkit::netns::{ETHTOOL_SGRO, ETHTOOL_STXCSUM, in_netns, set_offload};

use super::iptables_restore;
use trafficgen::{Generator, Sink, SinkAt, SinkCount, link_info, udp_frame};

mod trafficgen;

const NP_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const NP_PORT: u16 = 30053;
const NP_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 2);
const NP_BACKEND_PORT: u16 = 8053;
const NP_PAYLOAD: usize = 64;
/// Datagrams per sendmmsg/recvmmsg call.
const NP_BATCH: usize = 64;
const NP_WARMUP: Duration = Duration::from_secs(1);
/// Measured windows per side, the sides alternating, so a burst of other load on the machine
/// falls on all of them.
const NP_ROUNDS: u32 = 3;
const NP_WINDOW: Duration = Duration::from_millis(1500);
/// How long the receiver's queue stays empty after the sender stopped before the window ends.
const NP_DRAIN: Duration = Duration::from_millis(50);

/// The forwarding rate's frames: from the client's address, the source port rotated over
/// NP_FLOWS ports from NP_SPORT (many flows, as NodePort traffic is; the same on every node).
const NP_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const NP_SPORT: u16 = 10000;
const NP_FLOWS: u32 = 256;
const FWD_WARMUP: Duration = Duration::from_millis(500);
const FWD_WINDOW: Duration = Duration::from_millis(1500);
/// Time for what is still queued on the node's and backend's veths to reach the sink.
const FWD_DRAIN: Duration = Duration::from_millis(50);
// The sink checksums exactly the bench's datagram.
const _: () = assert!(NP_PAYLOAD + 8 == keel_ebpf::bench::UDP_LEN);

const NODEPORT_MANIFESTS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: b}\nspec:\n  type: NodePort\n  clusterIP: 10.96.8.10\n  externalTrafficPolicy: Local\n  ports: [{name: u, port: 53, protocol: UDP, nodePort: 30053}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: np-1, namespace: b, labels: {kubernetes.io/service-name: np}}\naddressType: IPv4\nports: [{name: u, port: 8053, protocol: UDP}]\nendpoints: [{addresses: [10.89.0.2]}]\n";

/// The nat table kube-proxy's iptables mode writes for that service (UDP NodePort,
/// externalTrafficPolicy=Local, one endpoint on this node, --cluster-cidr 10.244.0.0/16), as
/// `iptables-save` shows it: the nodeport jump last in KUBE-SERVICES, KUBE-NODEPORTS ->
/// KUBE-EXT -> KUBE-SVL -> KUBE-SEP DNAT, and the masquerade plumbing. The rules are walked
/// for a flow's first packet; conntrack translates the rest, as on a real node. kube-proxy's
/// filter-table chains (KUBE-FORWARD, KUBE-FIREWALL, ...) are left out: they would only add
/// per-packet work to the anchor.
fn nodeport_iptables_rules() -> String {
    let (svc, sep) = ("KEELBENCHNPUDP53", "KEELBENCHNPEP001");
    let c = "b/np:u";
    let be = format!("{NP_BACKEND}:{NP_BACKEND_PORT}");
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-EXT-{svc} - [0:0]
:KUBE-SVL-{svc} - [0:0]
:KUBE-SVC-{svc} - [0:0]
:KUBE-SEP-{sep} - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.8.10/32 -p udp -m comment --comment \"{c} cluster IP\" -m udp --dport 53 -j KUBE-SVC-{svc}
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p udp -m comment --comment \"{c}\" -m udp --dport {NP_PORT} -j KUBE-EXT-{svc}
-A KUBE-EXT-{svc} -s 10.244.0.0/16 -m comment --comment \"pod traffic for {c} external destinations\" -j KUBE-SVC-{svc}
-A KUBE-EXT-{svc} -m comment --comment \"masquerade LOCAL traffic for {c} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-{svc} -m comment --comment \"route LOCAL traffic for {c} external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-{svc}
-A KUBE-EXT-{svc} -j KUBE-SVL-{svc}
-A KUBE-SVC-{svc} ! -s 10.244.0.0/16 -d 10.96.8.10/32 -p udp -m comment --comment \"{c} cluster IP\" -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-{svc} -m comment --comment \"{c} -> {be}\" -j KUBE-SEP-{sep}
-A KUBE-SVL-{svc} -m comment --comment \"{c} -> {be}\" -j KUBE-SEP-{sep}
-A KUBE-SEP-{sep} -s {NP_BACKEND}/32 -m comment --comment \"{c}\" -j KUBE-MARK-MASQ
-A KUBE-SEP-{sep} -p udp -m comment --comment \"{c}\" -m udp -j DNAT --to-destination {be}
COMMIT
"
    )
}

/// External client netns -- node netns (NodePort address on n0) -- backend netns (behind n1).
struct NodePortNet {
    // Declared first, so dropped first: the pairs go before their namespaces.
    _veths: [VethPair; 2],
    ext: NetnsGuard,
    node: NetnsGuard,
    backend: NetnsGuard,
}

impl NodePortNet {
    fn new() -> anyhow::Result<Self> {
        let ext = NetnsGuard::new()?;
        let node = NetnsGuard::new()?;
        let backend = NetnsGuard::new()?;
        let veths = [
            VethPair::between(&ext, "e0", &node, "n0")?,
            VethPair::between(&node, "n1", &backend, "eth0")?,
        ];
        ext.exec("ip", &["addr", "add", "10.88.0.1/24", "dev", "e0"])?;
        ext.exec("ip", &["link", "set", "e0", "up"])?;
        // Only the ceiling's client sends to the backend's own address.
        ext.exec(
            "ip",
            &[
                "route",
                "add",
                "10.89.0.0/24",
                "via",
                &NP_NODE_IP.to_string(),
            ],
        )?;
        node.exec(
            "ip",
            &["addr", "add", &format!("{NP_NODE_IP}/24"), "dev", "n0"],
        )?;
        node.exec("ip", &["addr", "add", "10.89.0.1/24", "dev", "n1"])?;
        node.exec("ip", &["link", "set", "n0", "up"])?;
        node.exec("ip", &["link", "set", "n1", "up"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        backend.exec(
            "ip",
            &["addr", "add", &format!("{NP_BACKEND}/24"), "dev", "eth0"],
        )?;
        backend.exec("ip", &["link", "set", "eth0", "up"])?;
        backend.exec("ip", &["route", "add", "default", "via", "10.89.0.1"])?;
        // Same sender and receiver on every side (module doc): complete checksums from the
        // client, a NAPI context on the backend's veth.
        in_netns(&ext.path(), || set_offload("e0", ETHTOOL_STXCSUM, false))??;
        in_netns(&backend.path(), || set_offload("eth0", ETHTOOL_SGRO, true))??;
        Ok(NodePortNet {
            _veths: veths,
            ext,
            node,
            backend,
        })
    }
}

/// Datagrams sent and received in one window.
#[derive(Default, Clone, Copy)]
struct Count {
    sent: u64,
    received: u64,
    secs: f64,
}

impl std::ops::AddAssign for Count {
    fn add_assign(&mut self, o: Count) {
        self.sent += o.sent;
        self.received += o.received;
        self.secs += o.secs;
    }
}

/// `n` headers, each with one iovec (`iovs[i]`).
fn mmsghdrs(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all zeroes is a header without address or control
            // data.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// Sends NP_PAYLOAD-byte datagrams on the connected `sock` until `stop`; returns how many the
/// kernel took, and the last error if it never took one.
fn udp_send(sock: &UdpSocket, stop: &AtomicBool) -> (u64, Option<std::io::Error>) {
    let payload = [0x6bu8; NP_PAYLOAD];
    let mut iovs: Vec<libc::iovec> = (0..NP_BATCH)
        .map(|_| libc::iovec {
            // The kernel only reads from a sent iovec.
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        })
        .collect();
    let mut msgs = mmsghdrs(&mut iovs);
    let (mut sent, mut err) = (0u64, None);
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds NP_BATCH initialised headers whose iovecs point into `payload`;
        // all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                NP_BATCH as libc::c_uint,
                0,
            )
        };
        match u64::try_from(n) {
            Ok(n) => sent += n,
            // ENOBUFS, or ECONNREFUSED after an ICMP error: try again, count nothing.
            Err(_) => err = Some(std::io::Error::last_os_error()),
        }
    }
    (sent, if sent == 0 { err } else { None })
}

/// Counts datagrams on `sock` until `stop` is set and the queue stays empty for 50 ms (drained).
/// The receiver polls without sleeping, on every side alike: a sleeping receiver has to be woken
/// by the softirq that queues a datagram, an IPI that costs the sending CPU more than whatever
/// path is measured here (in a VM it is a VM exit), and costs it more the faster the receiver
/// keeps up.
fn udp_count(sock: &UdpSocket, stop: &AtomicBool) -> u64 {
    let mut bufs = vec![[0u8; 2 * NP_PAYLOAD]; NP_BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs = mmsghdrs(&mut iovs);
    let mut got = 0u64;
    let mut last = Instant::now();
    loop {
        // SAFETY: `msgs` holds NP_BATCH initialised headers whose iovecs point into `bufs`; all
        // outlive the call. No timeout pointer: MSG_DONTWAIT returns at once.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                NP_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        match u64::try_from(n) {
            Ok(n) => {
                got += n;
                last = Instant::now();
            }
            Err(_) if stop.load(Ordering::Relaxed) && last.elapsed() > NP_DRAIN => return got,
            Err(_) => std::hint::spin_loop(),
        }
    }
}

/// A receive queue that absorbs a few ms of the receiver being scheduled out (same on both
/// sides); above net.core.rmem_max, hence FORCE (we are root).
fn big_rcvbuf(sock: &UdpSocket) -> std::io::Result<()> {
    let bytes: libc::c_int = 4 << 20;
    // SAFETY: a valid socket and a c_int option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One window: a sender in the external netns floods `target` for `dur` while a receiver in the
/// backend netns counts what arrives. The sockets are made inside those namespaces and used
/// from ordinary threads (a socket keeps its namespace).
fn udp_window(net: &NodePortNet, target: SocketAddr, dur: Duration) -> anyhow::Result<Count> {
    let rx = in_netns(&net.backend.path(), || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, NP_BACKEND_PORT))
    })?
    .context("bind the backend's UDP socket")?;
    big_rcvbuf(&rx).context("SO_RCVBUFFORCE")?;
    let tx = in_netns(&net.ext.path(), move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)?;
        Ok(s)
    })?
    .context("connect the external client's UDP socket")?;
    let (stop_tx, stop_rx) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let receiver = {
        let stop = stop_rx.clone();
        std::thread::spawn(move || udp_count(&rx, &stop))
    };
    let start = Instant::now();
    let sender = {
        let stop = stop_tx.clone();
        std::thread::spawn(move || udp_send(&tx, &stop))
    };
    std::thread::sleep(dur);
    stop_tx.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"));
    let secs = start.elapsed().as_secs_f64();
    // The receiver drains what is still queued, then stops once its queue stayed empty.
    stop_rx.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let (sent, err) = sent?;
    if let Some(e) = err {
        bail!("sendmmsg to {target}: nothing sent: {e}");
    }
    Ok(Count {
        sent,
        received,
        secs,
    })
}

/// The node's IP stack counters that tell forwarded datagrams from XDP-redirected ones.
#[derive(Default, Clone, Copy)]
struct NodeStack {
    /// Ip InReceives: datagrams the node's IP stack saw (XDP_PASS, or no XDP).
    in_receives: u64,
    /// Ip ForwDatagrams: datagrams the node's IP stack forwarded.
    forwarded: u64,
}

impl NodeStack {
    fn read(node: &NetnsGuard) -> anyhow::Result<NodeStack> {
        let snmp = node.exec("cat", &["/proc/net/snmp"])?;
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip.next(), ip.next());
        let (Some(names), Some(values)) = (names, values) else {
            bail!("no Ip lines in the node's /proc/net/snmp");
        };
        let field = |name: &str| -> anyhow::Result<u64> {
            let at = names
                .split_whitespace()
                .position(|n| n == name)
                .with_context(|| format!("no Ip {name} in /proc/net/snmp"))?;
            Ok(values
                .split_whitespace()
                .nth(at)
                .context("short Ip line")?
                .parse()?)
        };
        Ok(NodeStack {
            in_receives: field("InReceives")?,
            forwarded: field("ForwDatagrams")?,
        })
    }
}

/// A ProxyConfig for `net`'s node: the bench's one NodePort service, the tc programs on n0 (the
/// external interface) and n1 (the backend-facing one), as `keel proxy --tc-iface n0
/// --tc-iface n1` on that node, the socket hooks on `cgroup` (left empty).
fn proxy_config(
    root: &StateRoot,
    pins: &Path,
    name: &str,
    net: &NodePortNet,
    cgroup: &CgroupGuard,
) -> anyhow::Result<keel_proxy::ProxyConfig> {
    let manifests = root.path().join("nodeport.yaml");
    std::fs::write(&manifests, NODEPORT_MANIFESTS)?;
    Ok(keel_proxy::ProxyConfig {
        manifests,
        cgroup: cgroup
            .v2_path()
            .context("no cgroup v2 hierarchy")?
            .to_owned(),
        bpffs_dir: pins.join(name),
        healthz_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None,
        poll_interval: Duration::from_secs(3600),
        node: NodeContext {
            node_name: None,
            node_ips: vec![IpAddr::V4(NP_NODE_IP)],
        },
        tc_interfaces: vec!["n0".into(), "n1".into()],
        tc_netns: Some(net.node.path()),
    })
}

/// (4): keel's XDP path and keel's tc path against kube-proxy's NodePort DNAT, each on a node of
/// its own, and a fourth node that translates nothing (see the module doc).
pub(super) fn run(root: &StateRoot, pins: &Path, ipt: &str) -> anyhow::Result<()> {
    let xdp_net = NodePortNet::new()?;
    let generic_net = NodePortNet::new()?;
    let tc_net = NodePortNet::new()?;
    let ipt_net = NodePortNet::new()?;
    let plain_net = NodePortNet::new()?;
    iptables_restore(&ipt_net.node, ipt, &nodeport_iptables_rules())?;
    // veth refuses native XDP while its peer's MTU is above what one page holds: the loader
    // then falls back to generic XDP, as on a driver without native support. 64-byte datagrams
    // do not care about the MTU.
    generic_net
        .ext
        .exec("ip", &["link", "set", "e0", "mtu", "9000"])?;
    // One cgroup per proxy: each attaches its socket hooks in single mode.
    let cgroups = [
        CgroupGuard::new()?,
        CgroupGuard::new()?,
        CgroupGuard::new()?,
    ];
    let xdp_cfg = proxy_config(root, pins, "keel-nodeport-xdp", &xdp_net, &cgroups[0])?;
    let generic_cfg = proxy_config(root, pins, "keel-nodeport-xdpg", &generic_net, &cgroups[1])?;
    let tc_cfg = proxy_config(root, pins, "keel-nodeport-tc", &tc_net, &cgroups[2])?;
    let result = (|| -> anyhow::Result<()> {
        let mut modes = Vec::new();
        for cfg in [&xdp_cfg, &generic_cfg, &tc_cfg] {
            keel_proxy::Proxy::start(cfg.clone())?.stop();
        }
        for (cfg, net) in [(&xdp_cfg, &xdp_net), (&generic_cfg, &generic_net)] {
            let m = keel_proxy::install_xdp(
                &cfg.bpffs_dir,
                &["n0".into()],
                keel_proxy::XdpModeChoice::Auto,
                Some(&net.node.path()),
            )?;
            modes.push(m.first().map_or("none", |(_, m)| m.as_str()));
        }
        anyhow::ensure!(
            modes == ["native", "generic"],
            "XDP modes on the two XDP nodes: {modes:?}, wanted native and generic"
        );
        let mut sides = [
            Side::new("keel xdp", &xdp_net, NP_NODE_IP, NP_PORT),
            Side::new("keel xdp (generic)", &generic_net, NP_NODE_IP, NP_PORT),
            Side::new("keel tc", &tc_net, NP_NODE_IP, NP_PORT),
            Side::new("iptables DNAT", &ipt_net, NP_NODE_IP, NP_PORT),
            Side::new("no NAT", &plain_net, NP_BACKEND, NP_BACKEND_PORT),
        ];
        measure(&mut sides, ipt)?;
        forwarding(&sides, ipt, SinkAt::Xdp)?;
        forwarding(&sides, ipt, SinkAt::Tc)
    })();
    // The loader's uninstall, not the proxy's: that one also removes the masquerade rule from
    // this process's own namespace, and this touches none but the ones it made.
    for cfg in [&xdp_cfg, &generic_cfg, &tc_cfg] {
        let _ = keel_proxy::loader::uninstall(&cfg.bpffs_dir);
    }
    result
}

/// One path under test: its topology, where the client sends, what was counted there.
struct Side<'a> {
    name: &'static str,
    net: &'a NodePortNet,
    target: SocketAddr,
    total: Count,
    stack: NodeStack,
}

impl<'a> Side<'a> {
    fn new(name: &'static str, net: &'a NodePortNet, addr: Ipv4Addr, port: u16) -> Side<'a> {
        Side {
            name,
            net,
            target: SocketAddr::from((addr, port)),
            total: Count::default(),
            stack: NodeStack::default(),
        }
    }
}

const XDP: usize = 0;
const XDP_GENERIC: usize = 1;
const TC: usize = 2;
const IPT: usize = 3;
const PLAIN: usize = 4;
const SIDES: usize = 5;

/// The view with a userspace sender and receiver (module doc): socket to socket.
fn measure(sides: &mut [Side; SIDES], ipt: &str) -> anyhow::Result<()> {
    // Whether the proxy's masquerade rule (for Cluster-policy flows) put a nat table, and so
    // netfilter conntrack, on keel's node too.
    let keel_nat = sides[TC]
        .net
        .node
        .exec("iptables", &["-w", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap_or_default();
    let masq = keel_nat.contains("keel-proxy");
    for s in sides.iter() {
        udp_window(s.net, s.target, NP_WARMUP)?;
    }
    let mut rounds = Vec::new();
    for _ in 0..NP_ROUNDS {
        let mut round = [Count::default(); SIDES];
        for (n, s) in sides.iter_mut().enumerate() {
            let before = NodeStack::read(&s.net.node)?;
            round[n] = udp_window(s.net, s.target, NP_WINDOW)?;
            let after = NodeStack::read(&s.net.node)?;
            s.total += round[n];
            s.stack.in_receives += after.in_receives - before.in_receives;
            s.stack.forwarded += after.forwarded - before.forwarded;
        }
        rounds.push(round);
    }
    for s in sides.iter() {
        anyhow::ensure!(
            s.total.received > 0,
            "{}: no datagram reached the backend ({} sent)",
            s.name,
            s.total.sent
        );
    }
    let pps = |n: u64, c: &Count| n as f64 / c.secs;
    let rx = |c: &Count| pps(c.received, c);
    println!(
        "\nbench proxy: NodePort UDP with a userspace sender and receiver: {NP_PAYLOAD}-byte datagrams from an external netns, one sender (sendmmsg), received by a UDP socket at the backend (recvmmsg); {NP_ROUNDS} x {NP_WINDOW:?} per side, alternating, after a {NP_WARMUP:?} warm-up ({ipt} as anchor)"
    );
    for s in sides.iter() {
        let c = &s.total;
        println!(
            "  {:<18} sent {:>9.0} pps   received {:>9.0} pps ({:5.1} % delivered)   node stack: {:>5.1} % seen, {:>5.1} % forwarded",
            s.name,
            pps(c.sent, c),
            rx(c),
            100.0 * c.received as f64 / c.sent.max(1) as f64,
            100.0 * s.stack.in_receives as f64 / c.sent.max(1) as f64,
            100.0 * s.stack.forwarded as f64 / c.sent.max(1) as f64,
        );
    }
    let anchor = rx(&sides[IPT].total);
    for n in [XDP, XDP_GENERIC, TC] {
        let ratio = rx(&sides[n].total) / anchor;
        let per_round: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.2}x", rx(&r[n]) / rx(&r[IPT])))
            .collect();
        println!(
            "  ratio {}/iptables (received) {ratio:.2}x   (per round: {}; sender and receiver included, the target is judged on the forwarding rate below)",
            sides[n].name,
            per_round.join(", ")
        );
    }
    println!(
        "  no NAT/iptables {:.2}x: the node's forwarding path alone, the ceiling of anything that goes through its stack",
        rx(&sides[PLAIN].total) / anchor
    );
    println!(
        "  (keel's nodes: {})",
        if masq {
            "keel's masquerade rule in nat POSTROUTING, so netfilter conntrack runs there too"
        } else {
            "no nat rules, no netfilter conntrack"
        }
    );
    Ok(())
}

/// What the generator sent into one node and the sink counted behind it, in one or more
/// windows.
#[derive(Default, Clone, Copy)]
struct Forwarded {
    generated: u64,
    delivered: u64,
    other: u64,
    secs: f64,
}

impl std::ops::AddAssign for Forwarded {
    fn add_assign(&mut self, o: Forwarded) {
        self.generated += o.generated;
        self.delivered += o.delivered;
        self.other += o.other;
        self.secs += o.secs;
    }
}

/// One node's generator (out of the client's e0, to the node's n0) and sink (the backend's eth0
/// ingress).
struct Rig {
    generator: Generator,
    sink: Sink,
}

impl Rig {
    fn new(side: &Side, at: SinkAt) -> anyhow::Result<Rig> {
        let net = side.net;
        // A NAPI context on n0 on every node alike: the generator's frames are XDP frames
        // transmitted into e0, which veth hands to the peer's NAPI and drops when it has none
        // (keel's native-XDP node has one anyway, from its program).
        in_netns(&net.node.path(), || set_offload("n0", ETHTOOL_SGRO, true))??;
        let (e0, e0_mac) = link_info(&net.ext, "e0")?;
        let (_, n0_mac) = link_info(&net.node, "n0")?;
        let IpAddr::V4(dst) = side.target.ip() else {
            bail!("{}: target {} is not IPv4", side.name, side.target);
        };
        let frame = udp_frame(
            (e0_mac, n0_mac),
            (NP_CLIENT, NP_SPORT),
            (dst, side.target.port()),
            NP_PAYLOAD,
        );
        let generator = Generator::load(&net.ext.path(), e0, frame, NP_FLOWS)
            .with_context(|| format!("{}: generator", side.name))?;
        let sink = Sink::attach(
            &net.backend.path(),
            "eth0",
            (NP_BACKEND, NP_BACKEND_PORT),
            at,
        )
        .with_context(|| format!("{}: sink", side.name))?;
        Ok(Rig { generator, sink })
    }

    /// Generates for `dur`, waits for the queues to drain, returns what the sink counted.
    fn window(&self, dur: Duration) -> anyhow::Result<Forwarded> {
        let before = self.sink.count()?;
        let (generated, elapsed) = self.generator.run_for(dur)?;
        std::thread::sleep(FWD_DRAIN);
        let after: SinkCount = self.sink.count()?;
        Ok(Forwarded {
            generated,
            delivered: after.delivered - before.delivered,
            other: after.other - before.other,
            secs: elapsed.as_secs_f64(),
        })
    }
}

/// The forwarding rate (module doc): the same kernel-side generator and sink on every node, so
/// the node's path is what differs.
fn forwarding(sides: &[Side; SIDES], ipt: &str, at: SinkAt) -> anyhow::Result<()> {
    let rigs = sides
        .iter()
        .map(|s| Rig::new(s, at))
        .collect::<anyhow::Result<Vec<Rig>>>()?;
    let mut stacks = [NodeStack::default(); SIDES];
    for r in &rigs {
        r.window(FWD_WARMUP)?;
    }
    let mut total = [Forwarded::default(); SIDES];
    let mut rounds = Vec::new();
    for _ in 0..NP_ROUNDS {
        let mut round = [Forwarded::default(); SIDES];
        for (n, (s, r)) in sides.iter().zip(&rigs).enumerate() {
            let before = NodeStack::read(&s.net.node)?;
            round[n] = r.window(FWD_WINDOW)?;
            let after = NodeStack::read(&s.net.node)?;
            total[n] += round[n];
            stacks[n].in_receives += after.in_receives - before.in_receives;
            stacks[n].forwarded += after.forwarded - before.forwarded;
        }
        rounds.push(round);
    }
    for (s, t) in sides.iter().zip(&total) {
        anyhow::ensure!(
            t.delivered > 0,
            "{}: no frame reached the backend's sink ({} generated, {} other)",
            s.name,
            t.generated,
            t.other
        );
    }
    let pps = |n: u64, f: &Forwarded| n as f64 / f.secs;
    let rx = |f: &Forwarded| pps(f.delivered, f);
    let (title, sink) = match at {
        SinkAt::Xdp => (
            "at the backend's interface",
            "an XDP sink on the backend's veth, as each frame arrives (before the backend's stack)",
        ),
        SinkAt::Tc => (
            "into the backend's stack",
            "a tc sink on the backend's veth, after its receive path (skb, GRO, checksum)",
        ),
    };
    println!(
        "\nbench proxy: NodePort forwarding rate {title}: {NP_PAYLOAD}-byte UDP datagrams from a kernel generator (BPF_PROG_TEST_RUN, live XDP frames transmitted out of the client's veth, source port rotated over {NP_FLOWS} ports), counted and dropped by {sink} (delivered: to {NP_BACKEND}:{NP_BACKEND_PORT}, checksums valid; other: any other IPv4); {NP_ROUNDS} x {FWD_WINDOW:?} per side, alternating, after a {FWD_WARMUP:?} warm-up ({ipt} as anchor)"
    );
    for ((s, t), st) in sides.iter().zip(&total).zip(&stacks) {
        println!(
            "  {:<18} generated {:>9.0} pps   delivered {:>9.0} pps ({:5.1} % delivered)   other {:>3}   node stack: {:>5.1} % seen, {:>5.1} % forwarded",
            s.name,
            pps(t.generated, t),
            rx(t),
            100.0 * t.delivered as f64 / t.generated.max(1) as f64,
            t.other,
            100.0 * st.in_receives as f64 / t.generated.max(1) as f64,
            100.0 * st.forwarded as f64 / t.generated.max(1) as f64,
        );
    }
    let anchor = rx(&total[IPT]);
    for (n, label) in [
        (XDP, "keel XDP"),
        (XDP_GENERIC, "keel XDP (generic)"),
        (TC, "keel tc"),
    ] {
        let ratio = rx(&total[n]) / anchor;
        let per_round: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.2}x", rx(&r[n]) / rx(&r[IPT])))
            .collect();
        let verdict = match at {
            SinkAt::Xdp if ratio >= 2.0 => "target >= 2x: met",
            SinkAt::Xdp => "target >= 2x: NOT met",
            SinkAt::Tc => "the target is judged at the backend's interface, above",
        };
        println!(
            "  {label} / iptables DNAT: {ratio:.2}x ({verdict})   (per round: {})",
            per_round.join(", ")
        );
    }
    println!(
        "  no NAT / iptables DNAT: {:.2}x: the node's forwarding path alone, the ceiling of anything that goes through its stack",
        rx(&total[PLAIN]) / anchor
    );
    for n in [XDP, XDP_GENERIC, TC, IPT] {
        if total[n].other != 0 {
            println!(
                "  WARNING: {}: {} packets reached the backend untranslated or with bad checksums",
                sides[n].name, total[n].other
            );
        }
    }
    Ok(())
}
