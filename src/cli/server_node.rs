//! The node roles a machine runs as a node of a keel cluster, in one process: keel-cni
//! installed into a keel-owned CNI dir (with the node's range from node IPAM, or a fixed
//! --pod-cidr), the CRI endpoint, the agent (authenticated as this node) and the eBPF service
//! proxy. `keel server` runs them beside the control plane (unless --no-node), `keel agent` on
//! the other machines; both parse the same [`NodeArgs`] into a [`NodePlan`] and run it with
//! [`NodeRoles`]. The work is in keel-cri, keel-agent, keel-cni and keel-proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::cni::ipnet_arg;
use crate::cli::image::RegistryFlags;
use crate::config::Config;

/// The flags of this machine's node roles (`keel server` ignores them with --no-node).
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// This node's name. Default: the host name, lowercased.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// The node's InternalIP (pods' hostIP, NodePorts, the log endpoint). Default: 127.0.0.1.
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// A fixed pod subnet for this node (keel-cni's bridge network), with no routes to other
    /// nodes. Default: the range node IPAM gives this Node from --cluster-cidr, with routes to
    /// every other node's range (host-gw).
    #[arg(long, value_name = "CIDR")]
    pub pod_cidr: Option<ipnet_arg::Net>,
    /// The pods' bridge.
    #[arg(long, value_name = "NAME", default_value = "keel0")]
    pub bridge: String,
    /// The CRI endpoint's socket (crictl and other kubelets may use it too).
    #[arg(long, value_name = "PATH", default_value = keel_cri::server::DEFAULT_SOCKET)]
    pub cri_socket: PathBuf,
    /// CNI dir: the conflist in DIR/net.d, the plugin in DIR/bin, IP allocations in DIR/ipam.
    /// Default: <data-dir>/cni.
    #[arg(long, value_name = "DIR")]
    pub cni_dir: Option<PathBuf>,
    /// Container run dir (libcontainer state; pod pins beside it).
    #[arg(
        long,
        value_name = "DIR",
        env = "KEEL_RUN_DIR",
        default_value = "/run/keel/containers"
    )]
    pub run_dir: PathBuf,
    /// Pod logs: <DIR>/<namespace>_<name>_<uid>/<container>/<attempt>.log.
    #[arg(long, value_name = "DIR", default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,
    /// The pods' cgroup parent (relative to each hierarchy's root).
    #[arg(long, value_name = "PATH", default_value = "keel")]
    pub cgroup_parent: String,
    /// The agent's log endpoint (`kubectl logs`). Default: the node IP, port 10250.
    #[arg(long, value_name = "ADDR")]
    pub agent_listen: Option<SocketAddr>,
    /// Do not run the service proxy on this node (pods' hostPorts then go through Debian's
    /// portmap CNI plugin, chained when /usr/lib/cni/portmap exists).
    #[arg(long)]
    pub disable_proxy: bool,
    /// The cgroup v2 directory the proxy's socket hooks attach to. Default: the v2 root, so
    /// that every process on the host reaches ClusterIPs.
    #[arg(long, value_name = "PATH")]
    pub proxy_cgroup: Option<PathBuf>,
    /// Interfaces whose traffic gets the proxy's NodePort programs (tc: DNAT on ingress,
    /// reverse NAT on egress); repeatable. Default: the interface holding --node-ip (none when
    /// it is loopback).
    #[arg(long = "proxy-tc-iface", value_name = "IFACE")]
    pub proxy_tc_interfaces: Vec<String>,
    /// Where the proxy pins its programs and maps.
    #[arg(long, value_name = "DIR", default_value = keel_proxy::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// The proxy's /healthz listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256")]
    pub proxy_healthz_address: SocketAddr,
    /// The agent's Lease and Ready heartbeat, in seconds (keep it well under the server's
    /// --node-grace-period).
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub heartbeat_interval: u64,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

/// The reference portmap plugin (Debian's containernetworking-plugins), chained for hostPorts
/// when present and the proxy is off (with the proxy, hostPorts are frontends of its maps).
const PORTMAP: &str = "/usr/lib/cni/portmap";

/// Installs keel-cni (and links the portmap plugin beside it when chained).
pub fn install_cni(spec: &keel_cni::install::InstallSpec) -> anyhow::Result<()> {
    let (bin, conf) = keel_cni::install::install(spec).context("install keel-cni")?;
    if spec.portmap {
        let link = spec.bin_dir.join("portmap");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(PORTMAP, &link)
            .with_context(|| format!("link {PORTMAP} to {}", link.display()))?;
    }
    tracing::info!(bin = %bin.display(), conf = %conf.display(), "keel-cni installed");
    Ok(())
}

/// keel-cni installed with the range the Node gets from node IPAM (the agent calls it).
pub fn pod_network(
    spec: keel_cni::install::InstallSpec,
    routes: bool,
) -> keel_agent::network::PodNetwork {
    let install = move |cidr: &str| -> Result<(), String> {
        let mut spec = spec.clone();
        spec.subnets = vec![cidr.parse().map_err(|e| format!("{cidr:?}: {e}"))?];
        install_cni(&spec).map_err(|e| format!("{e:#}"))
    };
    keel_agent::network::PodNetwork {
        install: std::sync::Arc::new(install),
        routes,
    }
}

/// What the node roles are built from, checked before anything starts.
pub struct NodePlan {
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The CRI endpoint and keel-cni run here (None: the agent drives an external endpoint,
    /// whose CNI is its own business).
    pub cri: Option<keel_cri::ServerConfig>,
    pub cni: Option<keel_cni::install::InstallSpec>,
    pub agent: keel_agent::AgentConfig,
    pub proxy: Option<keel_proxy::ProxyConfig>,
}

/// Checks the flags and derives every role's configuration; with `embedded`, the CRI endpoint
/// and keel-cni run in this process.
pub fn plan(
    root: &Path,
    config: &Config,
    args: &NodeArgs,
    data_dir: &Path,
    embedded: bool,
) -> anyhow::Result<NodePlan> {
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => keel_proxy::kube_source::default_node_name()
            .context("the host name is unknown; pass --node-name")?,
    };
    let node_ip = args.node_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let subnets = match &args.pod_cidr {
        Some(net) => vec![
            net.0
                .parse()
                .with_context(|| format!("--pod-cidr {}", net.0))?,
        ],
        None => Vec::new(),
    };
    let mut agent = keel_agent::AgentConfig::new(node_name.clone(), args.cri_socket.clone());
    let (cri, cni) = if embedded {
        let cni_dir = args.cni_dir.clone().unwrap_or_else(|| data_dir.join("cni"));
        let plugin = std::env::current_exe()
            .context("locate the keel binary")?
            .with_file_name("keel-cni");
        if !plugin.is_file() {
            bail!(
                "{} is missing: this node's pods need the keel-cni plugin next to keel \
                 (cargo build --release -p keel-cni)",
                plugin.display()
            );
        }
        let cni = keel_cni::install::InstallSpec {
            binary: plugin,
            bin_dir: cni_dir.join("bin"),
            conf_dir: cni_dir.join("net.d"),
            network: "keel".into(),
            bridge: args.bridge.clone(),
            subnets,
            mtu: None,
            ip_masq: true,
            // The proxy serves hostPorts through its maps (model::hostport): a chained portmap
            // would DNAT the same ports a second time, in netfilter.
            portmap: args.disable_proxy && Path::new(PORTMAP).is_file(),
            conflist_name: "10-keel.conflist".into(),
            ipam_data_dir: Some(cni_dir.join("ipam")),
        };
        let cri = keel_cri::ServerConfig {
            root: root.to_owned(),
            socket: args.cri_socket.clone(),
            registry: args.registry.apply(&config.registry)?,
            cni_conf_dir: cni.conf_dir.clone(),
            cni_bin_dir: cni.bin_dir.clone(),
            metrics_address: None,
            run_dir: args.run_dir.clone(),
            cgroup_parent: args.cgroup_parent.clone(),
            stream_address: keel_cri::streaming::DEFAULT_ADDRESS
                .parse()
                .expect("the default stream address parses"),
        };
        if args.disable_proxy && !cni.portmap {
            tracing::warn!(
                "{PORTMAP} is missing (Debian: containernetworking-plugins) and --disable-proxy \
                 is given: pods' hostPorts are not mapped"
            );
        }
        if cni.subnets.is_empty() {
            agent.pod_network = Some(pod_network(cni.clone(), true));
        }
        (Some(cri), Some(cni))
    } else {
        if args.pod_cidr.is_some() {
            bail!("--pod-cidr configures keel-cni, which an external CRI endpoint does not use");
        }
        (None, None)
    };
    if args.heartbeat_interval == 0 {
        bail!("--heartbeat-interval must be at least 1");
    }
    agent.heartbeat_interval = Duration::from_secs(args.heartbeat_interval);
    agent.node_ip = Some(node_ip);
    agent.pod_log_dir = args.pod_log_dir.clone();
    agent.pod_dir = root.join("agent/pods");
    agent.listen = Some(
        args.agent_listen
            .unwrap_or_else(|| SocketAddr::new(node_ip, 10250)),
    );
    let proxy = if args.disable_proxy {
        None
    } else {
        let cgroup = match &args.proxy_cgroup {
            Some(c) => c.clone(),
            None => keel_proxy::default_cgroup().context(
                "cgroup v2 is not mounted (no cgroup2 in /proc/self/mounts): mount it, pass \
                 --proxy-cgroup, or --disable-proxy",
            )?,
        };
        let tc_interfaces = if !args.proxy_tc_interfaces.is_empty() {
            args.proxy_tc_interfaces.clone()
        } else if node_ip.is_loopback() {
            Vec::new()
        } else {
            vec![link_holding(node_ip)?]
        };
        Some(keel_proxy::ProxyConfig {
            manifests: PathBuf::new(),
            cgroup,
            bpffs_dir: args.bpffs_dir.clone(),
            healthz_addr: args.proxy_healthz_address,
            metrics_addr: None,
            poll_interval: Duration::from_secs(1),
            node: keel_proxy::model::NodeContext {
                node_name: Some(node_name.clone()),
                node_ips: vec![node_ip],
            },
            tc_interfaces,
            tc_netns: None,
        })
    };
    Ok(NodePlan {
        node_name,
        node_ip,
        cri,
        cni,
        agent,
        proxy,
    })
}

/// The name of the interface that holds `ip` (the node's external interface).
fn link_holding(ip: IpAddr) -> anyhow::Result<String> {
    let mut nl = keel_cni::netlink::Netlink::open().context("netlink")?;
    let index = nl
        .link_towards(ip)
        .context("list addresses")?
        .with_context(|| {
            format!(
                "no interface has --node-ip {ip}: add the address, or name the NodePort \
                 interface with --proxy-tc-iface"
            )
        })?;
    nl.links()
        .context("list links")?
        .into_iter()
        .find(|l| l.index == index)
        .map(|l| l.name)
        .with_context(|| format!("the interface of {ip} went away"))
}

/// The CRI endpoint serving until told to stop.
type CriServe = std::pin::Pin<Box<dyn Future<Output = Result<(), keel_cri::ServerError>> + Send>>;

/// The node roles running in this process: the CRI endpoint (when embedded), the agent, the
/// proxy. Containers, pods and the proxy's programs outlive it: a restarted process takes them
/// over.
pub struct NodeRoles {
    cri: Option<CriServe>,
    cri_stop: Option<tokio::sync::oneshot::Sender<()>>,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
    proxy: Option<keel_proxy::Proxy>,
}

impl NodeRoles {
    /// Starts every role of `plan` against the API server of `kubeconfig`; with `join_token`
    /// the agent authenticates as its node with the credential minted from it.
    pub async fn start(
        plan: NodePlan,
        kubeconfig: PathBuf,
        join_token: Option<String>,
    ) -> anyhow::Result<NodeRoles> {
        if let Some(cni) = &plan.cni
            && !cni.subnets.is_empty()
        {
            install_cni(cni)?;
        }
        let (cri_stop, cri_stopped) = tokio::sync::oneshot::channel::<()>();
        let cri = plan.cri.map(|c| {
            let f: CriServe = Box::pin(keel_cri::serve(c, async {
                let _ = cri_stopped.await;
            }));
            f
        });
        let agent = tokio::spawn(run_agent(plan.agent, kubeconfig.clone(), join_token));
        let proxy = match plan.proxy {
            Some(p) => match start_proxy(p, kubeconfig).await {
                Ok(p) => Some(p),
                Err(e) => {
                    // The caller gets no NodeRoles to shut down: stop the agent here.
                    agent.abort();
                    return Err(e.context("start the service proxy (or pass --disable-proxy)"));
                }
            },
            None => None,
        };
        Ok(NodeRoles {
            cri,
            cri_stop: Some(cri_stop),
            agent,
            proxy,
        })
    }

    /// Returns when a role stops (they do not on their own), with what stopped it.
    pub async fn failed(&mut self) -> anyhow::Error {
        let cri = async {
            match self.cri.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = cri => anyhow::anyhow!("CRI endpoint stopped: {r:?}"),
            r = &mut self.agent => match r {
                Ok(Err(e)) => e.context("agent stopped"),
                r => anyhow::anyhow!("agent stopped: {r:?}"),
            },
        }
    }

    /// Stops the agent and the CRI endpoint (removing its socket) and releases the proxy;
    /// containers, pods and the proxy's programs stay.
    pub async fn shutdown(mut self) {
        self.agent.abort();
        if let Some(stop) = self.cri_stop.take() {
            let _ = stop.send(());
        }
        if let Some(f) = self.cri.take()
            && let Err(e) = f.await
        {
            tracing::warn!("CRI endpoint shutdown: {e}");
        }
        if let Some(p) = self.proxy.take() {
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
    }
}

/// Waits until the CRI socket accepts connections (the endpoint started beside us).
async fn wait_for_cri(socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if keel_cri::client::connect(socket).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the CRI endpoint did not come up on {}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent of this node (as the node when given the join secret).
async fn run_agent(
    agent: keel_agent::AgentConfig,
    kubeconfig: PathBuf,
    join_token: Option<String>,
) -> anyhow::Result<()> {
    wait_for_cri(&agent.cri_socket).await?;
    let agent = keel_agent::Agent::from_kubeconfig(agent, &kubeconfig, join_token.as_deref())
        .await
        .context("agent")?;
    agent.run().await.context("agent")
}

/// Starts the proxy against the API server (on a blocking thread: it runs its own runtime).
async fn start_proxy(
    cfg: keel_proxy::ProxyConfig,
    kubeconfig: PathBuf,
) -> anyhow::Result<keel_proxy::Proxy> {
    tokio::task::spawn_blocking(move || {
        let source = keel_proxy::kube_source::ApiSource::Kubeconfig(kubeconfig);
        keel_proxy::Proxy::start_api(cfg, &source)
    })
    .await
    .context("proxy start")?
    .context("proxy")
}
