//! Privileged end-to-end test of hostPorts through the service maps (no portmap plugin, no
//! netfilter rule): a Pod in the manifests file declares hostPorts 18080/TCP -> 8080 and
//! 18053/UDP -> 5353; the pod is the "backend" namespace of `support::node` (10.89.0.2). A client
//! in the "external" namespace reaches it on the node's address (tc program on the node's
//! external interface only, as `keel server` attaches it: DNAT on ingress, reverse NAT on egress)
//! and the pod sees the client's own address; a client on the node itself (in the test's cgroup,
//! so the socket hooks see it) reaches it too. When the pod finishes, the hostPorts go.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use keel_proxy::Proxy;
use keel_testkit::netns::in_netns;
use support::node::{BACKEND_IP, EXT_IP, NODE_IP, NODE_POD_SIDE_IP, NodeNet};
use support::{privileged, run_client, wait_sync};

/// The client side, run as a separate process by `run_client`.
#[test]
fn client_helper() -> Result<()> {
    support::client_main()
}

fn pod_yaml(phase: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: test}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: web\n    image: busybox\n    ports:\n    - {{containerPort: 8080, hostPort: 18080}}\n    - {{containerPort: 5353, hostPort: 18053, protocol: UDP}}\n    - {{containerPort: 9999}}\nstatus:\n  phase: {phase}\n  podIP: {BACKEND_IP}\n  podIPs: [{{ip: {BACKEND_IP}}}]\n"
    )
}

/// The proxy never reads half a file.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// TCP from the external namespace: what the pod answered, and the peer the client sees.
fn ask_tcp(net: &NodeNet) -> Result<String> {
    in_netns(&net.ext.path(), || -> Result<String> {
        let addr = format!("{NODE_IP}:18080").parse()?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(format!("{} via {}", line.trim(), s.peer_addr()?))
    })?
}

fn ask_udp(net: &NodeNet) -> Result<String> {
    in_netns(&net.ext.path(), || -> Result<String> {
        let s = UdpSocket::bind(format!("{EXT_IP}:0"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(b"ping", format!("{NODE_IP}:18053"))?;
        let mut buf = [0u8; 128];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok(format!("{} via {from}", String::from_utf8_lossy(&buf[..n])))
    })?
}

#[test]
fn host_ports_reach_the_pod_from_outside_and_from_the_node_keeping_the_client_address() -> Result<()>
{
    privileged!("host_ports_reach_the_pod_from_outside_and_from_the_node");
    let net = NodeNet::new()?;

    // The pod listens on its containerPorts and says who it sees.
    let tcp = in_netns(&net.backend.path(), || TcpListener::bind("0.0.0.0:8080"))??;
    std::thread::spawn(move || {
        for mut conn in tcp.incoming().flatten() {
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = writeln!(conn, "pod sees {peer}");
        }
    });
    let udp = in_netns(&net.backend.path(), || UdpSocket::bind("0.0.0.0:5353"))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("pod sees {from}").as_bytes(), from);
        }
    });

    // Nothing answers on the hostPorts before the proxy: the node has no listener and no rule.
    match ask_tcp(&net) {
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                == Some(ErrorKind::ConnectionRefused) => {}
        other => bail!("before the proxy, {NODE_IP}:18080 answered: {other:?}"),
    }
    let nat = net.node.exec("iptables", &["-w", "-t", "nat", "-S"])?;
    assert!(!nat.contains("DNAT"), "the node has DNAT rules: {nat}");

    let manifests = net.root.path().join("pods.yaml");
    write_atomically(&manifests, &pod_yaml("Running"))?;
    let cfg = net.config(&manifests, &["n0"])?;
    let proxy = Proxy::start(cfg.clone())?;

    for _ in 0..2 {
        let got = ask_tcp(&net)?;
        assert!(
            got.starts_with(&format!("pod sees {EXT_IP}:"))
                && got.ends_with(&format!("via {NODE_IP}:18080")),
            "TCP: the pod sees the client's address, the client the hostPort: {got}"
        );
        let got = ask_udp(&net)?;
        assert!(
            got.starts_with(&format!("pod sees {EXT_IP}:"))
                && got.ends_with(&format!("via {NODE_IP}:18053")),
            "UDP: the pod sees the client's address, the reply comes from the hostPort: {got}"
        );
    }
    // Still no DNAT rule: the tc program did it (the proxy's one masquerade rule is for marked
    // Cluster-policy NodePort flows, which hostPorts never are).
    let nat = net.node.exec("iptables", &["-w", "-t", "nat", "-S"])?;
    assert!(!nat.contains("DNAT"), "the node has DNAT rules: {nat}");

    // A client on the node itself, in the cgroup the socket hooks are attached to.
    let cgroup = net.cgroup.v2_path().context("cgroup v2")?;
    let tcp = run_client(cgroup, &net.node, &format!("tcp-ids {NODE_IP}:18080 3"))?;
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    for r in &tcp {
        assert!(
            r.starts_with(&format!("pod sees {NODE_POD_SIDE_IP}:"))
                && r.ends_with(&format!(" {NODE_IP}:18080")),
            "from the node: the pod answers, getpeername shows the hostPort: {r}"
        );
    }
    let udp = run_client(cgroup, &net.node, &format!("udp-ids {NODE_IP}:18053 3"))?;
    assert_eq!(udp.len(), 3, "{udp:?}");
    assert!(
        udp.iter()
            .all(|r| r.ends_with(&format!(" {NODE_IP}:18053"))),
        "from the node: replies come from the hostPort: {udp:?}"
    );

    let ls = keel_proxy::ls::list(&cfg.bpffs_dir)?;
    assert!(
        ls.contains(&format!("{NODE_IP}:18080")) && ls.contains(&format!("{BACKEND_IP}:8080")),
        "{ls}"
    );

    // The pod finishes: its hostPorts go (the node again refuses the connection).
    let before = proxy.syncs();
    write_atomically(&manifests, &pod_yaml("Succeeded"))?;
    wait_sync(&proxy, before);
    match ask_tcp(&net) {
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                == Some(ErrorKind::ConnectionRefused) => {}
        other => bail!("after the pod finished, {NODE_IP}:18080 answered: {other:?}"),
    }
    let ls = keel_proxy::ls::list(&cfg.bpffs_dir)?;
    assert!(!ls.contains(&format!("{NODE_IP}:18080")), "{ls}");

    proxy.stop();
    Ok(())
}
