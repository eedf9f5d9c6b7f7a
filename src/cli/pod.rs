//! `keel pod ...`: pod sandboxes for people. Parses flags into keel-runtime's PodConfig, calls
//! PodRuntime, prints results. Pods made here get loopback only (no CNI): containers join them
//! with `keel ctr run --pod POD ...`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keel_runtime::pod::{DnsConfig, LoopbackOnly, PodConfig, PodFilter, PodRuntime, PodState};

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Create a pod sandbox (namespaces, hostname, DNS, cgroup); prints its id.
    Run(Box<RunArgs>),
    /// List pods: id, state, name, created.
    #[command(alias = "list", alias = "ps")]
    Ls {
        /// Only ids.
        #[arg(long, short)]
        quiet: bool,
        /// Filters: state=ready|notready, label=K=V, id=PREFIX. Repeatable.
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Print a pod's record, state and containers as JSON.
    Inspect { pod: String },
    /// Stop pods: stop their containers (grace period, then SIGKILL), end their namespaces' use.
    Stop {
        /// Grace period in seconds for the containers.
        #[arg(long, short, default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        pods: Vec<String>,
    },
    /// Remove pods with their containers (ready pods need --force).
    Rm {
        #[arg(long, short)]
        force: bool,
        #[arg(required = true)]
        pods: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// Hostname inside the pod (default: the name, else the id's first 12 characters).
    #[arg(long)]
    pub hostname: Option<String>,
    /// DNS server for /etc/resolv.conf. Repeatable. Without any --dns* flag the node's
    /// resolv.conf is copied.
    #[arg(long)]
    pub dns: Vec<String>,
    /// DNS search domain. Repeatable.
    #[arg(long)]
    pub dns_search: Vec<String>,
    /// resolv.conf option (e.g. ndots:5). Repeatable.
    #[arg(long)]
    pub dns_option: Vec<String>,
    /// Network: "none" (own namespace, loopback only) or "host".
    #[arg(long, default_value = "none")]
    pub net: String,
    /// PID namespace: "container" (each its own), "pod" (shared by the pod) or "host".
    #[arg(long, default_value = "container")]
    pub pid: String,
    /// IPC namespace: "pod" or "host".
    #[arg(long, default_value = "pod")]
    pub ipc: String,
    /// Namespaced sysctl K=V (net.*, kernel.shm*/msg*/sem, fs.mqueue.*). Repeatable.
    #[arg(long)]
    pub sysctl: Vec<String>,
    /// Label K=V. Repeatable.
    #[arg(long, short)]
    pub label: Vec<String>,
    /// Annotation K=V. Repeatable.
    #[arg(long)]
    pub annotation: Vec<String>,
    /// The pod's cgroup, relative to each hierarchy's root (default: keel/pod-<id>).
    #[arg(long)]
    pub cgroup_parent: Option<String>,
}

fn key_values(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<PodConfig> {
        let mut c = PodConfig {
            name: self.name.clone().unwrap_or_default(),
            hostname: self.hostname.clone(),
            sysctls: key_values(&self.sysctl, "sysctl")?,
            labels: key_values(&self.label, "label")?,
            annotations: key_values(&self.annotation, "annotation")?,
            cgroup_parent: self.cgroup_parent.clone(),
            ..Default::default()
        };
        if !(self.dns.is_empty() && self.dns_search.is_empty() && self.dns_option.is_empty()) {
            c.dns = Some(DnsConfig {
                servers: self.dns.clone(),
                searches: self.dns_search.clone(),
                options: self.dns_option.clone(),
            });
        }
        c.host.network = match self.net.as_str() {
            "none" => false,
            "host" => true,
            other => bail!("--net {other:?}: expected none or host"),
        };
        match self.pid.as_str() {
            "container" => {}
            "pod" => c.share_pid = true,
            "host" => c.host.pid = true,
            other => bail!("--pid {other:?}: expected container, pod or host"),
        }
        c.host.ipc = match self.ipc.as_str() {
            "pod" => false,
            "host" => true,
            other => bail!("--ipc {other:?}: expected pod or host"),
        };
        Ok(c)
    }
}

/// The pod runtime beside `keel ctr`'s container runtime (same root and run dir).
pub fn pods(root: &Path) -> anyhow::Result<PodRuntime> {
    Ok(PodRuntime::open_default(super::ctr::runtime(root)?)?)
}

pub fn run(root: &Path, _config: &Config, cmd: PodCommand) -> anyhow::Result<ExitCode> {
    let pods = pods(root)?;
    match cmd {
        PodCommand::Run(args) => {
            let id = pods.run(&args.config()?, &LoopbackOnly)?;
            println!("{id}");
        }
        PodCommand::Ls { quiet, filters } => ls(&pods, quiet, &filters)?,
        PodCommand::Inspect { pod } => {
            let id = pods.resolve(&pod)?;
            let info = pods.status(&id)?;
            let containers: Vec<String> = pods
                .pod_containers(&id)?
                .into_iter()
                .map(|c| c.record.id)
                .collect();
            let out = serde_json::json!({
                "record": info.record,
                "state": info.state,
                "containers": containers,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        PodCommand::Stop { time, pods: names } => {
            for p in names {
                let id = pods.resolve(&p)?;
                pods.stop(&id, Duration::from_secs(time), &LoopbackOnly)?;
                println!("{id}");
            }
        }
        PodCommand::Rm { force, pods: names } => {
            for p in names {
                let id = pods.resolve(&p)?;
                let state = pods.status(&id)?.state;
                if state == PodState::Ready && !force {
                    bail!("pod {id} is ready: stop it first or use --force");
                }
                pods.remove(&id, &LoopbackOnly)?;
                println!("{id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(pods: &PodRuntime, quiet: bool, filters: &[String]) -> anyhow::Result<()> {
    let mut filter = PodFilter::default();
    for f in filters {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("filter {f:?}: expected KEY=VALUE"))?;
        match k {
            "state" => {
                filter.state = Some(match v {
                    "ready" => PodState::Ready,
                    "notready" => PodState::NotReady,
                    "creating" => PodState::Creating,
                    _ => bail!("filter state={v}: expected ready, notready or creating"),
                })
            }
            "label" => {
                let (lk, lv) = v.split_once('=').unwrap_or((v, ""));
                filter.labels.insert(lk.to_string(), lv.to_string());
            }
            "id" => filter.id_prefix = Some(v.to_string()),
            _ => bail!("unknown filter {k:?} (state, label, id)"),
        }
    }
    let list = pods.list(&filter)?;
    if !quiet {
        println!("{:<14} {:<10} {:<24} CREATED", "ID", "STATE", "NAME");
    }
    for p in list {
        if quiet {
            println!("{}", p.record.id);
            continue;
        }
        println!(
            "{:<14} {:<10} {:<24} {}",
            &p.record.id[..12],
            p.state.to_string(),
            p.record.config.name,
            p.record.created_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(())
}
