//! `cargo xtask bench cri`: pod start latency and memory of `keel cri` against Debian's
//! containerd 1.6 (its CRI plugin, runc through `containerd-shim-runc-v2`), both driven by
//! keel's own CRI client (`keel_cri::client`) in the same run.
//!
//! Each daemon gets a "node": a network namespace made here (the daemon is started in it with
//! `nsenter --net`, so bridges and veths never land on the host), a cgroup parent, a state root
//! holding its root, state, socket, logs, CNI bin and conf dirs. Both use keel-cni installed by
//! `keel cni install` (bridges `kbench0` / `cbench0`, subnets 10.210/16 and 10.211/16, no
//! masquerade) and the same busybox test image, imported offline (`keel image import`,
//! `ctr images import`); containerd's sandbox image is that image's layer with `Cmd sleep`,
//! imported as `registry.k8s.io/pause:3.6`.
//!
//! Measured per pod: RunPodSandbox + CreateContainer + StartContainer of one `sleep 3600`
//! container. First 30 pods one after the other (keel's and containerd's interleaved), then a
//! burst of 30 with 4 in flight per daemon. Memory: the daemon's VmRSS idle (after start and
//! the image import, before any pod) and with 30 pods; per-pod overhead = (daemon RSS delta +
//! RSS of the per-pod helpers: keel's `keel-monitor` watchers, containerd's shims) / 30. The
//! containers' own processes (and containerd's sandbox `sleep`, its pause) are not counted.
//!
//! Everything is removed afterwards, also on error: pods through CRI, then the daemon, then
//! leftovers (keel's `pod rm -f`, containerd's shims by socket), cgroups, namespaces, mounts.
//! Setting up and tearing down a daemon is `node.rs`; this file is the measurement.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_cri::api;
use keel_cri::api::runtime_service_client::RuntimeServiceClient;
use keel_cri::tonic::transport::Channel;
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached, sha256_digest};

use crate::workspace_root;

mod node;
use node::{Kind, Node};
pub(crate) use node::{cgroup_roots, keel_offline, log_tail, remove_leftovers};

pub(crate) type Client = RuntimeServiceClient<Channel>;

const PODS: usize = 30;
const CONCURRENCY: usize = 4;
/// Pods started and removed on each daemon before timing (first snapshot, bridge creation).
const WARMUP: usize = 2;
pub(crate) const IMAGE: &str = "example.com/keel/busybox:v1";
const PAUSE: &str = "registry.k8s.io/pause:3.6";
const CONTAINERD: &str = "/usr/bin/containerd";
const MIB: f64 = 1024.0;

/// The release binaries the bench runs.
pub(crate) struct Bins {
    pub(crate) keel: PathBuf,
}

/// Entry point for `cargo xtask bench cri`.
pub fn run() -> anyhow::Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if !is_root {
        bail!("bench cri needs root (namespaces, mounts, cgroups)");
    }
    for bin in [
        CONTAINERD,
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
    ] {
        ensure!(
            Path::new(bin).exists(),
            "{bin} missing: apt-get install containerd"
        );
    }
    ensure!(
        Path::new("/usr/sbin/runc").exists(),
        "runc missing: apt-get install runc"
    );
    ensure!(
        Path::new("/usr/lib/cni/loopback").exists(),
        "/usr/lib/cni/loopback missing: apt-get install containernetworking-plugins"
    );
    let bins = build()?;
    let archives = tempfile::Builder::new()
        .prefix("keel-bench-cri-img-")
        .tempdir()?;
    let image = archives.path().join("busybox.tar");
    let pause = archives.path().join("pause.tar");
    write_images(&image, &pause)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Nodes are dropped (daemons killed, everything removed) whatever `bench` returns.
    let mut keel = Node::new(Kind::Keel, &bins.keel)?;
    let mut containerd = Node::new(Kind::Containerd, &bins.keel)?;
    let outcome = rt.block_on(async {
        keel.start(&image).await?;
        containerd.start(&image).await?;
        containerd.import(&pause)?;
        let result = bench(&keel, &containerd).await;
        for node in [&keel, &containerd] {
            if let Err(e) = node.remove_all_pods().await {
                eprintln!("bench cri: cleanup of {} pods: {e:#}", node.kind.label());
            }
        }
        result
    });
    if outcome.is_err() {
        for node in [&keel, &containerd] {
            eprintln!(
                "--- {} log (tail) ---\n{}",
                node.kind.label(),
                node.log_tail(30)
            );
        }
    }
    drop(keel);
    drop(containerd);
    outcome
}

/// Builds release `keel`, `keel-cni` (beside it, what `keel cni install` copies) and
/// `keel-monitor` (beside it, the watcher each container's monitor becomes).
pub(crate) fn build() -> anyhow::Result<Bins> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "keel",
            "--bin",
            "keel",
            "-p",
            "keel-cni",
            "--bin",
            "keel-cni",
            "-p",
            "keel-runtime",
            "--bin",
            "keel-monitor",
        ])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("building keel, keel-cni, keel-monitor (release) failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(Bins {
        keel: target.join("release").join("keel"),
    })
}

/// The busybox test image as a docker archive, and containerd's sandbox image: the same layer
/// with `Cmd ["/bin/sleep","100000"]` (the sandbox process must outlive the bench).
fn write_images(image: &Path, pause: &Path) -> anyhow::Result<()> {
    let img = build_cached(Variant::Single, MediaTypes::Docker)?;
    img.write_docker_archive(image, IMAGE)?;
    let mut config: serde_json::Value = serde_json::from_slice(&img.config_json)?;
    config["config"]["Cmd"] = serde_json::json!(["/bin/sleep", "100000"]);
    let mut sandbox = (*img).clone();
    sandbox.config_json = serde_json::to_vec(&config)?;
    sandbox.config_digest = sha256_digest(&sandbox.config_json);
    sandbox.write_docker_archive(pause, PAUSE)
}

/// What one pod start needs to know about its node.
#[derive(Clone)]
pub(crate) struct PodSpec {
    pub(crate) cgroup_parent: String,
    pub(crate) log_dir: PathBuf,
}

fn sandbox_config(spec: &PodSpec, name: &str) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: spec.log_dir.join(name).to_string_lossy().into_owned(),
        linux: Some(api::LinuxPodSandboxConfig {
            // One cgroup per pod, as kubelet gives (`/kubepods/besteffort/pod<uid>`): keel
            // makes the pod's cgroup there and removes that whole tree with the pod.
            cgroup_parent: format!("{}/pod-{name}", spec.cgroup_parent),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: api::NamespaceMode::Pod as i32,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config() -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: "sleep".into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".into(), "3600".into()],
        log_path: "sleep/0.log".into(),
        ..Default::default()
    }
}

/// RunPodSandbox + CreateContainer + StartContainer; returns the time of the three.
pub(crate) async fn start_pod(
    client: &mut Client,
    spec: &PodSpec,
    name: &str,
) -> anyhow::Result<Duration> {
    let config = sandbox_config(spec, name);
    let start = Instant::now();
    let pod = client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let ctr = client
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod,
            config: Some(container_config()),
            sandbox_config: Some(config),
        })
        .await
        .with_context(|| format!("CreateContainer in {name}"))?
        .into_inner()
        .container_id;
    client
        .start_container(api::StartContainerRequest { container_id: ctr })
        .await
        .with_context(|| format!("StartContainer in {name}"))?;
    Ok(start.elapsed())
}

/// `PODS` pods with `CONCURRENCY` in flight; returns each pod's time and the wall time.
async fn burst(
    node: &Node,
    spec: &PodSpec,
    tag: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let mut client = node.client()?;
        let (next, spec, tag) = (next.clone(), spec.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= PODS {
                    return anyhow::Ok(times);
                }
                times.push(start_pod(&mut client, &spec, &format!("{tag}-{i}")).await?);
            }
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await??);
    }
    Ok((times, start.elapsed()))
}

/// One `Key:` value (KiB, or a count) of a `/proc/PID/FILE`; zero if the process is gone.
pub(crate) fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The daemon's and its per-pod helpers' memory at one moment (KiB).
#[derive(Default)]
struct Mem {
    rss: u64,
    pss: u64,
    /// RssAnon, and RssFile + RssShmem: where the daemon's RSS is.
    anon: u64,
    file: u64,
    threads: u64,
    helpers: usize,
    helpers_rss: u64,
    helpers_pss: u64,
}

fn measure_mem(node: &Node) -> anyhow::Result<Mem> {
    let pid = node.daemon_pid()?;
    let status = |key| proc_field(pid, "status", key);
    let helpers = node.helpers()?;
    Ok(Mem {
        rss: status("VmRSS:"),
        pss: proc_field(pid, "smaps_rollup", "Pss:"),
        anon: status("RssAnon:"),
        file: status("RssFile:") + status("RssShmem:"),
        threads: status("Threads:"),
        helpers: helpers.len(),
        helpers_rss: helpers
            .iter()
            .map(|p| proc_field(*p, "status", "VmRSS:"))
            .sum(),
        helpers_pss: helpers
            .iter()
            .map(|p| proc_field(*p, "smaps_rollup", "Pss:"))
            .sum(),
    })
}

/// Results of one daemon.
#[derive(Default)]
struct Results {
    seq: Vec<Duration>,
    burst: Vec<Duration>,
    burst_wall: Duration,
    /// After start and the image import, before any pod.
    idle: Mem,
    /// With the 30 sequential pods running.
    loaded: Mem,
    /// Once those pods are removed again.
    after: Mem,
    /// Once the burst's 30 pods are removed too: more growth would be kept per-pod state.
    after_burst: Mem,
    teardown: Duration,
}

impl Results {
    /// (daemon delta + helpers) / PODS, in MiB: from RSS, and from Pss.
    fn per_pod(&self) -> (f64, f64) {
        let (l, i) = (&self.loaded, &self.idle);
        let rss = l.rss as f64 - i.rss as f64 + l.helpers_rss as f64;
        let pss = l.pss as f64 - i.pss as f64 + l.helpers_pss as f64;
        (rss / PODS as f64 / MIB, pss / PODS as f64 / MIB)
    }
}

async fn bench(keel: &Node, containerd: &Node) -> anyhow::Result<()> {
    let nodes = [keel, containerd];
    let specs = nodes.map(|n| PodSpec {
        cgroup_parent: n.cgroup_parent(),
        log_dir: n.root().join("pod-logs"),
    });
    let mut res: [Results; 2] = Default::default();
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    settle().await;
    for (k, n) in nodes.iter().enumerate() {
        res[k].idle = measure_mem(n)?;
    }
    for (k, n) in nodes.iter().enumerate() {
        let mut client = n.client()?;
        for i in 0..WARMUP {
            start_pod(&mut client, &specs[k], &format!("warm-{i}"))
                .await
                .with_context(|| format!("{} warm-up", n.kind.label()))?;
        }
        n.remove_all_pods().await?;
    }
    // Sequential, interleaved: pod i on keel, then pod i on containerd.
    let mut clients = [keel.client()?, containerd.client()?];
    for i in 0..PODS {
        for (k, n) in nodes.iter().enumerate() {
            let t = start_pod(&mut clients[k], &specs[k], &format!("seq-{i}"))
                .await
                .with_context(|| n.kind.label())?;
            res[k].seq.push(t);
        }
    }
    settle().await;
    for (k, n) in nodes.iter().enumerate() {
        res[k].loaded = measure_mem(n)?;
        res[k].teardown = n.remove_all_pods().await?;
    }
    settle().await;
    for (k, n) in nodes.iter().enumerate() {
        res[k].after = measure_mem(n)?;
    }
    // Bursts, one daemon at a time.
    for (k, n) in nodes.iter().enumerate() {
        let (times, wall) = burst(n, &specs[k], "burst")
            .await
            .with_context(|| format!("{} burst", n.kind.label()))?;
        (res[k].burst, res[k].burst_wall) = (times, wall);
        n.remove_all_pods().await?;
    }
    settle().await;
    for (k, n) in nodes.iter().enumerate() {
        res[k].after_burst = measure_mem(n)?;
    }
    report(&mut res);
    Ok(())
}

fn report(res: &mut [Results; 2]) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "\nCRI pod start: RunPodSandbox + CreateContainer + StartContainer (busybox `sleep 3600`), \
         {PODS} pods; keel vs containerd 1.6 (runc), one CRI client; load average {}",
        load.join(" ")
    );
    println!(
        "{:<34} {:>13} {:>13} {:>8}",
        "", "keel", "containerd", "ratio"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mib = |kib: u64| kib as f64 / MIB;
    let [k, c] = res;
    let (k_seq50, c_seq50) = (ms(pct(&mut k.seq, 50)), ms(pct(&mut c.seq, 50)));
    let (k_pod, c_pod) = (k.per_pod(), c.per_pod());
    let rows: Vec<(String, f64, f64, &str, &str)> = vec![
        (
            "sequential p50".into(),
            k_seq50,
            c_seq50,
            "ms",
            "  (target <= 0.50x)",
        ),
        (
            "sequential p99".into(),
            ms(pct(&mut k.seq, 99)),
            ms(pct(&mut c.seq, 99)),
            "ms",
            "",
        ),
        (
            format!("burst, {CONCURRENCY} in flight, p50"),
            ms(pct(&mut k.burst, 50)),
            ms(pct(&mut c.burst, 50)),
            "ms",
            "",
        ),
        (
            format!("burst, {CONCURRENCY} in flight, p99"),
            ms(pct(&mut k.burst, 99)),
            ms(pct(&mut c.burst, 99)),
            "ms",
            "",
        ),
        (
            format!("burst wall time, {PODS} pods"),
            ms(k.burst_wall),
            ms(c.burst_wall),
            "ms",
            "",
        ),
        (
            "daemon RSS idle".into(),
            mib(k.idle.rss),
            mib(c.idle.rss),
            "MiB",
            "  (target keel <= 20 MiB)",
        ),
        (
            "  of which anon (RssAnon)".into(),
            mib(k.idle.anon),
            mib(c.idle.anon),
            "MiB",
            "",
        ),
        (
            "  of which file-backed".into(),
            mib(k.idle.file),
            mib(c.idle.file),
            "MiB",
            "",
        ),
        (
            format!("daemon RSS with {PODS} pods"),
            mib(k.loaded.rss),
            mib(c.loaded.rss),
            "MiB",
            "",
        ),
        (
            "  of which anon (RssAnon)".into(),
            mib(k.loaded.anon),
            mib(c.loaded.anon),
            "MiB",
            "",
        ),
        (
            "  of which file-backed".into(),
            mib(k.loaded.file),
            mib(c.loaded.file),
            "MiB",
            "",
        ),
        (
            "daemon RSS after removing them".into(),
            mib(k.after.rss),
            mib(c.after.rss),
            "MiB",
            "",
        ),
        (
            "daemon RSS after the burst, removed".into(),
            mib(k.after_burst.rss),
            mib(c.after_burst.rss),
            "MiB",
            "",
        ),
        (
            "helpers' RSS, all".into(),
            mib(k.loaded.helpers_rss),
            mib(c.loaded.helpers_rss),
            "MiB",
            "",
        ),
        (
            "per-pod overhead (RSS)".into(),
            k_pod.0,
            c_pod.0,
            "MiB",
            "  (target <= 0.25x)",
        ),
        ("per-pod overhead (Pss)".into(), k_pod.1, c_pod.1, "MiB", ""),
        (
            format!("teardown of {PODS} pods"),
            ms(k.teardown),
            ms(c.teardown),
            "ms",
            "",
        ),
    ];
    for (label, kv, cv, unit, target) in rows {
        let (kv_s, cv_s) = (format!("{kv:.1} {unit}"), format!("{cv:.1} {unit}"));
        println!(
            "{label:<34} {kv_s:>13} {cv_s:>13} {:>7.2}x{target}",
            kv / cv
        );
    }
    println!(
        "{:<34} {:>13} {:>13}",
        "per-pod helpers",
        format!("{} monitors", k.loaded.helpers),
        format!("{} shims", c.loaded.helpers)
    );
    println!(
        "{:<34} {:>13} {:>13}",
        "daemon threads with pods", k.loaded.threads, c.loaded.threads
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: sequential p50 <= 0.5x {}; idle RSS <= 20 MiB {}; per-pod overhead <= 0.25x {}",
        met(k_seq50 <= 0.5 * c_seq50),
        met(mib(k.idle.rss) <= 20.0),
        met(k_pod.0 <= 0.25 * c_pod.0)
    );
}

/// Nearest rank: the smallest sample with at least p% of the samples at or below it.
pub(crate) fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    let rank = (v.len() * p).div_ceil(100).max(1);
    v.get(rank - 1).copied().unwrap_or_default()
}
