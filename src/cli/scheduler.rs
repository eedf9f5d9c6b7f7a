//! `keel scheduler`: the scheduler alone, against any Kubernetes API server (keel's or
//! another), as kube-scheduler runs. `keel server` runs the same code in-process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use keel_cluster::scheduler::{self, DEFAULT_SCHEDULER_NAME, SchedulerConfig};
use tokio::signal::unix::{SignalKind, signal};

/// `keel scheduler` flags.
#[derive(clap::Args, Debug)]
pub struct SchedulerArgs {
    /// Kubeconfig of the API server (its current context).
    #[arg(long, value_name = "PATH", env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Schedule the pods whose spec.schedulerName is this (and those that name none).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEDULER_NAME)]
    pub scheduler_name: String,
    /// Bindings in flight at once.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub bind_concurrency: usize,
}

pub fn run(args: SchedulerArgs) -> anyhow::Result<ExitCode> {
    if args.bind_concurrency == 0 {
        anyhow::bail!("--bind-concurrency must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let client = keel_cluster::client::from_kubeconfig(&args.kubeconfig).await?;
        let config = SchedulerConfig {
            name: args.scheduler_name,
            bind_concurrency: args.bind_concurrency,
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
            r = scheduler::run(client, config) => r.context("scheduler")?,
        }
        Ok(ExitCode::SUCCESS)
    })
}
