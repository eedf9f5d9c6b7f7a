//! Privileged end-to-end test of the API source: keel's own API server (keel-cluster, redb store
//! in a temp dir, 127.0.0.1 on an ephemeral port) holds a Service and its EndpointSlice, written
//! through kube-rs; the proxy follows it with the kubeconfig the server wrote. Traffic goes
//! through the topology of `support` (client netns + test cgroup, three backend netns).
//!
//! A second test follows this node's Pods for their hostPorts (field selector spec.nodeName).
//!
//! Prints the time from each API write to the change in the pinned maps.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use keel_cluster::api::{ApiConfig, ApiServer};
use keel_cluster::store::{self, Store, StoreConfig};
use keel_ebpf::{IPPROTO_TCP, SvcKey};
use keel_proxy::maps::PinnedMaps;
use keel_proxy::{ApiSource, Proxy};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{TCP_PORT, Topology, count, http_get, privileged};

const NS: &str = "proxy-test";
const VIP: &str = "10.96.7.20";

/// The client side, run as a separate process by `Topology::client`.
#[test]
fn client_helper() -> Result<()> {
    support::client_main()
}

/// keel's API server on a temp data dir; stops when dropped.
struct TestApi {
    server: Option<ApiServer>,
    config: ApiConfig,
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
}

impl TestApi {
    async fn start() -> Result<TestApi> {
        let dir = tempfile::Builder::new()
            .prefix("keel-proxy-api-")
            .tempdir()?;
        let store = store::open(&StoreConfig::Redb {
            data_dir: dir.path().to_path_buf(),
        })
        .await?;
        let mut config = ApiConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse()?);
        config.bookmark_interval = Duration::from_secs(1);
        let server = ApiServer::start(config.clone(), store.clone()).await?;
        config.listen = server.local_addr;
        Ok(TestApi {
            server: Some(server),
            config,
            store,
            dir,
        })
    }

    fn kubeconfig(&self) -> &Path {
        &self.server.as_ref().expect("server running").kubeconfig
    }

    /// Stops the server (closing every connection, the proxy's watches with them) and starts
    /// it again on the same address and store.
    async fn restart(&mut self) -> Result<()> {
        self.server = None;
        let mut last = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match ApiServer::start(self.config.clone(), self.store.clone()).await {
                Ok(s) => {
                    self.server = Some(s);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        bail!("restart the API server: {last:?}")
    }
}

fn service(name: &str, vip: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "clusterIP": vip,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }))?)
}

fn slice(backends: &[Ipv4Addr]) -> Result<EndpointSlice> {
    let endpoints: Vec<_> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?)
}

/// Polls the pinned maps until the ClusterIP frontend has `want` backends (None: no frontend);
/// returns how long that took.
fn wait_map(bpffs_dir: &Path, want: Option<usize>, since: Instant) -> Result<Duration> {
    wait_vip(bpffs_dir, VIP, want, since)
}

fn wait_vip(bpffs_dir: &Path, vip: &str, want: Option<usize>, since: Instant) -> Result<Duration> {
    let key = SvcKey::new(vip.parse()?, 80, IPPROTO_TCP);
    let maps = PinnedMaps::open(bpffs_dir)?;
    let deadline = since + Duration::from_secs(20);
    loop {
        let (applied, _) = maps.dump()?;
        let now = applied.services.get(&key).map(|s| s.backends.len());
        if now == want {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("the maps hold {now:?} backends for {vip}:80 after 20 s, want {want:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[test]
fn api_source_follows_services_and_endpointslices() -> Result<()> {
    privileged!("api_source_follows_services_and_endpointslices");
    let topo = Topology::new(3)?;
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut api = rt.block_on(TestApi::start())?;
    let source = ApiSource::Kubeconfig(api.kubeconfig().to_owned());
    let client = rt
        .block_on(async { keel_proxy::kube_source::client(&source).await })?
        .0;
    let (services, slices): (Api<Service>, Api<EndpointSlice>) = (
        Api::namespaced(client.clone(), NS),
        Api::namespaced(client.clone(), NS),
    );
    let pp = PostParams::default();
    rt.block_on(async {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&pp, &ns)
            .await?;
        services.create(&pp, &service("web", VIP)?).await?;
        slices.create(&pp, &slice(&ips)?).await?;
        anyhow::Ok(())
    })?;

    let cfg = topo.config();
    let bpffs_dir = cfg.bpffs_dir.clone();
    let proxy = Proxy::start_api(cfg, &source)?;
    wait_map(&bpffs_dir, Some(3), Instant::now()).context("first sync")?;
    let per = count(&topo.client(&format!("tcp-ids {VIP}:80 30"))?);
    assert_eq!(per.len(), 3, "all three backends answer: {per:?}");
    let health = http_get(proxy.healthz_addr(), "/healthz")?;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // A backend leaves the EndpointSlice: it gets no new connection.
    let t = Instant::now();
    rt.block_on(slices.replace("web-1", &pp, &slice(&[ips[0], ips[2]])?))?;
    let slice_delay = wait_map(&bpffs_dir, Some(2), t)?;
    let conns_b1 = topo.backends[1].log.lock().unwrap().conns;
    let per = count(&topo.client(&format!("tcp-ids {VIP}:80 40"))?);
    assert!(!per.contains_key("b1"), "removed backend answered: {per:?}");
    assert_eq!(per.len(), 2, "{per:?}");
    assert_eq!(topo.backends[1].log.lock().unwrap().conns, conns_b1);

    // The server restarts (every watch is cut): the watchers reconnect and resume.
    rt.block_on(api.restart())?;
    let t = Instant::now();
    rt.block_on(async {
        // The admin client reconnects too; retry the write while the server comes back.
        let mut last = None;
        for _ in 0..50 {
            match slices.replace("web-1", &pp, &slice(&[ips[2]])?).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("update the slice after the restart: {last:?}")
    })?;
    let restart_delay = wait_map(&bpffs_dir, Some(1), t)?;
    let per = count(&topo.client(&format!("tcp-ids {VIP}:80 10"))?);
    assert_eq!(per.keys().collect::<Vec<_>>(), ["b2"], "{per:?}");

    // The Service watch may still be in its reconnect backoff: a new Service showing up in the
    // maps says it is back, so the deletion below measures the steady state.
    rt.block_on(services.create(&pp, &service("probe", "10.96.7.21")?))?;
    wait_vip(&bpffs_dir, "10.96.7.21", Some(0), Instant::now())?;

    // The Service is deleted: its ClusterIP no longer resolves (nothing routes it in the client
    // namespace, so the connection fails).
    let t = Instant::now();
    rt.block_on(services.delete("web", &DeleteParams::default()))?;
    let delete_delay = wait_map(&bpffs_dir, None, t)?;
    let r = topo.client(&format!("tcp-ids {VIP}:80 1"))?;
    assert!(r[0].starts_with("err"), "{r:?}");

    let metrics = http_get(proxy.healthz_addr(), "/metrics")?;
    let watch_errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_proxy_watch_errors_total "))
        .with_context(|| format!("no watch error counter: {metrics}"))?;
    println!(
        "API write -> map change: backend removed {}, after a server restart {} ({watch_errors} \
         watch errors while it was down), service deleted {}",
        ms(slice_delay),
        ms(restart_delay),
        ms(delete_delay)
    );
    assert!(proxy.syncs() >= 3, "one full sync, then one per change");
    proxy.stop();
    drop(api);
    Ok(())
}

fn host_port_pod(name: &str, node: &str, host_port: u16) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "web", "image": "busybox", "ports": [
                {"containerPort": TCP_PORT, "hostPort": host_port},
            ]}],
        },
    }))?)
}

/// Polls the pinned maps until the TCP frontend `ip:port` has exactly the backends `want` (None:
/// no frontend); returns how long that took.
fn wait_frontend(
    bpffs_dir: &Path,
    ip: Ipv4Addr,
    port: u16,
    want: Option<&[Ipv4Addr]>,
    since: Instant,
) -> Result<Duration> {
    let key = SvcKey::new(ip.into(), port, IPPROTO_TCP);
    let want: Option<Vec<std::net::IpAddr>> = want.map(|w| w.iter().map(|&i| i.into()).collect());
    let maps = PinnedMaps::open(bpffs_dir)?;
    let deadline = since + Duration::from_secs(20);
    loop {
        let (applied, _) = maps.dump()?;
        let now: Option<Vec<std::net::IpAddr>> = applied
            .services
            .get(&key)
            .map(|s| s.backends.values().filter_map(|b| b.ip()).collect());
        if now == want {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("the maps hold {now:?} for {ip}:{port} after 20 s, want {want:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn api_source_serves_the_host_ports_of_this_nodes_pods() -> Result<()> {
    privileged!("api_source_serves_the_host_ports_of_this_nodes_pods");
    let topo = Topology::new(2)?;
    let ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    // The node's address: the client namespace's own end of the first backend's link.
    let node_ip = Ipv4Addr::new(10, 77, 0, 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let api = rt.block_on(TestApi::start())?;
    let source = ApiSource::Kubeconfig(api.kubeconfig().to_owned());
    let client = rt
        .block_on(async { keel_proxy::kube_source::client(&source).await })?
        .0;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();
    let status = |ip: Ipv4Addr| {
        Patch::Merge(
            json!({"status": {"phase": "Running", "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}]}}),
        )
    };
    rt.block_on(async {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&pp, &ns)
            .await?;
        pods.create(&pp, &host_port_pod("web-0", "n1", 18080)?)
            .await?;
        pods.patch_status("web-0", &PatchParams::default(), &status(ips[0]))
            .await?;
        // Another node's pod: not watched, not served here.
        pods.create(&pp, &host_port_pod("elsewhere", "n2", 18081)?)
            .await?;
        pods.patch_status("elsewhere", &PatchParams::default(), &status(ips[1]))
            .await?;
        anyhow::Ok(())
    })?;

    let mut cfg = topo.config();
    cfg.node = keel_proxy::model::NodeContext {
        node_name: Some("n1".into()),
        node_ips: vec![node_ip.into()],
    };
    let bpffs_dir = cfg.bpffs_dir.clone();
    let proxy = Proxy::start_api(cfg, &source)?;
    wait_frontend(&bpffs_dir, node_ip, 18080, Some(&ips[..1]), Instant::now())
        .context("first sync")?;
    wait_frontend(&bpffs_dir, node_ip, 18081, None, Instant::now())?;
    let per = count(&topo.client(&format!("tcp-ids {node_ip}:18080 5"))?);
    assert_eq!(per.keys().collect::<Vec<_>>(), ["b0"], "{per:?}");

    // The pod's address changes (a restarted sandbox): the hostPort follows.
    let t = Instant::now();
    rt.block_on(pods.patch_status("web-0", &PatchParams::default(), &status(ips[1])))?;
    let moved = wait_frontend(&bpffs_dir, node_ip, 18080, Some(&ips[1..2]), t)?;
    let per = count(&topo.client(&format!("tcp-ids {node_ip}:18080 5"))?);
    assert_eq!(per.keys().collect::<Vec<_>>(), ["b1"], "{per:?}");

    // The pod finishes: the hostPort goes. (A graceful delete alone would not do: the pod
    // keeps serving until its node reports it stopped.)
    let t = Instant::now();
    let done = Patch::Merge(json!({"status": {"phase": "Succeeded"}}));
    rt.block_on(pods.patch_status("web-0", &PatchParams::default(), &done))?;
    let finished = wait_frontend(&bpffs_dir, node_ip, 18080, None, t)?;
    // Its replacement takes the hostPort; force-deleted (no grace), it goes at once.
    rt.block_on(async {
        pods.create(&pp, &host_port_pod("web-1", "n1", 18080)?)
            .await?;
        pods.patch_status("web-1", &PatchParams::default(), &status(ips[0]))
            .await?;
        anyhow::Ok(())
    })?;
    wait_frontend(&bpffs_dir, node_ip, 18080, Some(&ips[..1]), Instant::now())?;
    let t = Instant::now();
    rt.block_on(pods.delete("web-1", &DeleteParams::default().grace_period(0)))?;
    let deleted = wait_frontend(&bpffs_dir, node_ip, 18080, None, t)?;
    println!(
        "API write -> map change: pod address changed {}, pod finished {}, pod deleted {}",
        ms(moved),
        ms(finished),
        ms(deleted)
    );
    proxy.stop();
    drop(api);
    Ok(())
}

/// Credentials the server refuses fail the start at once, naming the server, before anything is
/// installed (no root needed: the bpffs and cgroup paths are never reached).
#[test]
fn refused_credentials_fail_the_start_before_install() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let api = rt.block_on(TestApi::start())?;
    let text = std::fs::read_to_string(api.kubeconfig())?;
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .context("token in the kubeconfig")?;
    let bad = api.dir.path().join("bad-kubeconfig");
    std::fs::write(&bad, text.replace(token, "not-a-token"))?;
    let nowhere = api.dir.path().join("never-created");
    let cfg = keel_proxy::ProxyConfig {
        manifests: Default::default(),
        cgroup: nowhere.join("cgroup"),
        bpffs_dir: nowhere.join("bpffs"),
        healthz_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None,
        poll_interval: Duration::from_secs(1),
        node: Default::default(),
        tc_interfaces: vec![],
        tc_netns: None,
    };
    let Err(e) = Proxy::start_api(cfg, &ApiSource::Kubeconfig(bad)) else {
        bail!("the proxy started with a refused token");
    };
    let msg = e.to_string();
    assert!(msg.contains("refuses") && msg.contains("401"), "{msg}");
    assert!(msg.contains(&api.config.listen.to_string()), "{msg}");
    assert!(!nowhere.exists());
    Ok(())
}
