//! Privileged end-to-end tests of the tc NodePort path: a client in an "external" namespace
//! connects to a NodePort on the "node" namespace's address; the tc program on the node's
//! external interface DNATs to a backend in a third namespace, and the same program on the
//! backend-facing interface reverse-NATs the replies. The backend sees the client's own address
//! (source preservation, externalTrafficPolicy=Local). A NodePort without endpoints rejects:
//! the client's connect() is refused by a TCP RST and its UDP socket gets ECONNREFUSED from an
//! ICMP port unreachable, at once, with and without checksum offload. Addresses 10.88.0.0/24 and
//! 10.89.0.0/24 exist only inside the test's namespaces (`support::node`).

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use keel_ebpf::{IPPROTO_TCP, IPPROTO_UDP, SvcKey, SvcStats, SvcVal, map_names};
use keel_proxy::Proxy;
use keel_testkit::NetnsGuard;
use keel_testkit::netns::{ETHTOOL_SRXCSUM, ETHTOOL_STXCSUM, in_netns, set_offload};
use support::node::{BACKEND_MAC, NodeNet};
use support::privileged;

#[test]
fn nodeport_from_an_external_namespace_reaches_a_backend_keeping_the_client_address() -> Result<()>
{
    privileged!("nodeport_from_an_external_namespace");
    let net = NodeNet::new()?;
    let (root, ext, backend) = (&net.root, &net.ext, &net.backend);

    let listener = in_netns(&backend.path(), || TcpListener::bind("0.0.0.0:8080"))??;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = writeln!(conn, "backend sees {peer}");
        }
    });

    let manifests = root.path().join("svc.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: test}\nspec:\n  type: NodePort\n  clusterIP: 10.96.8.10\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: test, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.89.0.2]}]\n",
    )?;
    let cfg = net.config(&manifests, &["n0", "n1"])?;
    let proxy = Proxy::start(cfg.clone())?;

    let ask = || -> Result<String> {
        in_netns(&ext.path(), || -> Result<String> {
            let s =
                TcpStream::connect_timeout(&"10.88.0.2:30080".parse()?, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            Ok(format!("{} via {}", line.trim(), s.peer_addr()?))
        })?
    };
    let got = ask()?;
    assert!(
        got.starts_with("backend sees 10.88.0.1:"),
        "client address preserved: {got}"
    );
    assert!(
        got.ends_with("via 10.88.0.2:30080"),
        "replies come from the NodePort: {got}"
    );
    assert!(ask()?.starts_with("backend sees 10.88.0.1:"));

    proxy.stop();
    let removed = keel_proxy::uninstall(&cfg.bpffs_dir)?;
    assert!(
        removed.iter().any(|p| p.ends_with("links/tc-n0")),
        "{removed:?}"
    );
    // The links go once their last reference does (the kernel releases them asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ask().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "after uninstall the NodePort is not translated"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A checksum offload to switch off: (namespace, device, ethtool command).
type OffloadOff<'a> = (&'a NetnsGuard, &'static str, u32);

#[test]
fn nodeport_without_endpoints_refuses_tcp_and_udp_at_once() -> Result<()> {
    privileged!("nodeport_without_endpoints_refuses_tcp_and_udp_at_once");
    let net = NodeNet::new()?;
    let (root, ext, node) = (&net.root, &net.ext, &net.node);

    // The node itself listens on both NodePorts: without the tc program the connect would be
    // accepted and the datagram received, so a refusal can only be the program's answer.
    let tcp_listener = in_netns(&node.path(), || TcpListener::bind("0.0.0.0:30080"))??;
    let udp_listener = in_netns(&node.path(), || UdpSocket::bind("0.0.0.0:30081"))??;

    let manifests = root.path().join("svc.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: test}\nspec:\n  type: NodePort\n  clusterIP: 10.96.8.11\n  ports:\n  - {name: http, port: 80, protocol: TCP, nodePort: 30080}\n  - {name: dns, port: 53, protocol: UDP, nodePort: 30081}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: empty-1, namespace: test, labels: {kubernetes.io/service-name: empty}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\nendpoints: []\n",
    )?;
    let cfg = net.config(&manifests, &["n0"])?;
    let proxy = Proxy::start(cfg.clone())?;

    let connect = || -> Result<std::io::Error> {
        in_netns(&ext.path(), || {
            match TcpStream::connect_timeout(&"10.88.0.2:30080".parse()?, Duration::from_secs(3)) {
                Ok(s) => bail!("connected to {:?}", s.peer_addr()),
                Err(e) => Ok(e),
            }
        })?
    };
    let send_recv = || -> Result<std::io::Error> {
        in_netns(&ext.path(), || {
            let s = UdpSocket::bind("10.88.0.1:0")?;
            s.connect("10.88.0.2:30081")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send(b"ping")?;
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Ok(n) => bail!("received {n} bytes"),
                Err(e) => Ok(e),
            }
        })?
    };
    // 1. Offload on both sides: the client's packets arrive CHECKSUM_PARTIAL, and the answers
    //    reach the client still partial (trusted, not verified there).
    // 2. n0 completes checksums in software and e0 verifies them: the program's handling of a
    //    CHECKSUM_PARTIAL skb is checked by the client's stack.
    // 3. e0 sends full checksums too: the program computes full checksums, verified by e0.
    let rounds: [(&str, Vec<OffloadOff>); 3] = [
        ("offload on", vec![]),
        (
            "n0 tx-checksum off, e0 rx-checksum off",
            vec![(node, "n0", ETHTOOL_STXCSUM), (ext, "e0", ETHTOOL_SRXCSUM)],
        ),
        ("e0 tx-checksum off too", vec![(ext, "e0", ETHTOOL_STXCSUM)]),
    ];
    for (round, offloads_off) in rounds {
        for (ns, dev, cmd) in offloads_off {
            in_netns(&ns.path(), move || set_offload(dev, cmd, false))??;
        }
        let start = Instant::now();
        let err = connect()?;
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{round}: TCP: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{round}: TCP refused after {:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let err = send_recv()?;
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{round}: UDP: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{round}: UDP refused after {:?}",
            start.elapsed()
        );
    }

    // Nothing reached the node's own sockets, and the program counted each refusal once.
    tcp_listener.set_nonblocking(true)?;
    let accepted = tcp_listener.accept().map(|(_, peer)| peer);
    assert_eq!(
        accepted.map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "the node's listener got a connection"
    );
    udp_listener.set_nonblocking(true)?;
    let got = udp_listener.recv(&mut [0u8; 64]);
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "the node's socket got a datagram"
    );
    let pinned = |name: &str| -> Result<Map> {
        Ok(Map::from_map_data(MapData::from_pin(
            cfg.bpffs_dir.join(name),
        )?)?)
    };
    let services: HashMap<MapData, SvcKey, SvcVal> =
        HashMap::try_from(pinned(map_names::SERVICES)?)?;
    let stats: PerCpuArray<MapData, SvcStats> = PerCpuArray::try_from(pinned(map_names::STATS)?)?;
    for (port, proto) in [(30080, IPPROTO_TCP), (30081, IPPROTO_UDP)] {
        let svc = services.get(&SvcKey::new("10.88.0.2".parse()?, port, proto), 0)?;
        let refused: u64 = stats.get(&svc.svc_id, 0)?.iter().map(|s| s.refused).sum();
        assert_eq!(refused, 3, "NodePort {port}/{proto}: one refusal per round");
    }
    drop((services, stats));

    proxy.stop();
    // The loader's uninstall, not the proxy's: that one also looks for the masquerade rule in
    // the test's own namespace, and this test touches nothing outside the ones it made.
    keel_proxy::loader::uninstall(&cfg.bpffs_dir)?;
    Ok(())
}

/// Loads `keel_xdp_pass` and attaches it (native) to `dev` in `ns`; it stays while the returned
/// object lives. Native XDP_REDIRECT into a veth delivers into the peer's NAPI, which the kernel
/// only runs when the peer has an XDP program (or GRO on): this is that program.
fn xdp_pass_on(ns: &NetnsGuard, dev: &'static str, bpffs_dir: &Path) -> Result<aya::Ebpf> {
    let pins = bpffs_dir.to_owned();
    in_netns(&ns.path(), move || -> Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load(keel_ebpf::XDP_OBJECT)?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(keel_ebpf::XDP_PASS_PROGRAM)
            .context("keel_xdp_pass")?
            .try_into()?;
        prog.load()?;
        prog.attach(dev, aya::programs::XdpMode::Driver)?;
        Ok(ebpf)
    })?
}

#[test]
fn xdp_nodeport_forwards_local_policy_tcp_and_udp_past_the_stack() -> Result<()> {
    privileged!("xdp_nodeport_forwards_local_policy_tcp_and_udp_past_the_stack");
    let net = NodeNet::new()?;
    let (root, ext, node, backend) = (&net.root, &net.ext, &net.node, &net.backend);
    // The backend's neighbour entry exists from the start, so the FIB lookup succeeds for the
    // first packet too (without it the first packets take the stack while ARP resolves).
    node.exec(
        "ip",
        &[
            "neigh",
            "replace",
            "10.89.0.2",
            "lladdr",
            BACKEND_MAC,
            "dev",
            "n1",
            "nud",
            "permanent",
        ],
    )?;
    // The node's stack forwards nothing from the client side: only the XDP program can get
    // the client's packets to the backend. Replies (in through n1) are forwarded as usual.
    node.exec("iptables", &["-A", "FORWARD", "-i", "n1", "-j", "ACCEPT"])?;
    node.exec("iptables", &["-P", "FORWARD", "DROP"])?;
    // The "wire" delivers complete checksums, as a NIC does: the XDP program updates checksums
    // incrementally and cannot see a veth's CHECKSUM_PARTIAL.
    in_netns(&ext.path(), || set_offload("e0", ETHTOOL_STXCSUM, false))??;

    let listener = in_netns(&backend.path(), || TcpListener::bind("0.0.0.0:8080"))??;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = writeln!(conn, "backend sees {peer}");
        }
    });
    let udp = in_netns(&backend.path(), || UdpSocket::bind("0.0.0.0:5353"))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("backend sees {from}").as_bytes(), from);
        }
    });

    let manifests = root.path().join("svc.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: test}\nspec:\n  type: NodePort\n  clusterIP: 10.96.8.12\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, protocol: TCP, nodePort: 30080}\n  - {name: dns, port: 53, protocol: UDP, nodePort: 30081}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: test, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\nendpoints: [{addresses: [10.89.0.2]}]\n",
    )?;
    let cfg = net.config(&manifests, &["n0", "n1"])?;
    let proxy = Proxy::start(cfg.clone())?;
    let install =
        |want| keel_proxy::install_xdp(&cfg.bpffs_dir, &["n0".into()], want, Some(&node.path()));
    let modes = install(keel_proxy::XdpModeChoice::Auto)?;
    assert_eq!(
        modes,
        vec![("n0".to_string(), keel_proxy::XdpAttach::Native)],
        "veth has native XDP"
    );
    let _pass = xdp_pass_on(backend, "eth0", &cfg.bpffs_dir)?;

    let ask_tcp = || -> Result<String> {
        in_netns(&ext.path(), || -> Result<String> {
            let s =
                TcpStream::connect_timeout(&"10.88.0.2:30080".parse()?, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            Ok(format!("{} via {}", line.trim(), s.peer_addr()?))
        })?
    };
    let ask_udp = || -> Result<String> {
        in_netns(&ext.path(), || -> Result<String> {
            let s = UdpSocket::bind("10.88.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(b"ping", "10.88.0.2:30081")?;
            let mut buf = [0u8; 128];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(format!("{} via {from}", String::from_utf8_lossy(&buf[..n])))
        })?
    };
    for _ in 0..2 {
        let got = ask_tcp()?;
        assert!(
            got.starts_with("backend sees 10.88.0.1:") && got.ends_with("via 10.88.0.2:30080"),
            "TCP: client address preserved, replies from the NodePort: {got}"
        );
        let got = ask_udp()?;
        assert!(
            got.starts_with("backend sees 10.88.0.1:") && got.ends_with("via 10.88.0.2:30081"),
            "UDP: client address preserved, reply from the NodePort: {got}"
        );
    }

    // A restarted proxy replaces the program inside the pinned link, in the same mode.
    let again = install(keel_proxy::XdpModeChoice::Auto)?;
    assert_eq!(again, modes);
    assert!(ask_tcp()?.starts_with("backend sees 10.88.0.1:"));

    // --xdp-mode generic swaps the native link for a generic one; traffic still skips the
    // node's stack (no XDP_PASS: the node's IP counters do not move).
    let generic = install(keel_proxy::XdpModeChoice::Generic)?;
    assert_eq!(
        generic,
        vec![("n0".to_string(), keel_proxy::XdpAttach::Generic)]
    );
    let links = cfg.bpffs_dir.join("links");
    assert!(links.join("xdpgeneric-n0").exists() && !links.join("xdpdrv-n0").exists());
    let shown = node.exec("ip", &["link", "show", "n0"])?;
    assert!(shown.contains("xdpgeneric"), "{shown}");
    let seen_before = ip_in_receives(node)?;
    let got = ask_udp()?;
    assert!(
        got.starts_with("backend sees 10.88.0.1:") && got.ends_with("via 10.88.0.2:30081"),
        "UDP through generic XDP: {got}"
    );
    let seen = ip_in_receives(node)? - seen_before;
    assert!(
        seen <= 1,
        "the node's stack saw {seen} datagrams: generic XDP passed the request"
    );
    // And back: native only.
    let native = install(keel_proxy::XdpModeChoice::Native)?;
    assert_eq!(native, modes);
    assert!(links.join("xdpdrv-n0").exists() && !links.join("xdpgeneric-n0").exists());

    proxy.stop();
    let removed = keel_proxy::loader::uninstall(&cfg.bpffs_dir)?;
    assert!(
        removed.iter().any(|p| p.ends_with("links/xdpdrv-n0")),
        "{removed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.exec("ip", &["link", "show", "n0"])?.contains("xdp") {
        assert!(
            Instant::now() < deadline,
            "after uninstall n0 still has an XDP program"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The node's `Ip: InReceives` (datagrams its IP stack saw), from /proc/net/snmp in its netns.
fn ip_in_receives(node: &NetnsGuard) -> Result<u64> {
    let snmp = node.exec("cat", &["/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip.next().context("no Ip: header")?,
        ip.next().context("no Ip: values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .context("no InReceives")?;
    values
        .split_whitespace()
        .nth(at)
        .context("short Ip: line")?
        .parse()
        .context("InReceives")
}
