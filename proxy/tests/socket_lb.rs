//! Privileged end-to-end tests of the socket-level load balancer: a client process in its own
//! netns and in a cgroup v2 directory made by the test, three backend namespaces reached over veth
//! pairs (10.77.<i>.0/24, private and only inside the test's namespaces), the proxy attached to
//! that cgroup with its pins in a bpffs mounted under the test's state root (see `support`).

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_proxy::Proxy;
use support::{TCP_PORT, Topology, UDP_PORT, count, http_get, privileged, wait_sync};

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

/// The client side, run as a separate process by `Topology::client`.
#[test]
fn client_helper() -> Result<()> {
    support::client_main()
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
fn a_pin_of_another_layout_is_refused_naming_it_and_uninstall_clears_it() -> Result<()> {
    privileged!("a_pin_of_another_layout_is_refused_naming_it_and_uninstall_clears_it");
    let topo = Topology::new(1)?;
    topo.write_manifests(&service_yaml(
        "old",
        "10.96.7.16",
        false,
        &[topo.backends[0].ip],
    ))?;
    let cfg = topo.config();
    Proxy::start(cfg.clone())?.stop();
    // What an older keel with another layout would have left: keel_stats pinned with other
    // key/value sizes and entries (the backends map, renamed: bpffs renames pins).
    let stats = cfg.bpffs_dir.join(keel_ebpf::map_names::STATS);
    std::fs::remove_file(&stats)?;
    std::fs::rename(cfg.bpffs_dir.join(keel_ebpf::map_names::BACKENDS), &stats)?;
    let e = format!(
        "{:#}",
        Proxy::start(cfg.clone()).err().context("start succeeded")?
    );
    assert!(e.contains(&stats.display().to_string()), "{e}");
    assert!(e.contains("uninstall"), "{e}");
    keel_proxy::uninstall(&cfg.bpffs_dir)?;
    let proxy = Proxy::start(cfg.clone())?;
    assert_eq!(count(&topo.client("tcp-ids 10.96.7.16:80 2")?)["b0"], 2);
    proxy.stop();
    keel_proxy::uninstall(&cfg.bpffs_dir)?;
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
