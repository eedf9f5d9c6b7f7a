//! Helpers shared by the privileged proxy tests (socket_lb, kube_source, and `node`'s topology
//! for nodeport and hostport): a client process in
//! its own netns and in a cgroup v2 directory made by the test, backend namespaces reached over
//! veth pairs (10.77.<i>.0/24, private and only inside the test's namespaces), a bpffs mounted
//! under the test's state root; all removed when the `Topology` drops, even on failure.
//!
//! The client is the test binary re-executed (`client_helper`, which calls `client_main`), so it
//! can check what the application sees (getpeername, recvfrom's source address), not just which
//! backend answered.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod node;

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

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// What one backend saw: connections accepted and, per stream, the bytes received in order.
#[derive(Default, Debug)]
pub struct BackendLog {
    pub conns: usize,
    pub streams: Vec<(usize, bool)>,
}

pub struct Backend {
    _ns: NetnsGuard,
    _veth: VethPair,
    pub ip: Ipv4Addr,
    pub log: Arc<Mutex<BackendLog>>,
}

pub struct Topology {
    pub root: StateRoot,
    pub cgroup: CgroupGuard,
    pub client: NetnsGuard,
    pub backends: Vec<Backend>,
    stop: Arc<AtomicBool>,
    pub bpffs: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Detach and unpin before the state root unmounts the bpffs.
        let _ = keel_proxy::uninstall(&self.bpffs);
    }
}

/// Runs the client helper (`client_main`, the test binary re-executed) inside the cgroup v2
/// directory `cgroup` and the network namespace `netns`; returns its RESULT lines.
pub fn run_client(cgroup: &Path, netns: &NetnsGuard, cmd: &str) -> Result<Vec<String>> {
    let exe = std::env::current_exe()?;
    let procs = cgroup.join("cgroup.procs");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec ip netns exec {} \"$0\" client_helper --exact --nocapture --test-threads=1",
            procs.display(),
            netns.name()
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

/// Runs `f` on a thread that entered the network namespace `ns`.
pub fn in_netns<F: FnOnce() + Send + 'static>(ns: &Path, f: F) -> Result<()> {
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
    pub fn new(backends: usize) -> Result<Topology> {
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

    pub fn manifests_path(&self) -> PathBuf {
        self.root.path().join("services.yaml")
    }

    /// Writes the manifests atomically (the proxy never reads half a file).
    pub fn write_manifests(&self, text: &str) -> Result<()> {
        let tmp = self.root.path().join("services.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests_path())?;
        Ok(())
    }

    pub fn config(&self) -> ProxyConfig {
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
    pub fn client(&self, cmd: &str) -> Result<Vec<String>> {
        run_client(self.cgroup.v2_path().unwrap(), &self.client, cmd)
    }
}

pub fn count(results: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        let id = r.split_whitespace().next().unwrap_or("").to_owned();
        *m.entry(id).or_default() += 1;
    }
    m
}

pub fn wait_sync(proxy: &Proxy, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.syncs() <= before {
        assert!(
            Instant::now() < deadline,
            "proxy did not pick up the manifest change"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
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
pub(crate) use privileged;

/// The client side, run as a separate process by `Topology::client`: each test binary calls it
/// from its own `#[test] fn client_helper`.
pub fn client_main() -> Result<()> {
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
