//! `cargo xtask bench images`: pulls the ~50 MiB multi-layer busybox "Big" test image from a
//! local registry with keel (download, verify, unpack into snapshots) and, in the same run and
//! alternating with it, with `skopeo copy` to an OCI directory (download and verify only, no
//! unpack): the anchor. Each run starts from an empty state dir. Prints p50/min/max of both and
//! the p50 ratio. Target: keel at or below skopeo.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_testkit::StateRoot;
use keel_testkit::image_builder::{self, Variant};
use keel_testkit::registry::Registry;

use crate::{cargo, workspace_root};

const RUNS: usize = 7;

fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

pub struct Stats {
    pub p50: Duration,
    pub min: Duration,
    pub max: Duration,
}

pub fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        p50: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--bin", "keel"])?;
    let keel = workspace_root().join("target/release/keel");
    let registry = Registry::start_anonymous()?;
    let image = image_builder::build(Variant::Big)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(image.push(&registry.host(), "bench/big", "v1", None))?;
    let reference = format!("{}/bench/big:v1", registry.host());
    let bytes: u64 = image.layers.iter().map(|l| l.size).sum();

    let skopeo_once = |dir: &Path| {
        timed(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("oci:{}:v1", dir.join("layout").display()),
        ]))
    };
    let keel_once = |dir: &Path| {
        timed(
            Command::new(&keel)
                .arg("--root")
                .arg(dir)
                .args(["image", "pull", "--quiet", "--insecure-registry"])
                .arg(registry.host())
                .arg(&reference),
        )
    };

    // one warm-up each (page cache, registry's own caches), then alternate
    skopeo_once(StateRoot::new()?.path())?;
    keel_once(StateRoot::new()?.path())?;
    let (mut sk, mut kl) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let d = StateRoot::new()?;
        sk.push(skopeo_once(d.path())?);
        drop(d);
        let d = StateRoot::new()?;
        kl.push(keel_once(d.path())?);
    }
    let (s, k) = (stats(sk), stats(kl));
    let ratio = ms(k.p50) / ms(s.p50);
    println!(
        "bench images: {:.1} MiB compressed in {} layers, {RUNS} runs each, alternating",
        bytes as f64 / (1024.0 * 1024.0),
        image.layers.len()
    );
    println!(
        "  skopeo copy -> oci dir (anchor): p50 {:7.1} ms  min {:7.1}  max {:7.1}",
        ms(s.p50),
        ms(s.min),
        ms(s.max)
    );
    println!(
        "  keel image pull (+unpack)      : p50 {:7.1} ms  min {:7.1}  max {:7.1}",
        ms(k.p50),
        ms(k.min),
        ms(k.max)
    );
    println!("  ratio keel/skopeo p50: {ratio:.2} (target <= 1.00)");
    Ok(())
}
