//! `keel cri`: the CRI endpoint kubelet and crictl talk to. Parses flags into a
//! `keel_cri::ServerConfig`, runs the server until SIGTERM or SIGINT, and exits after it removed
//! its socket. The work is in keel-cri.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::image::RegistryFlags;
use crate::config::Config;

/// `keel cri` flags. Registry settings come from the config file's `[registry]` table, with the
/// registry flags added on top.
#[derive(clap::Args, Debug)]
pub struct CriArgs {
    /// Unix socket to serve CRI on (kubelet:
    /// `--container-runtime-endpoint=unix:///run/keel/keel.sock`). Its directory is created;
    /// a stale socket is replaced, a live one refused. Mode 0660.
    #[arg(long, value_name = "PATH", default_value = keel_cri::server::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub registry: RegistryFlags,
    /// CNI conf dir whose first config (by name) decides the NetworkReady condition.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// CNI bin dir holding the plugins the config names.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics; empty disables. The default is
    /// containerd's documented metrics address, so existing node scrape configs find it;
    /// kube-proxy's 10249 is left to `keel proxy`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1338")]
    pub metrics_address: String,
    /// Run dir for container state (tmpfs); pod namespace pins go beside it
    /// (`/run/keel/pods`). Default: $KEEL_RUN_DIR, else /run/keel/containers.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// cgroup parent of pods whose sandbox config names none (kubelet always names one).
    #[arg(long, value_name = "PATH", default_value = "keel")]
    pub cgroup_parent: String,
    /// Serve the streaming server (the URLs Exec, Attach and PortForward answer; WebSocket, no
    /// SPDY)
    /// on IP:PORT; port 0 picks a free one. Loopback by default: kubelet connects from the node.
    #[arg(long, value_name = "ADDR", default_value = keel_cri::streaming::DEFAULT_ADDRESS)]
    pub stream_address: SocketAddr,
}

pub fn run(root: &Path, config: &Config, args: CriArgs) -> anyhow::Result<ExitCode> {
    let registry = args.registry.apply(&config.registry)?;
    let metrics_address = parse_metrics_address(&args.metrics_address)?;
    let server = keel_cri::ServerConfig {
        root: root.to_owned(),
        socket: args.socket,
        registry,
        cni_conf_dir: args.cni_conf_dir,
        cni_bin_dir: args.cni_bin_dir,
        metrics_address,
        run_dir: args
            .run_dir
            .or_else(|| std::env::var_os("KEEL_RUN_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/run/keel/containers")),
        cgroup_parent: args.cgroup_parent,
        stream_address: args.stream_address,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        // Installed before the socket exists, so a signal right after start is not lost.
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        };
        keel_cri::serve(server, shutdown).await.context("keel cri")
    })?;
    Ok(ExitCode::SUCCESS)
}

fn parse_metrics_address(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("--metrics-address {s:?}: expected IP:PORT, or empty to disable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_address_is_ip_port_or_empty() {
        assert_eq!(parse_metrics_address("").unwrap(), None);
        assert_eq!(
            parse_metrics_address("127.0.0.1:1338").unwrap(),
            Some("127.0.0.1:1338".parse().unwrap())
        );
        assert!(parse_metrics_address("localhost:1338").is_err());
    }
}
