//! `cargo xtask bench api`: the API server (`keel server --no-node`, release build) on redb and on
//! etcd, with raw `etcd-client` puts of the same objects in the same run as the anchor.
//!
//! For each backend: create 10,000 pods through the HTTPS API (32 in flight, kube-rs client),
//! list them (median of 3 full lists), then open 100 concurrent watches and create 200 more pods:
//! the delay from each create's send to each watcher receiving its event, p50 and p99 over all
//! watchers. Prints creates/s, list time, watch delay and the server's RSS, then the ratios the
//! issue sets targets for: etcd-backed API >= 0.5 x raw etcd puts; redb-backed API >= 2 x the
//! etcd-backed API. Everything listens on 127.0.0.1; etcd is Debian's etcd-server.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

const PODS: usize = 10_000;
const IN_FLIGHT: usize = 32;
const WATCHERS: usize = 100;
const WATCHED_CREATES: usize = 200;
const NAMESPACE: &str = "bench";

/// Entry point for `cargo xtask bench api`.
pub fn run() -> anyhow::Result<()> {
    let keel = build_keel()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async move {
        let pods: Vec<Value> = (0..PODS).map(|i| pod(&format!("bench-{i:05}"))).collect();

        println!("raw etcd puts ({PODS} objects, {IN_FLIGHT} in flight)...");
        let etcd = tokio::task::spawn_blocking(keel_testkit::etcd::Etcd::start).await??;
        let raw = raw_etcd_puts(&etcd.endpoint(), &pods).await?;
        drop(etcd);

        println!("API server on etcd...");
        let etcd = tokio::task::spawn_blocking(keel_testkit::etcd::Etcd::start).await??;
        let on_etcd = bench_server(&keel, Some(&etcd.endpoint()), &pods).await?;
        drop(etcd);

        println!("API server on redb...");
        let on_redb = bench_server(&keel, None, &pods).await?;

        println!();
        println!(
            "{:<22} {:>11} {:>10} {:>13} {:>13} {:>9} {:>9}",
            "", "creates/s", "list (ms)", "watch p50 ms", "watch p99 ms", "RSS MiB", "peak MiB"
        );
        println!(
            "{:<22} {:>11.0} {:>10} {:>13} {:>13} {:>9} {:>9}",
            "raw etcd-client puts", raw, "-", "-", "-", "-", "-"
        );
        for (name, r) in [("API on etcd", &on_etcd), ("API on redb", &on_redb)] {
            println!(
                "{:<22} {:>11.0} {:>10.1} {:>13.2} {:>13.2} {:>9.1} {:>9.1}",
                name,
                r.creates_per_s,
                r.list_ms,
                r.watch_p50_ms,
                r.watch_p99_ms,
                r.rss_mib,
                r.peak_mib
            );
        }
        println!();
        println!(
            "CPU per create (µs) while creating: {:<14} {:>8} {:>8} {:>18}",
            "", "server", "client", "rest of machine"
        );
        for (name, r) in [("API on etcd", &on_etcd), ("API on redb", &on_redb)] {
            println!(
                "{:<36} {:<14} {:>8.0} {:>8.0} {:>18.0}",
                "", name, r.server_cpu_us, r.client_cpu_us, r.other_cpu_us
            );
        }
        println!(
            "(2 cores give {:.0} µs per create at the redb rate; the rest includes etcd and other \
             load)",
            2e6 / on_redb.creates_per_s
        );
        let etcd_ratio = on_etcd.creates_per_s / raw;
        let redb_ratio = on_redb.creates_per_s / on_etcd.creates_per_s;
        println!();
        println!(
            "API on etcd / raw etcd puts: {etcd_ratio:.2}x (target >= 0.5x) {}",
            verdict(etcd_ratio >= 0.5)
        );
        println!(
            "API on redb / API on etcd:   {redb_ratio:.2}x (target >= 2x) {}",
            verdict(redb_ratio >= 2.0)
        );
        Ok(())
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// `KEEL_BIN` names a prebuilt binary; otherwise `cargo build --release` makes one.
pub(crate) fn build_keel() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEEL_BIN") {
        return Ok(PathBuf::from(bin));
    }
    crate::cargo(&["build", "--release", "-p", "keel", "--bin", "keel"])?;
    Ok(crate::workspace_root().join("target/release/keel"))
}

/// A pod as a Deployment's controller would create it (about 600 bytes of JSON).
fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"app": "bench", "pod-template-hash": "5d8c9f7b6"}},
        "spec": {"containers": [{
            "name": "app", "image": "registry.example/bench/app:1.0",
            "ports": [{"containerPort": 8080, "name": "http"}],
            "env": [{"name": "MODE", "value": "bench"}, {"name": "LEVEL", "value": "info"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
        }]}
    })
}

async fn raw_etcd_puts(endpoint: &str, pods: &[Value]) -> anyhow::Result<f64> {
    let client = etcd_client::Client::connect([endpoint], None)
        .await
        .context("connect etcd")?;
    let start = Instant::now();
    futures::stream::iter(pods.iter().map(|p| {
        let mut kv = client.kv_client();
        let key = format!(
            "/registry/core/pods/{NAMESPACE}/{}",
            p["metadata"]["name"].as_str().unwrap_or("")
        );
        let value = serde_json::to_vec(p).unwrap_or_default();
        async move { kv.put(key, value, None).await.map(|_| ()) }
    }))
    .buffer_unordered(IN_FLIGHT)
    .try_collect::<Vec<()>>()
    .await
    .context("etcd put")?;
    Ok(pods.len() as f64 / start.elapsed().as_secs_f64())
}

struct Result {
    creates_per_s: f64,
    /// CPU per create during the create phase, in µs: the server, this client, and the rest of
    /// the machine (etcd, and whatever else runs on it).
    server_cpu_us: f64,
    client_cpu_us: f64,
    other_cpu_us: f64,
    list_ms: f64,
    watch_p50_ms: f64,
    watch_p99_ms: f64,
    rss_mib: f64,
    peak_mib: f64,
}

/// A `keel server` process, killed on drop.
pub(crate) struct Server(pub(crate) Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_server(
    keel: &Path,
    dir: &Path,
    etcd: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<(Server, PathBuf)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(keel);
    cmd.args(["server", "--no-node", "--data-dir"])
        .arg(dir)
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env_remove("KEEL_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(e) = etcd {
        cmd.args(["--etcd-endpoints", e]);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", keel.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
            // Keep draining, so the server never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((server, PathBuf::from(p)));
        }
    }
    bail!("keel server exited before printing its kubeconfig path")
}

/// CPU seconds (user + system) the process `pid` (or "self") has used, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses, may hold spaces) utime and stime are the 12th
    // and 13th fields, in clock ticks; USER_HZ is 100 on every Linux ABI.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// CPU seconds all cores have been busy (not idle, not waiting for I/O), from /proc/stat.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).unwrap_or(&0.0) + fields.get(4).unwrap_or(&0.0);
    (total - idle) / 100.0
}

/// A client for the server's kubeconfig, with namespace `ns` created.
pub(crate) async fn client_with_namespace(
    kubeconfig: &Path,
    ns: &str,
) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(client)
}

pub(crate) fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn bench_server(keel: &Path, etcd: Option<&str>, pods: &[Value]) -> anyhow::Result<Result> {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-api-")
        .tempdir()?;
    let (server, kubeconfig) = {
        let keel = keel.to_path_buf();
        let d = dir.path().to_path_buf();
        let e = etcd.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            start_server(
                &keel,
                &d,
                e.as_deref(),
                &["--disable-scheduler", "--disable-controllers"],
            )
        })
        .await??
    };
    let client = client_with_namespace(&kubeconfig, NAMESPACE).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);

    // Bodies serialized up front, as the anchor's values are: the client's own JSON work stays out
    // of the measurement.
    let bodies: Vec<Vec<u8>> = pods
        .iter()
        .map(serde_json::to_vec)
        .collect::<std::result::Result<_, _>>()?;
    let uri = format!("/api/v1/namespaces/{NAMESPACE}/pods");
    let server_pid = server.0.id().to_string();
    let cpu_before = (
        cpu_seconds(&server_pid),
        cpu_seconds("self"),
        machine_busy_seconds(),
    );
    let start = Instant::now();
    futures::stream::iter(bodies.into_iter().map(|body| {
        let client = client.clone();
        let req = http::Request::post(uri.as_str())
            .header("content-type", "application/json")
            .body(body);
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
    .context("create pods")?;
    let creates_per_s = pods.len() as f64 / start.elapsed().as_secs_f64();
    let per_create = |before: f64, after: f64| (after - before) * 1e6 / pods.len() as f64;
    let server_cpu_us = per_create(cpu_before.0, cpu_seconds(&server_pid));
    let client_cpu_us = per_create(cpu_before.1, cpu_seconds("self"));
    let other_cpu_us =
        per_create(cpu_before.2, machine_busy_seconds()) - server_cpu_us - client_cpu_us;

    let mut lists = Vec::new();
    let mut rv = String::new();
    for _ in 0..3 {
        let t = Instant::now();
        let l = api.list(&ListParams::default()).await?;
        lists.push(t.elapsed().as_secs_f64() * 1000.0);
        if l.items.len() != pods.len() {
            bail!(
                "list returned {} pods, expected {}",
                l.items.len(),
                pods.len()
            );
        }
        rv = l.metadata.resource_version.unwrap_or_default();
    }
    lists.sort_by(f64::total_cmp);

    // Watch delay: 100 watches from the list's revision, then paced creates.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let delays: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut stream = api
            .watch(&WatchParams::default().timeout(120), &rv)
            .await?
            .boxed();
        let sent = sent.clone();
        let delays = delays.clone();
        watchers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < WATCHED_CREATES {
                match stream.try_next().await {
                    Ok(Some(WatchEvent::Added(p))) => {
                        let now = Instant::now();
                        let name = p.metadata.name.unwrap_or_default();
                        if let Some(t) = sent.lock().unwrap().get(&name) {
                            delays
                                .lock()
                                .unwrap()
                                .push(now.duration_since(*t).as_secs_f64() * 1000.0);
                        }
                        seen += 1;
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        }));
    }
    for i in 0..WATCHED_CREATES {
        let name = format!("watched-{i:04}");
        let mut p = pod(&name);
        p["metadata"]["labels"]["watched"] = json!("yes");
        let p: Pod = serde_json::from_value(p)?;
        sent.lock().unwrap().insert(name, Instant::now());
        api.create(&PostParams::default(), &p).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in watchers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .context("watchers finish")??;
    }
    let mut d = delays.lock().unwrap().clone();
    if d.len() != WATCHERS * WATCHED_CREATES {
        bail!(
            "watchers saw {} events, expected {}",
            d.len(),
            WATCHERS * WATCHED_CREATES
        );
    }
    d.sort_by(f64::total_cmp);
    let pct = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)];
    let (rss, peak) = rss_mib(server.0.id());
    drop(server);
    Ok(Result {
        creates_per_s,
        server_cpu_us,
        client_cpu_us,
        other_cpu_us,
        list_ms: lists[1],
        watch_p50_ms: pct(0.50),
        watch_p99_ms: pct(0.99),
        rss_mib: rss,
        peak_mib: peak,
    })
}
