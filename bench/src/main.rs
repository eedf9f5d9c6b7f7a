//! `keel-bench`: Keel's benchmarks, each against its anchor in the same run. Started by
//! `cargo xtask bench NAME` once the system packages are in place (see bench/Cargo.toml for why
//! this is not part of xtask).

mod api;
mod cluster;
mod cni;
mod cri;
mod images;
mod proxy;
mod runtime;
mod scheduler;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cargo xtask bench",
    about = "Run a benchmark beside its anchor and print the ratios (as root, on an idle machine)"
)]
struct Cli {
    #[arg(value_enum)]
    which: Bench,
    /// proxy only: run just this part (repeatable; default all), e.g.
    /// `cargo xtask bench proxy --only nodeport`.
    #[arg(long, value_enum)]
    only: Vec<proxy::Part>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// API server creates/s, list time, watch delay, RSS on redb and etcd vs raw etcd puts.
    Api,
    /// Cluster: kubectl apply of a 10-replica Deployment to all Ready on a single-node
    /// `keel server` vs the same pods through its CRI endpoint directly; server idle RSS.
    Cluster,
    /// Image pull from a local registry: keel vs skopeo copy.
    Images,
    /// CNI ADD+DEL latency: keel-cni vs the reference bridge + host-local plugins.
    Cni,
    /// CRI pod start p50/p99 (sequential, burst), daemon RSS, per-pod memory: keel vs containerd 1.6.
    Cri,
    /// Container lifecycle and pod sandbox latency, idle monitor RSS: keel vs runc.
    Runtime,
    /// Service load balancing: keel's socket LB vs kube-proxy's iptables rules (1..10,000
    /// services); NodePort UDP packet rate through keel's XDP and tc programs vs iptables DNAT.
    Proxy,
    /// Scheduler: 1,000 simulated nodes, 10,000 pods: pods bound/s and create-to-bound p99.
    Scheduler,
}

fn main() -> anyhow::Result<()> {
    // kube-rs's client (api, scheduler, cluster) needs one process-wide rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if !cli.only.is_empty() && !matches!(cli.which, Bench::Proxy) {
        bail!("--only picks parts of `bench proxy` only");
    }
    match cli.which {
        Bench::Api => api::run(),
        Bench::Cluster => cluster::run(),
        Bench::Images => images::run(),
        Bench::Cni => cni::run(),
        Bench::Cri => cri::run(),
        Bench::Runtime => runtime::run(),
        Bench::Proxy => proxy::run(&cli.only),
        Bench::Scheduler => scheduler::run(),
    }
}

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cargo ARGS` in the workspace root, failing if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("+ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
