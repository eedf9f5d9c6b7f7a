//! `cargo xtask bench cni`: ADD+DEL latency of `keel-cni` against Debian's reference `bridge` +
//! `host-local` plugins with an equivalent config, measured in the same run, interleaved, both
//! exec'd exactly as a CNI runtime execs them. Prints p50/p95 of each and the ratio.
//!
//! Everything runs in namespaces made here: a "node" namespace the plugins run in (the bench
//! re-executes itself inside it, so the timed spawns carry no `ip netns exec` overhead) and a
//! pod namespace. Nothing touches the host's network.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_testkit::NetnsGuard;
use serde_json::{Value, json};

const CYCLES: usize = 200;
const WARMUP: usize = 5;
const INNER_ENV: &str = "KEEL_BENCH_CNI_INNER";
const REF_DIR: &str = "/usr/lib/cni";

/// Entry point for `cargo xtask bench cni`.
pub fn run() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(INNER_ENV) {
        let spec: Value = serde_json::from_str(&spec).context("bench spec")?;
        return inner(&spec);
    }
    if !rustix_is_root() {
        bail!("bench cni needs root (network namespaces, bridges)");
    }
    for bin in ["bridge", "host-local"] {
        if !Path::new(REF_DIR).join(bin).exists() {
            bail!("{REF_DIR}/{bin} missing: apt-get install containernetworking-plugins");
        }
    }
    let keel = build_plugin()?;
    let node = NetnsGuard::new()?;
    let pod = NetnsGuard::new()?;
    let data = tempfile::Builder::new()
        .prefix("keel-bench-cni-")
        .tempdir()?;
    let spec = json!({
        "keel": keel,
        "pod": pod.path(),
        "data": data.path(),
    });
    let exe = std::env::current_exe()?;
    let status = Command::new("ip")
        .args(["netns", "exec", node.name()])
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(INNER_ENV, spec.to_string())
        .status()
        .context("re-exec bench inside the node namespace")?;
    if !status.success() {
        bail!("bench cni failed: {status}");
    }
    Ok(())
}

fn rustix_is_root() -> bool {
    // xtask has no libc binding of its own; `id -u` is good enough for a bench precondition.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// `KEEL_CNI_BIN` names a prebuilt plugin; otherwise `cargo build --release` makes one.
fn build_plugin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEEL_CNI_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "keel-cni", "--bin", "keel-cni"])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("building keel-cni failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("keel-cni"))
}

struct Plugin {
    label: &'static str,
    bin: PathBuf,
    conf: Value,
    ifname: &'static str,
}

fn invoke(p: &Plugin, command: &str, cid: &str, pod: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(&p.bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", pod)
        .env("CNI_IFNAME", p.ifname)
        .env("CNI_PATH", REF_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", p.bin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(p.conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{} {command} failed: {}",
            p.label,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(took)
}

fn inner(spec: &Value) -> anyhow::Result<()> {
    let pod = spec["pod"].as_str().context("pod")?.to_string();
    let data = spec["data"].as_str().context("data")?;
    let keel = Plugin {
        label: "keel-cni",
        bin: PathBuf::from(spec["keel"].as_str().context("keel")?),
        ifname: "eth0",
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench-keel", "type": "keel-cni",
            "bridge": "kbench0", "isGateway": true, "ipMasq": false,
            "ipam": { "type": "keel-cni", "ranges": [[{"subnet": "10.200.0.0/16"}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data }
        }),
    };
    let reference = Plugin {
        label: "bridge+host-local",
        bin: Path::new(REF_DIR).join("bridge"),
        ifname: "eth1",
        conf: json!({
            "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge",
            "bridge": "rbench0", "isGateway": true, "ipMasq": false,
            "ipam": { "type": "host-local", "ranges": [[{"subnet": "10.201.0.0/16"}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data }
        }),
    };
    // keel-cni's DEL answers once the pod is cut off and finishes deleting the veth in the
    // background. Before the reference runs, wait for that to end, so neither plugin's kernel
    // work overlaps the other's timing; the wait is reported as "settled".
    let pending_dir = Path::new(data).join("bench-keel").join("deleting");
    let mut samples: [(Vec<Duration>, Vec<Duration>, Vec<Duration>); 2] = Default::default();
    let mut settled = Vec::new();
    for i in 0..WARMUP + CYCLES {
        for (k, p) in [&keel, &reference].into_iter().enumerate() {
            let cid = format!("bench-{i}");
            let add = invoke(p, "ADD", &cid, &pod)?;
            let del = invoke(p, "DEL", &cid, &pod)?;
            let settle = if k == 0 {
                wait_settled(&pending_dir)?
            } else {
                Duration::ZERO
            };
            if i >= WARMUP {
                samples[k].0.push(add);
                samples[k].1.push(del);
                samples[k].2.push(add + del);
                if k == 0 {
                    settled.push(del + settle);
                }
            }
        }
    }
    println!("CNI ADD+DEL latency, {CYCLES} cycles each, interleaved, same node namespace");
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "plugin", "ADD p50", "ADD p95", "DEL p50", "DEL p95", "ADD+DEL p50", "ADD+DEL p95"
    );
    let mut p50s = Vec::new();
    for (k, p) in [&keel, &reference].into_iter().enumerate() {
        let (a, d, t) = &mut samples[k];
        let (a50, a95, d50, d95, t50, t95) = (
            pct(a, 50),
            pct(a, 95),
            pct(d, 50),
            pct(d, 95),
            pct(t, 50),
            pct(t, 95),
        );
        println!(
            "{:<20} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
            p.label,
            ms(a50),
            ms(a95),
            ms(d50),
            ms(d95),
            ms(t50),
            ms(t95)
        );
        p50s.push((t50, t95));
    }
    let ratio50 = p50s[0].0.as_secs_f64() / p50s[1].0.as_secs_f64();
    let ratio95 = p50s[0].1.as_secs_f64() / p50s[1].1.as_secs_f64();
    println!("ratio keel-cni / reference: p50 {ratio50:.2}x, p95 {ratio95:.2}x (target <= 0.50x)");
    let (s50, s95) = (pct(&mut settled, 50), pct(&mut settled, 95));
    println!(
        "keel-cni DEL until the veth is gone and addresses released (background, not seen by \
         the runtime): p50 {}, p95 {}; reference DEL p50 {}",
        ms(s50),
        ms(s95),
        ms(pct(&mut samples[1].1, 50))
    );
    Ok(())
}

/// Waits until no background deletion is pending (the marker directory is empty).
fn wait_settled(dir: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let busy = match std::fs::read_dir(dir) {
            Ok(mut rd) => rd.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).context("read pending-deletion markers"),
        };
        if !busy {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("keel-cni background deletion did not finish in 10s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
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
