//! `keel`: one binary for every role of a node. This file only parses the command line and
//! dispatches; the logic lives in the library crates (keel-runtime, keel-cni, ...).

mod cli;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keel: node-level container runtime, CNI plugin, eBPF service proxy and standalone cluster.
#[derive(Parser, Debug)]
#[command(name = "keel", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// State root for images, pods and containers.
    #[arg(
        long,
        global = true,
        env = "KEEL_ROOT",
        default_value = "/var/lib/keel"
    )]
    root: PathBuf,

    /// Config file (TOML). Flags override it. Missing default file is fine; a missing
    /// explicitly named file is an error.
    #[arg(long, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `keel_runtime=debug`. The default
    /// keeps libcgroups to errors: it warns about every cgroup v1 controller the host lacks,
    /// on every container removal.
    #[arg(
        long,
        global = true,
        env = "KEEL_LOG",
        default_value = "warn,libcgroups=error"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage images: pull, list, inspect, remove, import, prune.
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
    /// Manage containers: run, create, start, exec, logs, ls, inspect, stop, rm, stats.
    #[command(subcommand)]
    Ctr(cli::ctr::CtrCommand),
    /// Manage pod sandboxes: run, ls, inspect, stop, rm.
    #[command(subcommand)]
    Pod(cli::pod::PodCommand),
    /// CNI plugin tasks: install the keel-cni binary and a conflist.
    Cni(cli::cni::CniArgs),
    /// Serve the Kubernetes CRI (RuntimeService, ImageService) on a unix socket.
    Cri(cli::cri::CriArgs),
    /// Run a cluster: the Kubernetes-compatible API server on redb or etcd, the scheduler, the
    /// controllers, and (unless --no-node) this machine as its node: CNI, CRI endpoint, agent,
    /// service proxy.
    Server(Box<cli::server::ServerArgs>),
    /// Run the scheduler alone against an API server (keel server runs it in-process).
    Scheduler(cli::scheduler::SchedulerArgs),
    /// eBPF service proxy (kube-proxy replacement): run it, `ls`, `uninstall`.
    Proxy(cli::proxy::ProxyArgs),
    /// Join a cluster as a node (`--server URL --token T`): CNI, CRI endpoint, agent, service
    /// proxy; or only the agent against any API server and CRI endpoint.
    Agent(Box<cli::agent::AgentArgs>),
}

fn main() -> ExitCode {
    // The container monitor and exec helper are this binary re-executed (`keel __monitor`).
    if let Some(code) = keel_runtime::container::monitor::hidden_main() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = (|| {
        let config = config::Config::load(cli.config.as_deref())?;
        match cli.command {
            Command::Image(cmd) => cli::image::run(&cli.root, &config, cmd),
            Command::Ctr(cmd) => cli::ctr::run(&cli.root, &config, cmd),
            Command::Pod(cmd) => cli::pod::run(&cli.root, &config, cmd),
            Command::Cni(args) => cli::cni::run(args).map(|()| ExitCode::SUCCESS),
            Command::Cri(args) => cli::cri::run(&cli.root, &config, args),
            Command::Server(args) => cli::server::run(&cli.root, &config, *args),
            Command::Scheduler(args) => cli::scheduler::run(args),
            Command::Proxy(args) => cli::proxy::run(args),
            Command::Agent(args) => cli::agent::run(&cli.root, &config, *args),
        }
    })();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
