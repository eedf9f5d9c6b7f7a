//! `cargo xtask bench runtime`: container lifecycle (busybox `/bin/true`: create, start, wait
//! for exit, remove), keel against Debian's runc on the same bundle in the same run, p50/p95
//! and their ratio; pod sandbox run + remove; the RSS of one idle monitor.
//!
//! The measuring code is the release-built bench target `keel-runtime/benches/
//! runtime_lifecycle.rs` (it calls the library the way keel-cri does, and must be optimized);
//! this task builds the release `keel` binary (the monitor) and `keel-monitor` beside it (the
//! watcher the monitor becomes once its container is created, whose RSS is reported), checks
//! the preconditions and runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::workspace_root;

/// Entry point for `cargo xtask bench runtime`.
pub fn run() -> anyhow::Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if !is_root {
        bail!("bench runtime needs root (namespaces, mounts, cgroups)");
    }
    let runc = find_runc().context("runc missing: apt-get install runc")?;
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
            "keel-runtime",
            "--bin",
            "keel-monitor",
        ])
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("building keel (release) failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let keel = target.join("release").join("keel");
    println!("runc: {}; keel: {}", runc.display(), keel.display());
    let st = Command::new(&cargo)
        .args([
            "bench",
            "-p",
            "keel-runtime",
            "--bench",
            "runtime_lifecycle",
        ])
        .env("KEEL_BIN", &keel)
        .env("KEEL_BENCH_RUNC", &runc)
        .current_dir(&root)
        .status()?;
    if !st.success() {
        bail!("bench runtime failed: {st}");
    }
    Ok(())
}

/// `/usr/sbin/runc` (Debian's package), else `runc` on PATH.
fn find_runc() -> Option<PathBuf> {
    if Path::new("/usr/sbin/runc").exists() {
        return Some(PathBuf::from("/usr/sbin/runc"));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("runc"))
            .find(|p| p.exists())
    })
}
