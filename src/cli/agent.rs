//! `keel agent`: this machine as a node of a cluster. `--server URL --token T` joins a keel
//! server (the CA pinned by the join token, see `keel_cluster::join`) and runs the same node
//! roles as `keel server`'s own node (`server_node.rs`): keel-cni, the CRI endpoint, the agent
//! and the service proxy. `--kubeconfig` talks to any API server instead; `--external-cri`
//! drives an existing CRI endpoint (keel cri, containerd, CRI-O) rather than running one. Runs
//! until SIGTERM or SIGINT. The work is in keel-agent and the node roles' crates.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_cluster::join::{JoinError, JoinToken};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::server_node::{self, NodeArgs, NodeRoles};
use crate::config::Config;

/// `keel agent` flags.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The keel server to join, e.g. https://10.0.0.1:6443 (with --token or --token-file).
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    pub server: Option<String>,
    /// Kubeconfig of the API server (its current context), instead of --server.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The join token: the contents of the server's `<data dir>/node-token`
    /// (`keel1.<ca-sha256>.<secret>`), which pins the server's CA. With --kubeconfig the bare
    /// secret (`tokens/node-join`) will do. The agent authenticates as its node only. Prefer
    /// --token-file or the environment: arguments are visible in ps.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KEEL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the join token (see --token).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Agent data dir: the kubeconfig written on joining, the CNI dir (unless --cni-dir).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/keel/agent")]
    pub data_dir: PathBuf,
    /// Drive the CRI endpoint at --cri-socket (keel cri, containerd, CRI-O, with their own CNI
    /// config) instead of running keel's endpoint and keel-cni in this process.
    #[arg(long)]
    pub external_cri: bool,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Pods' volumes (emptyDir, configMap, secret): `<DIR>/<uid>/volumes/...`. Default:
    /// `<root>/agent/pods`.
    #[arg(long, value_name = "DIR")]
    pub pod_dir: Option<PathBuf>,
    /// CPU kept from pods, in millicores.
    #[arg(long, value_name = "MILLICORES", default_value_t = 0)]
    pub reserved_cpu: u64,
    /// Memory kept from pods, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub reserved_memory: u64,
    /// Pods per node.
    #[arg(long, value_name = "N", default_value_t = 110)]
    pub max_pods: u32,
    /// First restart back-off of an exited container, in seconds (doubling, at most 300).
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub restart_backoff: f64,
    /// Cluster DNS server for `dnsPolicy: ClusterFirst` pods; unset: the node's resolv.conf.
    #[arg(long, value_name = "IP")]
    pub cluster_dns: Option<std::net::IpAddr>,
    /// Cluster domain of the DNS search paths.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

pub fn run(root: &Path, cfg: &Config, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let restart_backoff = Duration::try_from_secs_f64(args.restart_backoff)
        .context("--restart-backoff must be a non-negative number of seconds")?;
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
        bail!("the join token is empty");
    }
    let join = match (&args.server, &token) {
        (Some(url), Some(t)) => Some((url.clone(), JoinToken::parse(t)?)),
        (Some(_), None) => bail!(
            "--server needs the join token (--token or --token-file): the server's \
             <data dir>/node-token"
        ),
        (None, _) => None,
    };
    let mut plan = server_node::plan(root, cfg, &args.node, &args.data_dir, !args.external_cri)?;
    let agent = &mut plan.agent;
    if let Some(dir) = args.pod_dir {
        agent.pod_dir = dir;
    }
    agent.reserved_cpu_millis = args.reserved_cpu;
    agent.reserved_memory_bytes = args.reserved_memory;
    agent.max_pods = args.max_pods;
    agent.restart_backoff_base = restart_backoff;
    agent.cluster_dns = args.cluster_dns;
    agent.cluster_domain = args.cluster_domain;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let (kubeconfig, secret) = match join {
            Some((url, token)) => {
                let path =
                    write_join_kubeconfig(&url, &token, &plan.node_name, &args.data_dir).await?;
                // The kubeconfig holds the node credential already.
                (path, None)
            }
            None => (
                args.kubeconfig
                    .expect("clap requires --kubeconfig without --server"),
                token.map(|t| JoinToken::parse(&t).map(|j| j.secret).unwrap_or(t)),
            ),
        };
        let mut roles = NodeRoles::start(plan, kubeconfig, secret).await?;
        let outcome = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT"); Ok(()) }
            e = roles.failed() => Err(e),
        };
        roles.shutdown().await;
        outcome.map(|()| ExitCode::SUCCESS)
    })
}

/// Fetches the server's CA (checked against the token's pin; retried while the server does
/// not answer) and writes `<data dir>/kubeconfig` for this node.
async fn write_join_kubeconfig(
    url: &str,
    token: &JoinToken,
    node_name: &str,
    data_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let ca = loop {
        match keel_cluster::join::fetch_ca(url, token).await {
            Ok(ca) => break ca,
            Err(e @ JoinError::Connect { .. }) => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    let path = data_dir.join("kubeconfig");
    let text = keel_cluster::join::node_kubeconfig(url, &ca, token, node_name);
    keel_cluster::api::pki::write_secure(&path, text.as_bytes(), 0o600)?;
    tracing::info!(server = url, kubeconfig = %path.display(), "joined");
    Ok(path)
}
