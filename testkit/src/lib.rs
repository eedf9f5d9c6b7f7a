//! keel-testkit: the one privileged test harness every Keel crate shares.
//!
//! Owns test-only resources and their cleanup: network namespaces, veth pairs, cgroups, temporary
//! state roots (with anything mounted under them), a local OCI registry (Debian's `docker-registry`)
//! and the busybox test images. Every guard removes what it made on drop, also when the test
//! panics. Names are unique per test (`keel-t<pid>-<n>`) so tests run in parallel.
//!
//! It must never touch resources it did not create, nor send traffic anywhere but loopback or
//! namespaces it made.

pub mod bpf_test_run;
pub mod cgroup;
pub mod etcd;
pub mod image_builder;
pub mod netns;
pub mod registry;
pub mod state;
pub mod throttle;

pub use cgroup::CgroupGuard;
pub use netns::{NetnsGuard, VethPair};
pub use state::StateRoot;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test of any process uses at the same time: `keel-t<pid>-<n>[-suffix]`.
/// Short enough for interface names (15 bytes) when `suffix` is empty.
pub fn unique_name(suffix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    if suffix.is_empty() {
        format!("keel{pid}-{n}")
    } else {
        format!("keel{pid}-{n}-{suffix}")
    }
}

/// Whether this test may use root-only facilities. Not root outside CI: prints why the test is
/// skipped and returns false. Not root inside CI (`CI` set): panics, because CI must run every
/// privileged test.
pub fn privileged(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: privileged test needs root, and CI must run it");
    }
    eprintln!("SKIP {test}: needs root (run `cargo xtask test` as root)");
    false
}

/// Runs a command to completion and fails with its stderr when it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("spawn {cmd}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
