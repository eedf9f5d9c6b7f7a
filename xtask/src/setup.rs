//! `cargo xtask setup`: installs the Debian packages Keel's build, tests and benchmarks use,
//! and only those that are missing, so it is cheap to call before every task.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Every Debian package the build, the tests and the benchmarks need.
pub const PACKAGES: &[&str] = &[
    // build: eBPF C programs, seccomp, protobuf for the CRI proto
    "clang",
    "llvm",
    "libbpf-dev",
    // eBPF C: clang-19 (preferred by ebpf/build.rs), <asm/types.h> and the host layout probe
    "clang-19",
    "linux-libc-dev",
    "libc6-dev",
    "libseccomp-dev",
    "pkg-config",
    "protobuf-compiler",
    // google/protobuf/*.proto, which etcd-client's protos import
    "libprotobuf-dev",
    // the node's tools
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    // test fixtures started by the tests themselves
    "busybox-static",
    "docker-registry",
    "apache2-utils",
    "etcd-server",
    "kubernetes-client",
    "containernetworking-plugins",
    "socat",
    // anchors for the benchmarks
    "skopeo",
    "runc",
    "containerd",
];

/// Packages whose command may already come from elsewhere (e.g. a `kubectl` package from a
/// cloud SDK, which conflicts with Debian's kubernetes-client): present command = satisfied.
const PROVIDES: &[(&str, &str)] = &[("kubernetes-client", "kubectl")];

fn installed(pkg: &str) -> bool {
    if let Some((_, cmd)) = PROVIDES.iter().find(|(p, _)| *p == pkg) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if found {
            return true;
        }
    }
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root to install them",
            missing.join(" ")
        );
    }
    println!("xtask setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    // containerd and docker-registry install services; our tests start their own instances.
    for unit in ["containerd", "docker-registry", "etcd"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", unit])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}
