//! Privileged end-to-end tests of the socket-level load balancer: a client process in its own
//! netns and in a cgroup v2 directory made by the test, three backend namespaces reached over veth
//! pairs (10.77.<i>.0/24, private and only inside the test's namespaces), the proxy attached to
//! that cgroup with its pins in a bpffs mounted under the test's state root.
//!
//! The client is this test binary re-executed (`client_helper`), so it can check what the
//! application sees (getpeername, recvfrom's source address), not just which backend answered.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keel_proxy::{Proxy, ProxyConfig};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, VethPair};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// What one backend saw: connections accepted and, per stream, the bytes received in order.
#[derive(Default, Debug)]
struct BackendLog {
    conns: usize,
    streams: Vec<(usize, bool)>,
}

struct Backend {
    _ns: NetnsGuard,
    _veth: VethPair,
    ip: Ipv4Addr,
    log: Arc<Mutex<BackendLog>>,
}

struct Topology {
    root: StateRoot,
    cgroup: CgroupGuard,
    client: NetnsGuard,
    backends: Vec<Backend>,
    stop: Arc<AtomicBool>,
    bpffs: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Detach and unpin before the state root unmounts the bpffs.
        let _ = keel_proxy::uninstall(&self.bpffs);
    }
}

/// Runs `f` on a thread that entered the network namespace `ns`.
fn in_netns<F: FnOnce() + Send + 'static>(ns: &Path, f: F) -> Result<()> {
    let file = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        );
        let ok = r.is_ok();
        let _ = tx.send(r);
        if ok {
            f();
        }
    });
    rx.recv()?.context("setns")?;
    Ok(())
}

fn serve_backend(
    name: String,
    ns: &Path,
    log: Arc<Mutex<BackendLog>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(TcpListener, UdpSocket)>>();
    in_netns(ns, move || {
        let bind = || -> Result<(TcpListener, UdpSocket)> {
            let t = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
            t.set_nonblocking(true)?;
            let u = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
            u.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok((t, u))
        };
        let _ = ready_tx.send(bind());
    })?;
    let (tcp, udp) = ready_rx.recv()??;
    let (n2, s2) = (name.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !s2.load(Ordering::SeqCst) {
            if let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(n2.as_bytes(), from);
            }
        }
    });
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match tcp.accept() {
                Ok((mut conn, _)) => {
                    log.lock().unwrap().conns += 1;
                    let (name, log) = (name.clone(), log.clone());
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(format!("{name}\n").as_bytes());
                        // Whatever the client streams must be "line-0\nline-1\n..." in order.
                        let mut got = Vec::new();
                        let _ = conn.read_to_end(&mut got);
                        if !got.is_empty() {
                            let text = String::from_utf8_lossy(&got);
                            let in_order = text
                                .lines()
                                .enumerate()
                                .all(|(i, l)| l == format!("line-{i}"));
                            log.lock().unwrap().streams.push((got.len(), in_order));
                            let _ = conn.write_all(format!("{}\n", got.len()).as_bytes());
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(())
}

impl Topology {
    fn new(backends: usize) -> Result<Topology> {
        let root = StateRoot::new()?;
        let bpffs = root.subdir("bpffs")?;
        keel_testkit::run("mount", &["-t", "bpf", "bpf", bpffs.to_str().unwrap()])?;
        let cgroup = CgroupGuard::new()?;
        if cgroup.v2_path().is_none() {
            bail!("no cgroup v2 hierarchy on this host");
        }
        let client = NetnsGuard::new()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut bs = Vec::new();
        for i in 0..backends {
            let ns = NetnsGuard::new()?;
            let veth = VethPair::between(&client, &format!("c{i}"), &ns, "eth0")?;
            client.exec(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.77.{i}.1/24"),
                    "dev",
                    &format!("c{i}"),
                ],
            )?;
            client.exec("ip", &["link", "set", &format!("c{i}"), "up"])?;
            ns.exec(
                "ip",
                &["addr", "add", &format!("10.77.{i}.2/24"), "dev", "eth0"],
            )?;
            ns.exec("ip", &["link", "set", "eth0", "up"])?;
            let log = Arc::new(Mutex::new(BackendLog::default()));
            serve_backend(format!("b{i}"), &ns.path(), log.clone(), stop.clone())?;
            bs.push(Backend {
                _ns: ns,
                _veth: veth,
                ip: Ipv4Addr::new(10, 77, i as u8, 2),
                log,
            });
        }
        Ok(Topology {
            root,
            cgroup,
            client,
            backends: bs,
            stop,
            bpffs,
        })
    }

    fn manifests_path(&self) -> PathBuf {
        self.root.path().join("services.yaml")
    }

    /// Writes the manifests atomically (the proxy never reads half a file).
    fn write_manifests(&self, text: &str) -> Result<()> {
        let tmp = self.root.path().join("services.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests_path())?;
        Ok(())
    }

    fn config(&self) -> ProxyConfig {
        ProxyConfig {
            manifests: self.manifests_path(),
            cgroup: self.cgroup.v2_path().unwrap().to_owned(),
            bpffs_dir: self.bpffs.join("keel"),
            healthz_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: None,
            poll_interval: Duration::from_millis(50),
            node: Default::default(),
            tc_interfaces: vec![],
            tc_netns: None,
        }
    }

    /// Runs the client helper inside the cgroup and the client netns; returns its RESULT lines.
    fn client(&self, cmd: &str) -> Result<Vec<String>> {
        let exe = std::env::current_exe()?;
        let procs = self.cgroup.v2_path().unwrap().join("cgroup.procs");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec ip netns exec {} \"$0\" client_helper --exact --nocapture --test-threads=1",
                procs.display(),
                self.client.name()
            ))
            .arg(&exe)
            .env("KEEL_PROXY_CLIENT", cmd)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "client {cmd}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout
            .lines()
            .filter_map(|l| l.strip_prefix("RESULT "))
            .map(str::to_owned)
            .collect())
    }
}

fn service_yaml(name: &str, vip: &str, affinity: bool, backends: &[Ipv4Addr]) -> String {
    let affinity = if affinity {
        "  sessionAffinity: ClientIP\n"
    } else {
        ""
    };
    let mut eps = String::new();
    for b in backends {
        eps.push_str(&format!(
            "- addresses: [{b}]\n  conditions: {{ready: true}}\n"
        ));
    }
    if backends.is_empty() {
        eps.push_str("[]\n");
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  clusterIP: {vip}\n{affinity}  ports:\n  - {{name: http, port: 80, protocol: TCP}}\n  - {{name: dns, port: 53, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: test\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}, protocol: TCP}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\nendpoints:\n{}---\n",
        if backends.is_empty() { eps.trim_start().to_string() } else { eps }
    )
    .replace("endpoints:\n[]", "endpoints: []")
}

fn count(results: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        let id = r.split_whitespace().next().unwrap_or("").to_owned();
        *m.entry(id).or_default() += 1;
    }
    m
}

fn wait_sync(proxy: &Proxy, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.syncs() <= before {
        assert!(
            Instant::now() < deadline,
            "proxy did not pick up the manifest change"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

macro_rules! privileged {
    ($name:literal) => {
        if !keel_testkit::privileged($name) {
            return Ok(());
        }
    };
}

/// The client side, run as a separate process by `Topology::client`.
#[test]
fn client_helper() -> Result<()> {
    let Ok(cmd) = std::env::var("KEEL_PROXY_CLIENT") else {
        return Ok(());
    };
    // libtest printed "test client_helper ... " without a newline: start RESULT lines afresh.
    println!();
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let addr: SocketAddr = args[1].parse()?;
    let n: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    match args[0] {
        "tcp-ids" => {
            for _ in 0..n {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(s) => {
                        let peer = s.peer_addr()?;
                        let mut line = String::new();
                        BufReader::new(&s).read_line(&mut line)?;
                        println!("RESULT {} {peer}", line.trim());
                    }
                    Err(e) => println!("RESULT err {:?}", e.kind()),
                }
            }
        }
        "udp-ids" => {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 64];
            for _ in 0..n {
                sock.send_to(b"q", addr)?;
                let (len, from) = sock.recv_from(&mut buf)?;
                println!("RESULT {} {from}", String::from_utf8_lossy(&buf[..len]));
            }
        }
        "tcp-stream" => {
            let delay = Duration::from_millis(args[3].parse()?);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            let mut line = String::new();
            let mut reader = BufReader::new(s.try_clone()?);
            reader.read_line(&mut line)?;
            let mut sent = 0;
            for i in 0..n {
                let l = format!("line-{i}\n");
                s.write_all(l.as_bytes())?;
                sent += l.len();
                std::thread::sleep(delay);
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut ack = String::new();
            reader.read_line(&mut ack)?;
            println!("RESULT {} sent={sent} acked={}", line.trim(), ack.trim());
        }
        other => bail!("unknown client command {other}"),
    }
    Ok(())
}

#[test]
fn cluster_ip_spreads_tcp_and_udp_over_three_backends() -> Result<()> {
    privileged!("cluster_ip_spreads_tcp_and_udp_over_three_backends");
    let topo = Topology::new(3)?;
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    topo.write_manifests(&service_yaml("web", "10.96.7.10", false, &ips))?;
    let mut cfg = topo.config();
    cfg.metrics_addr = Some("127.0.0.1:0".parse()?);
    let proxy = Proxy::start(cfg)?;

    let tcp = topo.client("tcp-ids 10.96.7.10:80 60")?;
    assert_eq!(tcp.len(), 60);
    let per = count(&tcp);
    assert_eq!(per.len(), 3, "all three backends answer TCP: {per:?}");
    assert!(per.values().all(|&n| n >= 5), "spread: {per:?}");
    assert!(
        tcp.iter().all(|r| r.ends_with(" 10.96.7.10:80")),
        "getpeername shows the ClusterIP: {tcp:?}"
    );
    let total: usize = topo
        .backends
        .iter()
        .map(|b| b.log.lock().unwrap().conns)
        .sum();
    assert_eq!(total, 60);

    let udp = topo.client("udp-ids 10.96.7.10:53 60")?;
    let per = count(&udp);
    assert_eq!(per.len(), 3, "all three backends answer UDP: {per:?}");
    assert!(
        udp.iter().all(|r| r.ends_with(" 10.96.7.10:53")),
        "replies come from the ClusterIP: {udp:?}"
    );

    let ls = keel_proxy::ls::list(&topo.config().bpffs_dir)?;
    assert!(ls.contains("10.96.7.10:80"), "{ls}");
    assert!(ls.contains("10.77.2.2:8080"), "{ls}");
    let health = http_get(proxy.healthz_addr(), "/healthz")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("lastUpdated"), "{health}");
    let metrics = http_get(proxy.metrics_addr().unwrap(), "/metrics")?;
    assert!(
        metrics.contains(
            "keel_proxy_service_connections_total{service=\"test/web:http\",frontend=\"10.96.7.10:80\",protocol=\"TCP\"} 60"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("keel_proxy_service_datagrams_total{service=\"test/web:dns\""),
        "{metrics}"
    );
    proxy.stop();
    Ok(())
}

#[test]
fn removed_backend_gets_no_new_connections() -> Result<()> {
    privileged!("removed_backend_gets_no_new_connections");
    let topo = Topology::new(3)?;
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    topo.write_manifests(&service_yaml("web", "10.96.7.11", false, &ips))?;
    let proxy = Proxy::start(topo.config())?;
    assert_eq!(count(&topo.client("tcp-ids 10.96.7.11:80 30")?).len(), 3);

    let before = proxy.syncs();
    topo.write_manifests(&service_yaml("web", "10.96.7.11", false, &[ips[0], ips[2]]))?;
    wait_sync(&proxy, before);
    let conns_b1 = topo.backends[1].log.lock().unwrap().conns;
    let per = count(&topo.client("tcp-ids 10.96.7.11:80 40")?);
    assert!(!per.contains_key("b1"), "removed backend answered: {per:?}");
    assert_eq!(per.len(), 2, "{per:?}");
    assert_eq!(topo.backends[1].log.lock().unwrap().conns, conns_b1);
    Ok(())
}

#[test]
fn client_ip_affinity_holds() -> Result<()> {
    privileged!("client_ip_affinity_holds");
    let topo = Topology::new(3)?;
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    topo.write_manifests(&service_yaml("sticky", "10.96.7.12", true, &ips))?;
    let _proxy = Proxy::start(topo.config())?;
    let per = count(&topo.client("tcp-ids 10.96.7.12:80 30")?);
    assert_eq!(
        per.len(),
        1,
        "every connection goes to one backend: {per:?}"
    );
    // A second client process in the same namespace is the same client.
    let again = count(&topo.client("tcp-ids 10.96.7.12:80 10")?);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        per.keys().collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn service_without_backend_refuses_at_once() -> Result<()> {
    privileged!("service_without_backend_refuses_at_once");
    let topo = Topology::new(1)?;
    topo.write_manifests(&service_yaml("empty", "10.96.7.13", false, &[]))?;
    let _proxy = Proxy::start(topo.config())?;
    let start = Instant::now();
    let r = topo.client("tcp-ids 10.96.7.13:80 3")?;
    assert_eq!(r, vec!["err ConnectionRefused"; 3]);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "refused, not hanging"
    );
    Ok(())
}

#[test]
fn restart_during_a_long_tcp_stream_loses_no_byte() -> Result<()> {
    privileged!("restart_during_a_long_tcp_stream_loses_no_byte");
    let topo = Arc::new(Topology::new(3)?);
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    topo.write_manifests(&service_yaml("stream", "10.96.7.14", false, &ips))?;
    let proxy = Proxy::start(topo.config())?;
    let t2 = topo.clone();
    let stream = std::thread::spawn(move || t2.client("tcp-stream 10.96.7.14:80 300 10"));
    // Nothing below may return before the stream thread is joined: it holds the topology.
    let middle = (|| -> Result<(bool, usize, usize, Proxy)> {
        std::thread::sleep(Duration::from_millis(800));
        // A stop without cleanup is what a crash leaves behind: pinned links and maps.
        proxy.stop();
        let pinned = topo.config().bpffs_dir.join("links/connect4").exists();
        // New connections keep working while no proxy runs.
        let while_down = count(&topo.client("tcp-ids 10.96.7.14:80 9")?)
            .values()
            .sum();
        let proxy = Proxy::start(topo.config())?;
        let after = count(&topo.client("tcp-ids 10.96.7.14:80 30")?).len();
        Ok((pinned, while_down, after, proxy))
    })();
    let r = stream.join().expect("stream thread");
    let (pinned, while_down, after, proxy) = middle?;
    assert!(pinned, "links stay pinned while no proxy runs");
    assert_eq!(while_down, 9, "connections work while the proxy is down");
    assert_eq!(after, 3, "the restarted proxy spreads over all backends");
    let r = r?;
    assert_eq!(r.len(), 1, "{r:?}");
    let (sent, acked) = {
        let f: Vec<&str> = r[0].split_whitespace().collect();
        (
            f[1].trim_start_matches("sent=").to_owned(),
            f[2].trim_start_matches("acked=").to_owned(),
        )
    };
    assert_eq!(sent, acked, "every byte arrived: {r:?}");
    let streams: Vec<(usize, bool)> = topo
        .backends
        .iter()
        .flat_map(|b| b.log.lock().unwrap().streams.clone())
        .collect();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].0.to_string(), sent);
    assert!(streams[0].1, "bytes arrived in order");
    drop(proxy);
    Ok(())
}

#[test]
fn uninstall_removes_every_program_link_and_pin() -> Result<()> {
    privileged!("uninstall_removes_every_program_link_and_pin");
    let topo = Topology::new(1)?;
    topo.write_manifests(&service_yaml(
        "gone",
        "10.96.7.15",
        false,
        &[topo.backends[0].ip],
    ))?;
    let cfg = topo.config();
    let proxy = Proxy::start(cfg.clone())?;
    assert_eq!(count(&topo.client("tcp-ids 10.96.7.15:80 2")?)["b0"], 2);
    proxy.stop();
    let removed = keel_proxy::uninstall(&cfg.bpffs_dir)?;
    assert_eq!(
        removed.len(),
        8 + keel_ebpf::map_names::ALL.len(),
        "{removed:?}"
    );
    assert!(!cfg.bpffs_dir.exists());
    let attached = keel_testkit::run("bpftool", &["cgroup", "show", cfg.cgroup.to_str().unwrap()])?;
    assert!(
        !attached.contains("keel_"),
        "programs still attached: {attached}"
    );
    // The ClusterIP is no longer translated: nothing routes it in the client namespace.
    let r = topo.client("tcp-ids 10.96.7.15:80 1")?;
    assert!(r[0].starts_with("err"), "{r:?}");
    Ok(())
}

#[test]
fn refuses_non_cgroup2_dir_and_non_bpffs_dir_naming_them() -> Result<()> {
    privileged!("refuses_non_cgroup2_dir_and_non_bpffs_dir_naming_them");
    let tmp = tempfile::tempdir()?;
    let e = keel_proxy::loader::preflight(tmp.path(), &tmp.path().join("pins")).unwrap_err();
    assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    assert!(
        e.to_string().contains(&tmp.path().display().to_string()),
        "{e}"
    );
    let cg = keel_proxy::default_cgroup().context("cgroup v2 mounted")?;
    let e = keel_proxy::loader::preflight(&cg, &tmp.path().join("pins")).unwrap_err();
    assert!(e.to_string().contains("not on a bpf filesystem"), "{e}");
    Ok(())
}
