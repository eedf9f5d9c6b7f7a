//! `keel server`: the control plane, and this machine as its first node. Parses flags into a
//! `keel_cluster::api::ApiConfig`, opens the store (redb in the data dir, or etcd), starts the API
//! server, the scheduler and the controllers (clients of that server through the admin
//! kubeconfig), prints the kubeconfig path, then (unless --no-node) the node roles of
//! `server_node.rs`: CRI endpoint, agent, proxy. Serves until SIGTERM or SIGINT. The work is in
//! keel-cluster and the node roles' crates.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_cluster::api::{ApiConfig, ApiServer, Cidr};
use keel_cluster::controllers::nodeipam::NodeIpamConfig;
use keel_cluster::scheduler::SchedulerConfig;
use keel_cluster::store::{self, StoreConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::server_node;
use crate::config::Config;

/// `keel server` flags.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Run only the control plane (API server, store, scheduler, controllers), not this
    /// machine's node roles (CNI, CRI endpoint, agent, proxy).
    #[arg(long)]
    pub no_node: bool,
    #[command(flatten)]
    pub node: crate::cli::server_node::NodeArgs,
    /// Data dir: the redb store, the CA and serving certificate, the tokens, the kubeconfig.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/keel/server")]
    pub data_dir: PathBuf,
    /// HTTPS address of the API server.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:6443")]
    pub api_listen: SocketAddr,
    /// Use these etcd endpoints (comma-separated URLs) instead of the embedded redb store.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// ClusterIPs are allocated from this CIDR.
    #[arg(long, value_name = "CIDR", default_value = "10.96.0.0/12")]
    pub service_cidr: String,
    /// Pod addresses of the whole cluster: each Node gets a range of it (spec.podCIDR) for its
    /// pods, and every node routes the others' ranges through them.
    #[arg(long, value_name = "CIDR", default_value = "10.42.0.0/16")]
    pub cluster_cidr: String,
    /// Prefix length of each node's range of --cluster-cidr.
    #[arg(long, value_name = "BITS", default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// NodePorts are allocated from this range.
    #[arg(long, value_name = "FIRST-LAST", default_value = "30000-32767")]
    pub node_port_range: String,
    /// Extra DNS names or IPs for the serving certificate (first start only).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Seconds between compactions of the store's history; watches older than about this get
    /// 410 Gone.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub compact_interval: u64,
    /// Seconds between watch bookmarks.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub bookmark_interval: u64,
    /// Do not run the scheduler in this process (run `keel scheduler` elsewhere, or none).
    #[arg(long)]
    pub disable_scheduler: bool,
    /// Do not run the controllers (Deployment, ReplicaSet, EndpointSlice, node lifecycle) in
    /// this process.
    #[arg(long)]
    pub disable_controllers: bool,
    /// Seconds without a heartbeat (the node's Lease) before a node is unreachable: Ready
    /// turns Unknown and it gets the node.kubernetes.io/unreachable:NoExecute taint.
    #[arg(long, value_name = "SECONDS", default_value_t = 40)]
    pub node_grace_period: u64,
    /// Seconds pods without a toleration of their own stay on an unreachable node before they are
    /// evicted (and replaced elsewhere by their controller).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub pod_eviction_timeout: u64,
}

pub fn run(root: &Path, cfg: &Config, args: ServerArgs) -> anyhow::Result<ExitCode> {
    let service_cidr: Cidr = args
        .service_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?;
    let cluster_cidr: Cidr = args
        .cluster_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    let node_ipam = NodeIpamConfig::new(cluster_cidr, args.node_cidr_mask_size)
        .map_err(|e| anyhow::anyhow!("--node-cidr-mask-size: {e}"))?;
    let node_ports = parse_range(&args.node_port_range).context("--node-port-range")?;
    if args.compact_interval == 0 || args.bookmark_interval == 0 || args.node_grace_period == 0 {
        bail!(
            "--compact-interval, --bookmark-interval and --node-grace-period must be at least 1 second"
        );
    }
    let node_lifecycle = keel_cluster::controllers::nodelifecycle::NodeLifecycleConfig {
        grace: Duration::from_secs(args.node_grace_period),
        eviction: Duration::from_secs(args.pod_eviction_timeout),
        interval: Duration::from_secs(args.node_grace_period.clamp(1, 5)),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;
    let store_config = if args.etcd_endpoints.is_empty() {
        StoreConfig::Redb {
            data_dir: args.data_dir.clone(),
        }
    } else {
        StoreConfig::Etcd {
            endpoints: args.etcd_endpoints.clone(),
        }
    };
    let node = if args.no_node {
        None
    } else {
        Some(server_node::plan(
            root,
            cfg,
            &args.node,
            &args.data_dir,
            true,
        )?)
    };
    // Other machines join at this node's address when the API listens on every address.
    let join_ip = node
        .as_ref()
        .map(|p| p.node_ip)
        .filter(|_| args.api_listen.ip().is_unspecified());
    let mut config = ApiConfig::new(args.data_dir.clone(), args.api_listen);
    config.service_cidr = service_cidr;
    config.node_port_range = node_ports;
    config.tls_sans = args.tls_san;
    // Agents on other machines reach the server at this node's address.
    if let Some(plan) = &node
        && !plan.node_ip.is_loopback()
    {
        config.tls_sans.push(plan.node_ip.to_string());
    }
    config.compact_interval = Duration::from_secs(args.compact_interval);
    config.bookmark_interval = Duration::from_secs(args.bookmark_interval);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let store = store::open(&store_config)
            .await
            .with_context(|| format!("open store {store_config:?}"))?;
        let server = ApiServer::start(config, store)
            .await
            .context("start API server")?;
        // One write, errors ignored: whoever started us may stop reading once it has the path.
        let kubeconfig = server.kubeconfig.display();
        let mut banner = format!(
            "keel server: API at {}\nkeel server: kubeconfig written to {kubeconfig}\n\
             keel server: export KUBECONFIG={kubeconfig}\n",
            server.url
        );
        let scheduler = if args.disable_scheduler {
            None
        } else {
            let client = keel_cluster::client::from_kubeconfig(&server.kubeconfig)
                .await
                .context("scheduler client")?;
            Some(tokio::spawn(keel_cluster::scheduler::run(
                client,
                SchedulerConfig::default(),
            )))
        };
        let controllers = if args.disable_controllers {
            None
        } else {
            let client = keel_cluster::client::from_kubeconfig(&server.kubeconfig)
                .await
                .context("controllers client")?;
            Some(tokio::spawn(keel_cluster::controllers::run(
                client,
                node_lifecycle,
                node_ipam,
            )))
        };
        let controllers_done = async {
            match controllers {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        let scheduler_done = async {
            match scheduler {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        // This node: the CRI endpoint here, the agent and the proxy as clients of the server.
        let mut roles = None;
        if let Some(plan) = node {
            banner.push_str(&format!(
                "keel server: node {} ({}) joins as this machine; `kubectl get nodes` shows it \
                 Ready once its agent registered\n",
                plan.node_name, plan.node_ip
            ));
            roles = Some(
                server_node::NodeRoles::start(
                    plan,
                    server.kubeconfig.clone(),
                    Some(server.node_join_token.clone()),
                )
                .await?,
            );
        }
        banner.push_str(&format!(
            "keel server: join other machines with: keel agent --server {} --token-file {} \
             --node-ip <their address>\n",
            join_url(&server.url, join_ip),
            server.join_token_file.display()
        ));
        let roles_done = async {
            match roles.as_mut() {
                Some(r) => r.failed().await,
                None => std::future::pending().await,
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
        drop(out);
        let outcome = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT"); Ok(()) }
            _ = server.wait() => Err(anyhow::anyhow!("API server stopped")),
            r = scheduler_done => Err(anyhow::anyhow!("scheduler stopped: {r:?}")),
            r = controllers_done => Err(anyhow::anyhow!("controllers stopped: {r:?}")),
            e = roles_done => Err(e),
        };
        // Containers, pods and the proxy's programs stay: a restarted server takes them over.
        if let Some(r) = roles {
            r.shutdown().await;
        }
        outcome.map(|()| ExitCode::SUCCESS)
    })
}

/// The URL other machines join at: the API's own, with the node's address for loopback.
fn join_url(url: &str, node_ip: Option<std::net::IpAddr>) -> String {
    match node_ip {
        Some(ip) if !ip.is_loopback() => {
            url.replacen("127.0.0.1", &ip.to_string(), 1)
                .replacen("[::1]", &format!("[{ip}]"), 1)
        }
        _ => url.to_string(),
    }
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("{s:?}: expected FIRST-LAST, e.g. 30000-32767"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("{s:?}: first port"))?,
        b.trim()
            .parse()
            .with_context(|| format!("{s:?}: last port"))?,
    );
    if a == 0 || a > b {
        bail!("{s:?}: the range must be non-empty and start above 0");
    }
    Ok(a..=b)
}
