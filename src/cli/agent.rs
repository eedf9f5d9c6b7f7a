//! `keel agent`: the node agent against an API server (keel's or a Kubernetes one) and a CRI
//! endpoint (`keel cri`, or any CRI runtime). Parses flags into a `keel_agent::AgentConfig`
//! and runs the agent until SIGTERM or SIGINT. The work is in keel-agent.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use keel_agent::{Agent, AgentConfig};
use tokio::signal::unix::{SignalKind, signal};

/// `keel agent` flags.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Kubeconfig of the API server (its current context).
    #[arg(long, value_name = "PATH", env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// The cluster's node join token (`<server data dir>/tokens/node-join`): the agent then
    /// authenticates as this node only, with the credential minted from it, instead of as the
    /// kubeconfig's user. Prefer --token-file or the environment: arguments are visible in ps.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KEEL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the node join token (see --token).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Where the log endpoint listens (HTTPS; the API server proxies `kubectl logs` to it).
    /// Served only with a node credential (--token, or a node kubeconfig). Default: the node IP,
    /// port 10250.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// This node's name.
    #[arg(long, value_name = "NAME")]
    pub node_name: String,
    /// The CRI endpoint's unix socket.
    #[arg(long, value_name = "PATH", default_value = keel_cri::server::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,
    /// The node's InternalIP (and the hostIP of its pods). Default: 127.0.0.1.
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// Pod log root: `<DIR>/<namespace>_<name>_<uid>/<container>/<restart>.log`.
    #[arg(long, value_name = "DIR", default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,
    /// Pods' volumes (emptyDir, configMap, secret): `<DIR>/<uid>/volumes/...`.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/keel/agent/pods")]
    pub pod_dir: PathBuf,
    /// CPU kept from pods, in millicores.
    #[arg(long, value_name = "MILLICORES", default_value_t = 0)]
    pub reserved_cpu: u64,
    /// Memory kept from pods, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub reserved_memory: u64,
    /// Pods per node.
    #[arg(long, value_name = "N", default_value_t = 110)]
    pub max_pods: u32,
    /// Lease and Ready heartbeat renewal, in seconds.
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub heartbeat_interval: u64,
    /// First restart back-off of an exited container, in seconds (doubling, at most 300).
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub restart_backoff: f64,
    /// Cluster DNS server for `dnsPolicy: ClusterFirst` pods; unset: the node's resolv.conf.
    #[arg(long, value_name = "IP")]
    pub cluster_dns: Option<IpAddr>,
    /// Cluster domain of the DNS search paths.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.heartbeat_interval == 0 {
        anyhow::bail!("--heartbeat-interval must be at least 1");
    }
    let restart_backoff = Duration::try_from_secs_f64(args.restart_backoff)
        .context("--restart-backoff must be a non-negative number of seconds")?;
    let mut config = AgentConfig::new(args.node_name, args.cri_socket);
    config.node_ip = args.node_ip;
    config.pod_log_dir = args.pod_log_dir;
    config.pod_dir = args.pod_dir;
    config.reserved_cpu_millis = args.reserved_cpu;
    config.reserved_memory_bytes = args.reserved_memory;
    config.max_pods = args.max_pods;
    config.heartbeat_interval = Duration::from_secs(args.heartbeat_interval);
    config.restart_backoff_base = restart_backoff;
    config.cluster_dns = args.cluster_dns;
    config.cluster_domain = args.cluster_domain;
    config.listen = Some(args.listen.unwrap_or_else(|| {
        SocketAddr::new(args.node_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])), 10250)
    }));
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("read --token-file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if token.as_deref() == Some("") {
        anyhow::bail!("the node join token is empty");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let agent = Agent::from_kubeconfig(config, &args.kubeconfig, token.as_deref()).await?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
            r = agent.run() => r.context("agent")?,
        }
        Ok(ExitCode::SUCCESS)
    })
}
