//! The runtime benchmark (run by `cargo xtask bench runtime`, release build, root):
//!
//! 1. Lifecycle of a busybox `/bin/true` container, create -> start -> wait for exit ->
//!    remove, through keel's library (what keel-cri calls) against Debian's runc driven as
//!    containerd's shim drives it (`runc create`, `runc start`, wait as subreaper,
//!    `runc delete`) on the same OCI bundle: the spec keel generated, keel's rootfs. The two
//!    are interleaved in one run. keel's side also mounts and unmounts its overlay rootfs
//!    and spawns its monitor each time; runc's does neither.
//! 2. Pod sandbox run + remove (namespaces pinned, /etc files, cgroup, shm).
//! 3. VmRSS of one idle monitor process (the `keel` binary named by `KEEL_BIN`, else this
//!    binary re-executed, creates the container, then becomes the `keel-monitor` watcher
//!    built next to it), with what that RSS is made of (smaps).
//!
//! This binary is also the monitor when `KEEL_BIN` is unset: main dispatches the hidden roles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_runtime::ImageStore;
use keel_runtime::container::container_create::PHASE_TARGET;
use keel_runtime::container::state::{RunState, read_json};
use keel_runtime::container::{ContainerConfig, ContainerRuntime, ImageInfo, RuntimeOptions};
use keel_runtime::pod::{LoopbackOnly, PodConfig, PodOptions, PodRuntime};
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, StateRoot};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, filter};

const RUNS: usize = 50;
const WARMUP: usize = 3;
const IMAGE: &str = "example.com/keel/busybox:v1";

fn main() -> std::process::ExitCode {
    if let Some(code) = keel_runtime::container::monitor::hidden_main() {
        return std::process::ExitCode::from(code.clamp(0, 255) as u8);
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench runtime: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Phase timings of the current lifecycle: the library's create/remove phases (its
/// `PHASE_TARGET` events) and the bench's own per-call ones.
static PHASES: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

fn record_phase(name: &str, d: Duration) {
    if let Ok(mut p) = PHASES.lock() {
        p.push((name.to_string(), d));
    }
}

/// Collects the library's phase events into [`PHASES`].
struct PhaseLayer;

impl<S: tracing::Subscriber> Layer<S> for PhaseLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        #[derive(Default)]
        struct Fields {
            phase: Option<String>,
            micros: Option<u64>,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "phase" {
                    self.phase = Some(v.to_string());
                }
            }
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                if f.name() == "micros" {
                    self.micros = Some(v);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if let (Some(p), Some(us)) = (f.phase, f.micros) {
            record_phase(&p, Duration::from_micros(us));
        }
    }
}

fn runc_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_BENCH_RUNC") {
        return Ok(PathBuf::from(p));
    }
    for p in ["/usr/sbin/runc", "/usr/bin/runc"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("runc not found: apt-get install runc (or set KEEL_BENCH_RUNC)")
}

fn run() -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("needs root (namespaces, mounts, cgroups)");
    }
    let runc = runc_path()?;
    let phases = PhaseLayer.with_filter(filter::filter_fn(|m| m.target() == PHASE_TARGET));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(phases))?;
    let state = StateRoot::new()?;
    let cgroup = CgroupGuard::new()?;
    let parent = cgroup.name().to_string();
    let tar = state.path().join("busybox.tar");
    build_cached(Variant::Single, MediaTypes::Oci)?.write_oci_archive(&tar, IMAGE)?;
    let image = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = ImageStore::open(state.path(), Default::default())?;
            store.import(&tar).await?;
            anyhow::Ok(ImageInfo::resolve(&store, IMAGE).await?)
        })?;
    let monitor_exe = match std::env::var_os("KEEL_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?,
    };
    let rt = ContainerRuntime::open(RuntimeOptions {
        root: state.path().to_owned(),
        run_dir: state.path().join("run"),
        cgroup_parent: parent.clone(),
        monitor_exe: Some(monitor_exe.clone()),
    })?;
    let result = bench(&rt, &image, &runc, state.path(), &parent);
    // Whatever the outcome, nothing stays behind.
    if let Ok(all) = rt.list(&Default::default()) {
        for c in all {
            let _ = rt.remove(&c.record.id, true);
        }
    }
    let _ = Command::new(&runc)
        .args(["--root"])
        .arg(state.path().join("runc"))
        .args(["delete", "-f", "bench-runc"])
        .stderr(Stdio::null())
        .status();
    drop(cgroup);
    for root in keel_runtime::pod::cgroup::hierarchy_roots() {
        keel_testkit::cgroup::remove_tree(&root.join(&parent));
    }
    drop(state);
    result
}

fn bench(
    rt: &ContainerRuntime,
    image: &ImageInfo,
    runc: &Path,
    root: &Path,
    parent: &str,
) -> anyhow::Result<()> {
    let true_cfg = ContainerConfig {
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    // The runc bundle: keel's own spec for the same config, on the rootfs of a keel
    // container that is created but never started.
    let holder = rt.create(&true_cfg, image)?;
    let bundle = root.join("runc-bundle");
    std::fs::create_dir_all(&bundle)?;
    let spec_text = std::fs::read_to_string(rt.container_dir(&holder).join("bundle/config.json"))?;
    let mut spec: serde_json::Value = serde_json::from_str(&spec_text)?;
    // keel's bundle holds libcontainer's input: the seccomp profile compiled beside it, with
    // the capabilities the init borrows for loading it (see `seccomp_bpf`). runc gets the
    // container's own spec: the profile back in place, the borrowed capabilities gone.
    let plan_path = rt
        .container_dir(&holder)
        .join("bundle")
        .join(keel_runtime::container::seccomp_bpf::PLAN_FILE);
    let plan: keel_runtime::container::seccomp_bpf::Plan =
        serde_json::from_slice(&std::fs::read(&plan_path).context("the seccomp plan")?)?;
    spec["linux"]["seccomp"] = serde_json::to_value(&plan.profile)?;
    let borrowed: Vec<serde_json::Value> = plan
        .drop_bounding
        .iter()
        .chain(&plan.drop_effective)
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    for set in ["bounding", "effective", "permitted"] {
        if let Some(caps) = spec["process"]["capabilities"][set].as_array_mut() {
            caps.retain(|c| !borrowed.contains(c));
        }
    }
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/{parent}/bench-runc"));
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    let runc_root = root.join("runc");
    // The shim's way of waiting: be the reaper of the container's init.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;

    let mut keel_t = Vec::new();
    let mut runc_t = Vec::new();
    let mut keel_phases: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for i in 0..WARMUP + RUNS {
        PHASES.lock().map(|mut p| p.clear()).ok();
        let k = keel_lifecycle(rt, image, &true_cfg)?;
        let r = runc_lifecycle(runc, &runc_root, &bundle)?;
        if i >= WARMUP {
            keel_t.push(k);
            runc_t.push(r);
            for (name, d) in PHASES.lock().map(|p| p.clone()).unwrap_or_default() {
                if !order.contains(&name) {
                    order.push(name.clone());
                }
                keel_phases.entry(name).or_default().push(d);
            }
        }
    }
    rt.remove(&holder, true)?;

    println!(
        "Container lifecycle (create, start, wait for exit, remove) of busybox /bin/true, \
         {RUNS} runs each, interleaved"
    );
    println!("{:<34} {:>10} {:>10}", "runtime", "p50", "p95");
    let (k50, k95) = (pct(&mut keel_t, 50), pct(&mut keel_t, 95));
    let (r50, r95) = (pct(&mut runc_t, 50), pct(&mut runc_t, 95));
    println!(
        "{:<34} {:>10} {:>10}",
        "keel (library + monitor)",
        ms(k50),
        ms(k95)
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "runc (create/start/delete)",
        ms(r50),
        ms(r95)
    );
    println!("keel phases (p50 / p95 of each; library phases nest inside the calls):");
    for name in &order {
        if let Some(v) = keel_phases.get_mut(name) {
            let (a, b) = (pct(v, 50), pct(v, 95));
            println!("  {name:<32} {:>10} {:>10}", ms(a), ms(b));
        }
    }
    let ratio = k50.as_secs_f64() / r50.as_secs_f64();
    println!(
        "ratio keel / runc: p50 {ratio:.2}x, p95 {:.2}x (target p50 <= 0.50x: {})",
        k95.as_secs_f64() / r95.as_secs_f64(),
        if ratio <= 0.5 { "met" } else { "NOT met" }
    );

    // Pod sandboxes: run + remove.
    let pods = PodRuntime::open(
        rt.clone(),
        PodOptions {
            state_dir: root.join("pods"),
            run_dir: root.join("run-pods"),
            cgroup_parent: parent.to_string(),
        },
    )?;
    let mut pod_t = Vec::new();
    let mut ns_t = Vec::new();
    for i in 0..WARMUP + RUNS {
        let start = Instant::now();
        let id = pods.run(&PodConfig::default(), &LoopbackOnly)?;
        pods.remove(&id, &LoopbackOnly)?;
        let p = start.elapsed();
        let n = ip_netns_add_del(i)?;
        if i >= WARMUP {
            pod_t.push(p);
            ns_t.push(n);
        }
    }
    let (p50, p95) = (pct(&mut pod_t, 50), pct(&mut pod_t, 95));
    let n50 = pct(&mut ns_t, 50);
    println!(
        "Pod sandbox run + remove (net, ipc, uts pinned; /etc files; cgroup; shm), {RUNS} runs: \
         p50 {}, p95 {}; for scale, `ip netns add` + `ip netns del` (one namespace) p50 {} \
         (ratio {:.2}x)",
        ms(p50),
        ms(p95),
        ms(n50),
        p50.as_secs_f64() / n50.as_secs_f64()
    );

    // One idle monitor.
    let sleeper = rt.create(
        &ContainerConfig {
            command: vec!["sleep".into(), "60".into()],
            ..Default::default()
        },
        image,
    )?;
    rt.start(&sleeper)?;
    std::thread::sleep(Duration::from_millis(500));
    let run: RunState =
        read_json(&rt.container_dir(&sleeper).join("state.json"))?.context("no run state")?;
    let monitor = run.monitor.context("no monitor pid")?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", monitor.pid))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    // What the RSS is made of: file-backed pages (the executables and libraries touched)
    // against anonymous ones (heap, stacks, relocated data).
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", monitor.pid))?;
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let exe = std::fs::read_link(format!("/proc/{}/exe", monitor.pid))?;
    let top = top_mappings(monitor.pid);
    rt.remove(&sleeper, true)?;
    println!(
        "Idle monitor {}: Rss {} KiB (Pss {}) = anonymous {} + file {} (shared {} / private {} \
         clean); largest: {top}",
        exe.display(),
        field("Rss:"),
        field("Pss:"),
        field("Anonymous:"),
        field("Rss:").saturating_sub(field("Anonymous:")),
        field("Shared_Clean:"),
        field("Private_Clean:"),
    );
    println!(
        "Idle monitor RSS: {:.2} MiB (target <= 2 MiB: {}; conmon ~0.3 MiB, containerd shim \
         5-11 MiB)",
        rss_kib as f64 / 1024.0,
        if rss_kib <= 2048 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// The four mappings (by file, or `[heap]`, `anon`) with the most resident KiB.
fn top_mappings(pid: i32) -> String {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return String::new();
    };
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            *by.entry(current.clone()).or_default() += kib;
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-'))
        {
            let name = line.split_whitespace().nth(5).unwrap_or("anon");
            current = Path::new(name)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.to_string());
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by_key(|(_, k)| std::cmp::Reverse(*k));
    v.iter()
        .take(4)
        .map(|(n, k)| format!("{n} {k} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn keel_lifecycle(
    rt: &ContainerRuntime,
    image: &ImageInfo,
    cfg: &ContainerConfig,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let id = rt.create(cfg, image)?;
    let t1 = Instant::now();
    rt.start(&id)?;
    let t2 = Instant::now();
    let exit = rt
        .wait(&id, Some(Duration::from_secs(10)))?
        .context("keel container did not exit")?;
    let t3 = Instant::now();
    rt.remove(&id, false)?;
    let took = start.elapsed();
    record_phase("create (call)", t1 - start);
    record_phase("start (call)", t2 - t1);
    record_phase("wait (call)", t3 - t2);
    record_phase("remove (call)", start + took - t3);
    if exit.exit_code != 0 {
        bail!("keel container exited {exit:?}");
    }
    Ok(took)
}

fn runc_cmd(runc: &Path, root: &Path, args: &[&str]) -> anyhow::Result<()> {
    // Not a pipe: the container's init inherits runc's stdio and would hold a pipe open
    // until it exits, which it does only after `runc start`.
    let err_path = root.with_extension("stderr");
    let err = std::fs::File::create(&err_path)?;
    let status = Command::new(runc)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .with_context(|| format!("spawn {}", runc.display()))?;
    if !status.success() {
        bail!(
            "runc {}: {}",
            args.join(" "),
            std::fs::read_to_string(&err_path)
                .unwrap_or_default()
                .trim()
        );
    }
    Ok(())
}

fn runc_lifecycle(runc: &Path, root: &Path, bundle: &Path) -> anyhow::Result<Duration> {
    let pid_file = bundle.join("init.pid");
    let _ = std::fs::remove_file(&pid_file);
    let start = Instant::now();
    runc_cmd(
        runc,
        root,
        &[
            "create",
            "--bundle",
            bundle.to_str().context("bundle path")?,
            "--pid-file",
            pid_file.to_str().context("pid file path")?,
            "bench-runc",
        ],
    )?;
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    runc_cmd(runc, root, &["start", "bench-runc"])?;
    let pid = rustix::process::Pid::from_raw(pid).context("init pid")?;
    let (_, status) = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())?
        .context("no status")?;
    runc_cmd(runc, root, &["delete", "bench-runc"])?;
    let took = start.elapsed();
    if status.exit_status() != Some(0) {
        bail!("runc container: {status:?}");
    }
    Ok(took)
}

fn ip_netns_add_del(i: usize) -> anyhow::Result<Duration> {
    let name = format!("keel-bench-{}-{i}", std::process::id());
    let start = Instant::now();
    keel_testkit::run("ip", &["netns", "add", &name])?;
    keel_testkit::run("ip", &["netns", "del", &name])?;
    Ok(start.elapsed())
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) * p) / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1e3)
}
