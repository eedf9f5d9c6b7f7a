//! `keel proxy ...`: the eBPF service proxy. Parses flags into a `keel_proxy::ProxyConfig`;
//! the work is in keel-proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

/// Service load balancing in the kernel (replaces kube-proxy): `keel proxy --kubeconfig PATH`
/// (or, in a pod, the in-cluster config) follows an API server, `keel proxy --manifests PATH` a
/// file; `keel proxy ls` and `keel proxy uninstall` inspect and remove it.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProxyArgs {
    #[command(subcommand)]
    pub command: Option<ProxyCommand>,
    /// Multi-document YAML of Service, EndpointSlice and Pod objects to serve (Pods for their
    /// hostPorts); re-read on change.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the Kubernetes API server whose Services and EndpointSlices to serve, and
    /// this node's Pods' hostPorts (watched; its current context). Without it and --manifests, the in-cluster config is
    /// used when running in a pod (KUBERNETES_SERVICE_HOST set).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The cgroup v2 directory the socket hooks attach to (default: the v2 hierarchy's root,
    /// /sys/fs/cgroup or /sys/fs/cgroup/unified on hybrid hosts).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Where programs' links and maps are pinned (a bpffs; /sys/fs/bpf is mounted if needed).
    #[arg(long, global = true, default_value = keel_proxy::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// /healthz listener (kube-proxy's healthz port).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,
    /// /metrics listener (Prometheus text); "off" disables it.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// How often the manifests file is checked for changes, in milliseconds (--manifests).
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// This node's name, matched against endpoints' nodeName for
    /// internalTrafficPolicy/externalTrafficPolicy=Local and pods' spec.nodeName for hostPorts.
    /// With the API source it defaults to the host name, lowercased (as the kubelet names its
    /// Node); without a name, --manifests serves every Pod's hostPorts in the file.
    #[arg(long, alias = "hostname-override", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's addresses, on which NodePorts and hostPorts (without a hostIP) answer;
    /// repeatable.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<IpAddr>,
    /// Interface whose ingress gets the tc NodePort program (external interface, pod veths);
    /// repeatable.
    #[arg(long = "tc-iface")]
    pub tc_interfaces: Vec<String>,
    /// External interface that also gets the XDP NodePort fast path (native/driver mode, else
    /// generic; the mode is logged); repeatable. It forwards externalTrafficPolicy=Local flows
    /// straight to the backend's interface (FIB lookup + redirect) and passes everything else
    /// (Cluster policy, which needs masquerade; no backends; replies) to the tc program, so give
    /// the interface to --tc-iface too.
    #[arg(long = "xdp-iface")]
    pub xdp_interfaces: Vec<String>,
    /// XDP mode for --xdp-iface: `auto` (native, else generic where the driver refuses),
    /// `native` (fail where refused) or `generic`. On nodes whose external interface is a veth,
    /// generic is the faster (bench proxy (4): 1.12x iptables DNAT against native's 0.88x) and
    /// the safe one for senders with tx checksum offload (CHECKSUM_PARTIAL), which native XDP
    /// cannot see; on a NIC, native is the fast path.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub xdp_mode: keel_proxy::XdpModeChoice,
}

#[derive(clap::Subcommand, Debug)]
pub enum ProxyCommand {
    /// Print services, backends and counters from the pinned maps.
    Ls,
    /// Remove every program, link and pin the proxy installed.
    Uninstall,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(ProxyCommand::Ls) => {
            print!("{}", keel_proxy::ls::list(&args.bpffs_dir)?);
            return Ok(ExitCode::SUCCESS);
        }
        Some(ProxyCommand::Uninstall) => {
            let removed = keel_proxy::uninstall(&args.bpffs_dir)?;
            println!(
                "removed {} pins under {}",
                removed.len(),
                args.bpffs_dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let source = keel_proxy::choose_source(args.manifests, args.kubeconfig, host.as_deref())?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => keel_proxy::default_cgroup().context(
            "cgroup v2 is not mounted (no cgroup2 in /proc/self/mounts); mount it or pass --cgroup",
        )?,
    };
    let metrics_addr = match args.metrics_bind_address.as_str() {
        "off" | "" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--metrics-bind-address {a:?}"))?,
        ),
    };
    let node_name = match (&source, args.node_name) {
        (keel_proxy::Source::Api(_), None) => keel_proxy::kube_source::default_node_name(),
        (_, n) => n,
    };
    let manifests = match &source {
        keel_proxy::Source::Manifests(m) => m.clone(),
        keel_proxy::Source::Api(_) => PathBuf::new(),
    };
    let bpffs_dir = args.bpffs_dir.clone();
    for iface in &args.xdp_interfaces {
        if !args.tc_interfaces.contains(iface) {
            eprintln!(
                "keel proxy: warning: --xdp-iface {iface} without --tc-iface {iface}: its \
                 Cluster-policy NodePort flows, rejects and replies get no tc program"
            );
        }
    }
    let cfg = keel_proxy::ProxyConfig {
        manifests,
        cgroup,
        bpffs_dir: args.bpffs_dir,
        healthz_addr: args.healthz_bind_address,
        metrics_addr,
        poll_interval: Duration::from_millis(args.poll_interval_ms.max(10)),
        node: keel_proxy::model::NodeContext {
            node_name,
            node_ips: args.node_ips,
        },
        tc_interfaces: args.tc_interfaces,
        tc_netns: None,
    };
    let proxy = match &source {
        keel_proxy::Source::Manifests(_) => keel_proxy::Proxy::start(cfg)?,
        keel_proxy::Source::Api(api) => keel_proxy::Proxy::start_api(cfg, api)?,
    };
    for (iface, mode) in
        keel_proxy::install_xdp(&bpffs_dir, &args.xdp_interfaces, args.xdp_mode, None)?
    {
        eprintln!(
            "keel proxy: XDP NodePort program on {iface} ({} mode)",
            mode.as_str()
        );
    }
    eprintln!(
        "keel proxy: serving; /healthz on {}{}",
        proxy.healthz_addr(),
        proxy
            .metrics_addr()
            .map(|a| format!(", /metrics on {a}"))
            .unwrap_or_default()
    );
    wait_for_signal()?;
    // Programs and maps stay installed: traffic keeps flowing until the next start.
    proxy.stop();
    Ok(ExitCode::SUCCESS)
}

fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    Ok(())
}
