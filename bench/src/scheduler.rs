//! `cargo xtask bench scheduler`: keel's scheduler (`keel scheduler`, release build) against
//! `keel server --no-node --disable-scheduler --disable-controllers` on redb, with 1,000 simulated
//! nodes (Node objects whose Leases are renewed every 10 s, no agents) and 10,000 pods. Pods have
//! a controller owner of a kind the server does not serve (so the scheduler spreads sets of 100
//! replicas while the garbage collector, which only follows served kinds, leaves them alone).
//!
//! 1. Batch: 10,000 pending pods exist, then the scheduler starts; pods bound per second from
//!    its first binding to its last (and from its start, initial lists included).
//! 2. Steady: with the scheduler running, 2,000 more pods are created at about 500/s; each
//!    pod's latency runs from its create being sent to the watch showing it bound: p50, p99.
//!
//! Then every node is checked: no node holds more pods or cpu than it allocates. The issue's
//! target: >= 2,000 pods/s on these 2-core machines (kube-scheduler's CI floor is 680 pods/s at
//! 5,000 nodes). Everything listens on 127.0.0.1.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

use crate::api::{Server, build_keel, client_with_namespace, rss_mib, start_server};

const NODES: usize = 1_000;
const PODS: usize = 10_000;
const STEADY_PODS: usize = 2_000;
const STEADY_RATE: f64 = 500.0;
const IN_FLIGHT: usize = 32;
const NAMESPACE: &str = "bench";
const NODE_CPU_MILLI: i64 = 32_000;
const POD_CPU_MILLI: i64 = 100;

/// Entry point for `cargo xtask bench scheduler`.
pub fn run() -> anyhow::Result<()> {
    let keel = build_keel()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(bench(&keel))
}

fn node(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{i:04}"),
                     "labels": {"kubernetes.io/hostname": format!("node-{i:04}")}},
        "status": {
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
}

fn pod(name: &str, owner: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "bench"},
                     "ownerReferences": [{"apiVersion": "bench.keel.dev/v1", "kind": "BenchSet",
                        "name": format!("set-{owner}"), "uid": format!("set-uid-{owner}"),
                        "controller": true}]},
        "spec": {"containers": [{
            "name": "app", "image": "registry.example/bench/app:1.0",
            "resources": {"requests": {"cpu": format!("{POD_CPU_MILLI}m"), "memory": "64Mi"}}
        }]}
    })
}

async fn create_all(client: &kube::Client, uri: &str, bodies: Vec<Value>) -> anyhow::Result<()> {
    futures::stream::iter(bodies.into_iter().map(|b| {
        let client = client.clone();
        let req = http::Request::post(uri)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&b).unwrap_or_default());
        async move {
            let req = req.map_err(|e| anyhow::anyhow!("build request: {e}"))?;
            client
                .request_text(req)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    }))
    .buffer_unordered(IN_FLIGHT)
    .try_collect::<Vec<()>>()
    .await
    .with_context(|| format!("POST {uri}"))?;
    Ok(())
}

/// Renews every node's Lease every 10 s, as kubelets do.
fn heartbeats(client: kube::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
        loop {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let _ = futures::stream::iter((0..NODES).map(|i| {
                let leases = leases.clone();
                let name = format!("node-{i:04}");
                let patch = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}});
                async move {
                    let l: Lease = serde_json::from_value(patch.clone())?;
                    if leases.create(&PostParams::default(), &l).await.is_err() {
                        leases
                            .patch(
                                &name,
                                &kube::api::PatchParams::default(),
                                &kube::api::Patch::Merge(&patch),
                            )
                            .await?;
                    }
                    anyhow::Ok(())
                }
            }))
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
}

/// Watches pods from `rv` and records when each is first seen with a node.
fn watch_bindings(
    api: Api<Pod>,
    rv: String,
    bound: Arc<Mutex<HashMap<String, (Instant, String)>>>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut rv = rv;
        loop {
            let mut stream = api
                .watch(&WatchParams::default().timeout(290), &rv)
                .await?
                .boxed();
            while let Some(ev) = stream.try_next().await? {
                let p = match ev {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => p,
                    WatchEvent::Bookmark(b) => {
                        rv = b.metadata.resource_version;
                        continue;
                    }
                    WatchEvent::Error(e) => bail!("watch: {e:?}"),
                    WatchEvent::Deleted(_) => continue,
                };
                rv = p.metadata.resource_version.clone().unwrap_or(rv);
                if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    bound
                        .lock()
                        .unwrap()
                        .entry(name)
                        .or_insert((Instant::now(), node));
                }
            }
        }
    })
}

async fn wait_count(
    bound: &Arc<Mutex<HashMap<String, (Instant, String)>>>,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while bound.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} pods bound after {timeout:?}",
                bound.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `keel scheduler`, killed on drop.
struct Scheduler(std::process::Child);

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn bench(keel: &Path) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-sched-")
        .tempdir()?;
    let (server, kubeconfig): (Server, _) = {
        let (k, d) = (keel.to_path_buf(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            start_server(
                &k,
                &d,
                None,
                &["--disable-scheduler", "--disable-controllers"],
            )
        })
        .await??
    };
    let client = client_with_namespace(&kubeconfig, NAMESPACE).await?;

    println!("creating {NODES} nodes with heartbeats...");
    create_all(&client, "/api/v1/nodes", (0..NODES).map(node).collect()).await?;
    let beats = heartbeats(client.clone());
    println!("creating {PODS} pending pods...");
    let t = Instant::now();
    let pod_uri = format!("/api/v1/namespaces/{NAMESPACE}/pods");
    create_all(
        &client,
        &pod_uri,
        (0..PODS)
            .map(|i| pod(&format!("batch-{i:05}"), i / 100))
            .collect(),
    )
    .await?;
    println!(
        "  {:.0} creates/s (the API server's own rate, for scale)",
        PODS as f64 / t.elapsed().as_secs_f64()
    );
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let rv = api
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let bound: Arc<Mutex<HashMap<String, (Instant, String)>>> = Arc::default();
    let watch = watch_bindings(api.clone(), rv, bound.clone());

    println!("starting keel scheduler...");
    let started = Instant::now();
    let child = Command::new(keel)
        .args(["scheduler", "--kubeconfig"])
        .arg(&kubeconfig)
        .env_remove("KEEL_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {} scheduler", keel.display()))?;
    let scheduler = Scheduler(child);
    wait_count(&bound, PODS, Duration::from_secs(300)).await?;
    let (first, last) = {
        let b = bound.lock().unwrap();
        let first = b.values().map(|(t, _)| *t).min().unwrap_or(started);
        let last = b.values().map(|(t, _)| *t).max().unwrap_or(started);
        (first, last)
    };
    let batch_rate = PODS as f64 / last.duration_since(first).as_secs_f64().max(1e-9);
    let batch_from_start = PODS as f64 / last.duration_since(started).as_secs_f64();

    println!("steady: {STEADY_PODS} pods at ~{STEADY_RATE:.0}/s...");
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let gap = Duration::from_secs_f64(1.0 / STEADY_RATE);
    let t0 = tokio::time::Instant::now();
    let mut creates = Vec::new();
    for i in 0..STEADY_PODS {
        tokio::time::sleep_until(t0 + gap * i as u32).await;
        let name = format!("steady-{i:05}");
        let p: Pod = serde_json::from_value(pod(&name, 1000 + i / 100))?;
        sent.lock().unwrap().insert(name, Instant::now());
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            api.create(&PostParams::default(), &p).await.map(|_| ())
        }));
    }
    for c in creates {
        c.await??;
    }
    wait_count(&bound, PODS + STEADY_PODS, Duration::from_secs(120)).await?;
    let (rss, peak) = rss_mib(scheduler.0.id());
    let (server_rss, _) = rss_mib(server.0.id());
    let mut lat: Vec<f64> = {
        let b = bound.lock().unwrap();
        let s = sent.lock().unwrap();
        s.iter()
            .filter_map(|(n, t)| {
                b.get(n)
                    .map(|(at, _)| at.duration_since(*t).as_secs_f64() * 1e3)
            })
            .collect()
    };
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];

    // No node over its allocatable, as the server holds it.
    let mut per_node: HashMap<String, i64> = HashMap::new();
    for (_, node) in bound.lock().unwrap().values() {
        *per_node.entry(node.clone()).or_default() += 1;
    }
    let max = per_node.values().copied().max().unwrap_or(0);
    if max > 110 || max * POD_CPU_MILLI > NODE_CPU_MILLI {
        bail!("a node got {max} pods: over its allocatable");
    }
    let nodes_used = Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    watch.abort();
    beats.abort();
    drop(scheduler);
    drop(server);

    println!();
    println!("nodes: {NODES} ({nodes_used} listed), pods: {PODS} batch + {STEADY_PODS} steady");
    println!(
        "batch: {batch_rate:.0} pods bound/s from the first binding to the last \
         ({batch_from_start:.0}/s from the scheduler's start, initial lists included)"
    );
    println!(
        "steady at ~{STEADY_RATE:.0} creates/s: create-to-bound p50 {:.1} ms, p99 {:.1} ms",
        pct(0.50),
        pct(0.99)
    );
    println!(
        "pods per node: max {max}, nodes used {}; scheduler RSS {rss:.1} MiB (peak {peak:.1}), \
         server RSS {server_rss:.1} MiB",
        per_node.len()
    );
    println!(
        "batch rate vs target 2000 pods/s: {:.2}x {}; vs kube-scheduler's CI floor (680/s): {:.2}x",
        batch_rate / 2000.0,
        if batch_rate >= 2000.0 {
            "MET"
        } else {
            "MISSED"
        },
        batch_rate / 680.0
    );
    Ok(())
}
