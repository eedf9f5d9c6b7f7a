//! `cargo xtask bench proxy`: keel's socket-level service load balancing against the iptables
//! rules kube-proxy's iptables mode writes for the same services (KUBE-SERVICES -> KUBE-SVC-* ->
//! KUBE-SEP-*, statistic random, DNAT), measured in the same run and the same topology:
//!
//! 1. TCP connect + 1 byte + close to the last-defined service with 1, 1,000 and 10,000 services
//!    (p50/p99 latency, connections/s);
//! 2. time to apply one endpoint change with 10,000 services: keel's map diff + update against
//!    `iptables-restore` of the full ruleset;
//! 3. one TCP stream's throughput via the ClusterIP against the backend address directly;
//! 4. NodePort small-UDP packet rate from outside the node: keel's tc programs against
//!    kube-proxy's NodePort DNAT (KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVL -> KUBE-SEP), counted
//!    at the backend, so drops count against the path.
//!
//! Topology of 1-3: a client netns and a backend netns over a veth (10.66.0.0/24); the anchor's
//! rules live in the client netns's own nat table (never the host's), keel's programs on a cgroup
//! made here, which this process joins for the run (and leaves before it is removed).
//!
//! Topology of 4, as proxy/tests/nodeport.rs has it: an "external" client netns, a "node" netns
//! with the NodePort address on its external veth and a backend netns behind a second veth
//! (10.88.0.0/24 and 10.89.0.0/24, only inside these namespaces). Made three times, so that no
//! node sees another's netfilter tables: one node for keel's tc programs, one for kube-proxy's
//! rules, and one that translates nothing (the client sends to the backend's own address): the
//! ceiling of any ratio on this path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_proxy::maps::PinnedMaps;
use keel_proxy::model::NodeContext;
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, VethPair};

const COUNTS: &[usize] = &[1, 1_000, 10_000];
const CONNS: usize = 3_000;
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);

fn vip(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, base, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn manifests(n: usize, last_backend: Ipv4Addr) -> String {
    let mut s = String::new();
    for i in 0..n {
        let be = if i == n - 1 { last_backend } else { BACKEND };
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: b}}\nspec:\n  clusterIP: {}\n  ports: [{{name: p, port: 80}}, {{name: s, port: 81}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}, namespace: b, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}, {{name: s, port: 8081}}]\nendpoints: [{{addresses: [{be}]}}]\n---\n",
            vip(100, i)
        );
    }
    s
}

/// kube-proxy's iptables-mode nat rules for `n` services with two endpoints each (both on the
/// one backend: the chain walk is what is measured).
fn iptables_rules(n: usize) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in 0..n {
        let _ = writeln!(
            chains,
            ":KUBE-SVC-{i:016X} - [0:0]\n:KUBE-SEP-{i:014X}A - [0:0]\n:KUBE-SEP-{i:014X}B - [0:0]"
        );
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"b/s{i}:p cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:016X}",
            vip(200, i)
        );
        let _ = writeln!(
            rules,
            "-A KUBE-SVC-{i:016X} -m comment --comment \"b/s{i}:p -> {BACKEND}:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{i:014X}A"
        );
        let _ = writeln!(
            rules,
            "-A KUBE-SVC-{i:016X} -m comment --comment \"b/s{i}:p -> {BACKEND}:8080\" -j KUBE-SEP-{i:014X}B"
        );
        for x in ["A", "B"] {
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i:014X}{x} -p tcp -m tcp -j DNAT --to-destination {BACKEND}:8080"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

fn iptables_restore_bin() -> anyhow::Result<&'static str> {
    ["/usr/sbin/iptables-legacy-restore", "/usr/sbin/iptables-nft-restore"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no iptables-legacy-restore or iptables-nft-restore under /usr/sbin (apt-get install iptables)")
}

/// Loads `rules` into the netns's own tables; returns the time iptables-restore took.
fn iptables_restore(ns: &NetnsGuard, bin: &str, rules: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = ns
        .command(bin)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// Runs `f` on a thread inside the netns at `ns`.
fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

struct Latency {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn connect_1byte(addr: SocketAddr, n: usize) -> anyhow::Result<Latency> {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        drop(s);
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    Ok(Latency {
        p50: lat[n / 2],
        p99: lat[n * 99 / 100],
        per_sec: n as f64 / total.as_secs_f64(),
    })
}

fn stream(addr: SocketAddr, dur: Duration) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0usize;
    while start.elapsed() < dur {
        s.write_all(&buf)?;
        sent += buf.len();
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut b = [0u8; 1];
    let _ = s.read(&mut b);
    Ok(sent as f64 / start.elapsed().as_secs_f64() / 1e9 * 8.0)
}

fn serve_backend(ns: &Path) -> anyhow::Result<()> {
    let (one, sink) = in_netns(ns, || -> std::io::Result<(TcpListener, TcpListener)> {
        Ok((
            TcpListener::bind("0.0.0.0:8080")?,
            TcpListener::bind("0.0.0.0:8081")?,
        ))
    })??;
    std::thread::spawn(move || {
        for mut c in one.incoming().flatten() {
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
            // The server closes first: TIME_WAIT stays on its side, not on the client's ports.
        }
    });
    std::thread::spawn(move || {
        for mut c in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut std::io::sink());
                let _ = c.write_all(b"k");
            });
        }
    });
    Ok(())
}

/// Moves this process into a cgroup and back to `home` on drop.
struct Joined {
    home: PathBuf,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

pub fn run() -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("bench proxy needs root (network namespaces, BPF, cgroups)");
    }
    let ipt = iptables_restore_bin()?;
    let root = StateRoot::new()?;
    let pins = root.subdir("bpffs")?;
    keel_testkit::run(
        "mount",
        &["-t", "bpf", "bpf", pins.to_str().unwrap_or_default()],
    )?;
    let bpffs_dir = pins.join("keel");
    let cgroup = CgroupGuard::new()?;
    let cg = cgroup
        .v2_path()
        .context("no cgroup v2 hierarchy")?
        .to_owned();
    let client = NetnsGuard::new()?;
    let backend = NetnsGuard::new()?;
    let _veth = VethPair::between(&client, "c0", &backend, "eth0")?;
    client.exec("ip", &["addr", "add", "10.66.0.1/24", "dev", "c0"])?;
    client.exec("ip", &["link", "set", "c0", "up"])?;
    // iptables DNATs in OUTPUT after the route lookup: the VIPs need a route, as on a node.
    client.exec("ip", &["route", "add", "default", "via", "10.66.0.2"])?;
    backend.exec("ip", &["addr", "add", "10.66.0.2/24", "dev", "eth0"])?;
    backend.exec("ip", &["addr", "add", "10.66.0.3/24", "dev", "eth0"])?;
    backend.exec("ip", &["link", "set", "eth0", "up"])?;
    serve_backend(&backend.path())?;

    let home = cg.parent().context("cgroup parent")?.to_owned();
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
        .context("join bench cgroup")?;
    let joined = Joined { home };
    let result = measure(&root, &bpffs_dir, &cg, &client, ipt);
    let _ = keel_proxy::uninstall(&bpffs_dir);
    drop(joined);
    result?;
    // (4) runs back in our own cgroup: its senders are "external" clients, which no socket hook
    // of keel's may see (the NodePort proxy's hooks go on a cgroup of their own, left empty).
    nodeport(&root, &pins, ipt)
}

fn measure(
    root: &StateRoot,
    bpffs_dir: &Path,
    cg: &Path,
    client: &NetnsGuard,
    ipt: &str,
) -> anyhow::Result<()> {
    let manifest_path = root.path().join("services.yaml");
    let cfg = keel_proxy::ProxyConfig {
        manifests: manifest_path.clone(),
        cgroup: cg.to_owned(),
        bpffs_dir: bpffs_dir.to_owned(),
        healthz_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None,
        poll_interval: Duration::from_secs(3600),
        node: NodeContext::default(),
        tc_interfaces: vec![],
        tc_netns: None,
    };
    let ns = client.path();
    println!(
        "bench proxy: TCP connect + 1 byte + close, {CONNS} connections to the last-defined service ({ipt} as anchor)"
    );
    println!(
        "{:>8}  {:>24}  {:>24}  {:>9}  {:>9}",
        "services", "keel p50/p99 (conn/s)", "iptables p50/p99 (conn/s)", "keel/ipt", "keel/keel1"
    );
    let mut keel1 = None;
    for &n in COUNTS {
        std::fs::write(&manifest_path, manifests(n, BACKEND))?;
        // Start applies the manifests (a full resync); the stopped proxy's programs stay.
        keel_proxy::Proxy::start(cfg.clone())?.stop();
        let (k_addr, i_addr) = (
            SocketAddr::from((vip(100, n - 1), 80)),
            SocketAddr::from((vip(200, n - 1), 80)),
        );
        // keel runs with an empty nat table (a node without kube-proxy); iptables runs with
        // keel's programs still attached (one map miss per connect, counted against keel).
        iptables_restore(client, ipt, "*nat\nCOMMIT\n")?;
        let k = in_netns(&ns, move || connect_1byte(k_addr, CONNS))??;
        iptables_restore(client, ipt, &iptables_rules(n))?;
        let i = in_netns(&ns, move || connect_1byte(i_addr, CONNS))??;
        let base = *keel1.get_or_insert(k.per_sec);
        println!(
            "{n:>8}  {:>9.1?}/{:>7.1?} ({:>6.0})  {:>9.1?}/{:>7.1?} ({:>6.0})  {:>8.2}x  {:>8.2}x",
            k.p50,
            k.p99,
            k.per_sec,
            i.p50,
            i.p99,
            i.per_sec,
            k.per_sec / i.per_sec,
            k.per_sec / base
        );
    }

    // (2) one endpoint change with 10,000 services present.
    let n = *COUNTS.last().unwrap_or(&1);
    let mut maps = PinnedMaps::open(bpffs_dir)?;
    let (mut applied, _) = maps.dump()?;
    let parse = |text: String| -> anyhow::Result<keel_proxy::model::Desired> {
        let m = keel_proxy::manifests::parse_manifests(&text)?;
        Ok(keel_proxy::model::desired(&m.services, &m.slices, &NodeContext::default()).0)
    };
    let a = parse(manifests(n, BACKEND))?;
    let b = parse(manifests(n, Ipv4Addr::new(10, 66, 0, 3)))?;
    // The file source diffs the whole set; an API watch event names the one service changed.
    let changed: Vec<_> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, _)| *k)
        .collect();
    let mut keel_times = Vec::new();
    let mut full_times = Vec::new();
    for round in 0..40 {
        let want = if round % 2 == 0 { &b } else { &a };
        let t = Instant::now();
        if round < 20 {
            let st = applied
                .apply(want, &mut maps)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            full_times.push(t.elapsed());
            anyhow::ensure!(
                st.services_changed == 2,
                "one endpoint change touches two frontends (ports 80, 81)"
            );
        } else {
            for k in &changed {
                applied
                    .apply_one(k, want.get(k), &mut maps)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            keel_times.push(t.elapsed());
        }
    }
    full_times.sort();
    keel_times.sort();
    let rules = iptables_rules(n);
    let mut ipt_times = (0..5)
        .map(|_| iptables_restore(client, ipt, &rules))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ipt_times.sort();
    let (k, i) = (
        keel_times[keel_times.len() / 2],
        ipt_times[ipt_times.len() / 2],
    );
    println!("\nbench proxy: apply one endpoint change with {n} services present (median)");
    println!(
        "  keel map update of the changed service {k:.1?}   iptables-restore full ruleset {i:.1?}   ratio {:.0}x",
        i.as_secs_f64() / k.as_secs_f64()
    );
    let f = full_times[full_times.len() / 2];
    println!("  (keel full diff over all {n} services, the file source's path: {f:.1?})");

    // (3) one TCP stream via the ClusterIP against the backend directly.
    let dur = Duration::from_secs(2);
    let via = SocketAddr::from((vip(100, n - 1), 81));
    let direct = SocketAddr::from((BACKEND, 8081));
    let v = in_netns(&ns, move || stream(via, dur))??;
    let d = in_netns(&ns, move || stream(direct, dur))??;
    println!("\nbench proxy: one TCP stream, {dur:?}");
    println!(
        "  via ClusterIP {v:.2} Gbit/s   direct {d:.2} Gbit/s   ratio {:.3}",
        v / d
    );
    Ok(())
}

// (4) NodePort small-UDP packet rate.

const NP_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const NP_PORT: u16 = 30053;
const NP_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 2);
const NP_BACKEND_PORT: u16 = 8053;
const NP_PAYLOAD: usize = 64;
/// Datagrams per sendmmsg/recvmmsg call.
const NP_BATCH: usize = 64;
const NP_WARMUP: Duration = Duration::from_secs(1);
/// Measured windows per side, alternating keel and iptables, so a burst of other load on the
/// machine falls on both.
const NP_ROUNDS: u32 = 2;
const NP_WINDOW: Duration = Duration::from_millis(1500);

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

/// Counts datagrams on `sock` until `stop` is set and a read times out (the queue is drained).
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
    loop {
        // SAFETY: `msgs` holds NP_BATCH initialised headers whose iovecs point into `bufs`; all
        // outlive the call. No timeout pointer: SO_RCVTIMEO bounds the wait.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                NP_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        match u64::try_from(n) {
            Ok(n) => got += n,
            Err(_) if stop.load(Ordering::Relaxed) => return got,
            Err(_) => {}
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
    rx.set_read_timeout(Some(Duration::from_millis(50)))?;
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
    // The receiver drains what is still queued, then stops at its next read timeout.
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

/// (4): keel's tc path against kube-proxy's NodePort DNAT, each on a node of its own, and a
/// third node that translates nothing (the client sends to the backend's own address): the
/// ceiling, the rate of the forwarding path alone, which bounds any ratio this can show.
fn nodeport(root: &StateRoot, pins: &Path, ipt: &str) -> anyhow::Result<()> {
    let keel_net = NodePortNet::new()?;
    let ipt_net = NodePortNet::new()?;
    let plain_net = NodePortNet::new()?;
    iptables_restore(&ipt_net.node, ipt, &nodeport_iptables_rules())?;
    let cgroup = CgroupGuard::new()?;
    let manifests = root.path().join("nodeport.yaml");
    std::fs::write(&manifests, NODEPORT_MANIFESTS)?;
    let cfg = keel_proxy::ProxyConfig {
        manifests,
        cgroup: cgroup
            .v2_path()
            .context("no cgroup v2 hierarchy")?
            .to_owned(),
        bpffs_dir: pins.join("keel-nodeport"),
        healthz_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None,
        poll_interval: Duration::from_secs(3600),
        node: NodeContext {
            node_name: None,
            node_ips: vec![IpAddr::V4(NP_NODE_IP)],
        },
        // As `keel proxy --tc-iface n0 --tc-iface n1` on a node: the external interface and the
        // backend-facing one.
        tc_interfaces: vec!["n0".into(), "n1".into()],
        tc_netns: Some(keel_net.node.path()),
    };
    let result = keel_proxy::Proxy::start(cfg.clone())
        .map_err(anyhow::Error::from)
        .and_then(|proxy| {
            proxy.stop();
            nodeport_measure(&keel_net, &ipt_net, &plain_net, ipt)
        });
    let _ = keel_proxy::uninstall(&cfg.bpffs_dir);
    result
}

fn nodeport_measure(
    keel: &NodePortNet,
    anchor: &NodePortNet,
    plain: &NodePortNet,
    ipt: &str,
) -> anyhow::Result<()> {
    // Whether the proxy's masquerade rule (for Cluster-policy flows) put a nat table, and so
    // netfilter conntrack, on keel's node too.
    let keel_nat = keel
        .node
        .exec("iptables", &["-w", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap_or_default();
    let masq = keel_nat.contains("keel-proxy");
    let nodeport = SocketAddr::from((NP_NODE_IP, NP_PORT));
    let sides = [
        ("keel tc", keel, nodeport),
        ("iptables DNAT", anchor, nodeport),
        (
            "no NAT",
            plain,
            SocketAddr::from((NP_BACKEND, NP_BACKEND_PORT)),
        ),
    ];
    for (_, net, target) in &sides {
        udp_window(net, *target, NP_WARMUP)?;
    }
    let mut totals = [Count::default(); 3];
    let mut rounds = Vec::new();
    for _ in 0..NP_ROUNDS {
        let mut round = [Count::default(); 3];
        for (n, (_, net, target)) in sides.iter().enumerate() {
            round[n] = udp_window(net, *target, NP_WINDOW)?;
            totals[n] += round[n];
        }
        rounds.push(round);
    }
    for ((name, _, _), c) in sides.iter().zip(&totals) {
        anyhow::ensure!(
            c.received > 0,
            "{name}: no datagram reached the backend ({} sent)",
            c.sent
        );
    }
    let pps = |n: u64, c: &Count| n as f64 / c.secs;
    let rx = |c: &Count| pps(c.received, c);
    println!(
        "\nbench proxy: NodePort UDP, {NP_PAYLOAD}-byte datagrams from an external netns, one sender (sendmmsg), counted at the backend; {NP_ROUNDS} x {NP_WINDOW:?} per side, alternating, after a {NP_WARMUP:?} warm-up ({ipt} as anchor)"
    );
    for ((name, _, _), c) in sides.iter().zip(&totals) {
        println!(
            "  {name:<14} sent {:>9.0} pps   received {:>9.0} pps ({:.1} % delivered)",
            pps(c.sent, c),
            rx(c),
            100.0 * c.received as f64 / c.sent.max(1) as f64
        );
    }
    let [k, i, p] = &totals;
    let ratio = rx(k) / rx(i);
    let per_round: Vec<String> = rounds
        .iter()
        .map(|[kr, ir, _]| format!("{:.2}x", rx(kr) / rx(ir)))
        .collect();
    println!(
        "  ratio keel/iptables (received) {ratio:.2}x   target >= 2x: {}   (per round: {})",
        if ratio >= 2.0 { "met" } else { "NOT met" },
        per_round.join(", ")
    );
    println!(
        "  ceiling: no NAT/iptables {:.2}x, the most any translation could show on this path",
        rx(p) / rx(i)
    );
    println!(
        "  (keel's node: {})",
        if masq {
            "keel's masquerade rule in nat POSTROUTING, so netfilter conntrack runs there too"
        } else {
            "no nat rules, no netfilter conntrack"
        }
    );
    Ok(())
}
