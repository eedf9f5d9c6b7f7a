//! `cargo xtask bench proxy`: keel's socket-level service load balancing against the iptables
//! rules kube-proxy's iptables mode writes for the same services (KUBE-SERVICES -> KUBE-SVC-* ->
//! KUBE-SEP-*, statistic random, DNAT), measured in the same run and the same topology:
//!
//! 1. TCP connect + 1 byte + close to the last-defined service with 1, 1,000 and 10,000 services
//!    (p50/p99 latency, connections/s);
//! 2. time to apply one endpoint change with 10,000 services: keel's map diff + update against
//!    `iptables-restore` of the full ruleset;
//! 3. one TCP stream's throughput via the ClusterIP against the backend address directly;
//! 4. NodePort small-UDP packet rate from outside the node: keel's XDP and tc programs against
//!    kube-proxy's NodePort DNAT, counted at the backend (proxy/nodeport.rs).
//!
//! Topology of 1-3: a client netns and a backend netns over a veth (10.66.0.0/24); the anchor's
//! rules live in the client netns's own nat table (never the host's), keel's programs on a cgroup
//! made here, which this process joins for the run (and leaves before it is removed).
//! `--only socket` runs 1-3, `--only nodeport` runs 4.

mod nodeport;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_proxy::maps::PinnedMaps;
use keel_proxy::model::NodeContext;
use keel_testkit::netns::in_netns;
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
            if c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {
                // The client closes first (its EOF), so TIME_WAIT stays on the client's side,
                // where connect() skips or reuses those ports. On the server's side a new SYN
                // from a port of an earlier connection meets that connection's TIME_WAIT: every
                // run after the first had ~9 % of its connects stall 12 ms (p99 12 ms on both
                // sides, conn/s down 20x).
                let _ = c.read(&mut b);
            }
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

/// The parts of `bench proxy` that `--only` picks.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// 1-3: the socket-level load balancer (connect latency, endpoint update, TCP stream).
    Socket,
    /// 4: NodePort small-UDP packet rate through keel's XDP and tc programs.
    Nodeport,
}

/// Runs the `only` parts (all when empty).
pub fn run(only: &[Part]) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("bench proxy needs root (network namespaces, BPF, cgroups)");
    }
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    let ipt = iptables_restore_bin()?;
    let root = StateRoot::new()?;
    let pins = root.subdir("bpffs")?;
    keel_testkit::run(
        "mount",
        &["-t", "bpf", "bpf", pins.to_str().unwrap_or_default()],
    )?;
    if wanted(Part::Socket) {
        socket(&root, &pins, ipt)?;
    }
    // (4) runs back in our own cgroup: its senders are "external" clients, which no socket hook
    // of keel's may see (the NodePort proxy's hooks go on a cgroup of their own, left empty).
    if wanted(Part::Nodeport) {
        nodeport::run(&root, &pins, ipt)?;
    }
    Ok(())
}

/// 1-3, in a client and a backend netns, with this process in the cgroup keel's hooks are on.
fn socket(root: &StateRoot, pins: &Path, ipt: &str) -> anyhow::Result<()> {
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
    // The client's TIME_WAITs (~3,000 per run, 7 runs within a minute): room for them, and
    // their ports reused once timestamps allow, as load generators run.
    client.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
    )?;
    client.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
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
    let result = measure(root, &bpffs_dir, &cg, &client, ipt);
    let _ = keel_proxy::uninstall(&bpffs_dir);
    drop(joined);
    result
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
