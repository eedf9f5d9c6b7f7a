//! Privileged end-to-end test of the tc NodePort path: a client in an "external" namespace
//! connects to a NodePort on the "node" namespace's address; the tc program on the node's
//! external interface DNATs to a backend in a third namespace, and the same program on the
//! backend-facing interface reverse-NATs the replies. The backend sees the client's own address
//! (source preservation, externalTrafficPolicy=Local). Addresses 10.88.0.0/24 and 10.89.0.0/24
//! exist only inside the test's namespaces.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_proxy::{Proxy, ProxyConfig};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, VethPair};

fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

#[test]
fn nodeport_from_an_external_namespace_reaches_a_backend_keeping_the_client_address() -> Result<()>
{
    if !keel_testkit::privileged("nodeport_from_an_external_namespace") {
        return Ok(());
    }
    let root = StateRoot::new()?;
    let pins = root.subdir("bpffs")?;
    keel_testkit::run("mount", &["-t", "bpf", "bpf", pins.to_str().unwrap()])?;
    let cgroup = CgroupGuard::new()?;
    let ext = NetnsGuard::new()?;
    let node = NetnsGuard::new()?;
    let backend = NetnsGuard::new()?;
    let _v1 = VethPair::between(&ext, "e0", &node, "n0")?;
    let _v2 = VethPair::between(&node, "n1", &backend, "eth0")?;
    ext.exec("ip", &["addr", "add", "10.88.0.1/24", "dev", "e0"])?;
    ext.exec("ip", &["link", "set", "e0", "up"])?;
    node.exec("ip", &["addr", "add", "10.88.0.2/24", "dev", "n0"])?;
    node.exec("ip", &["addr", "add", "10.89.0.1/24", "dev", "n1"])?;
    node.exec("ip", &["link", "set", "n0", "up"])?;
    node.exec("ip", &["link", "set", "n1", "up"])?;
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    // Reverse-NATed replies carry the node's own address as source when they are routed on.
    for k in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.n1.rp_filter=0",
        "net.ipv4.conf.n1.accept_local=1",
    ] {
        node.exec("sysctl", &["-qw", k])?;
    }
    backend.exec("ip", &["addr", "add", "10.89.0.2/24", "dev", "eth0"])?;
    backend.exec("ip", &["link", "set", "eth0", "up"])?;
    backend.exec("ip", &["route", "add", "default", "via", "10.89.0.1"])?;

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
    let cfg = ProxyConfig {
        manifests,
        cgroup: cgroup.v2_path().context("cgroup v2")?.to_owned(),
        bpffs_dir: pins.join("keel"),
        healthz_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None,
        poll_interval: Duration::from_millis(50),
        node: keel_proxy::model::NodeContext {
            node_name: None,
            node_ips: vec!["10.88.0.2".parse()?],
        },
        tc_interfaces: vec!["n0".into(), "n1".into()],
        tc_netns: Some(node.path()),
    };
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
