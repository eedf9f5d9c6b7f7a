//! `keel ctr ...`: containers for people. Parses flags into keel-runtime's ContainerConfig,
//! calls ContainerRuntime, prints results. `run` without `-d` follows the container's log to
//! this terminal and exits with the container's exit code.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keel_runtime::container::crilog::Stream;
use keel_runtime::container::{
    ContainerConfig, ContainerRuntime, ImageInfo, ListFilter, MountConfig, MountKind,
    NamespaceMode, RuntimeOptions, SeccompProfile, Status,
};
use keel_runtime::image::ImageStore;

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum CtrCommand {
    /// Create and start a container; without -d, print its output and exit with its code.
    Run(Box<RunArgs>),
    /// Create a container (not started); prints its id.
    Create(Box<CreateArgs>),
    /// Start created containers.
    Start {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Run a command in a running container; exits with the command's exit code.
    /// `-it` gives an interactive shell: `keel ctr exec -it web sh`.
    Exec {
        /// Seconds before the command is killed (0: no limit; not with -i or -t).
        #[arg(long, default_value_t = 0, conflicts_with_all = ["interactive", "tty"])]
        timeout: u64,
        /// Pass this terminal's stdin to the command.
        #[arg(long, short)]
        interactive: bool,
        /// Run the command on a terminal of its own (this terminal in raw mode relays it and
        /// its size).
        #[arg(long, short)]
        tty: bool,
        container: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Attach this terminal to a running container created with -i or -t: its output from
    /// now on, this terminal's input (and size, with -t); returns when its output ends.
    Attach { container: String },
    /// Print a container's log.
    Logs {
        /// Keep printing until the container exits.
        #[arg(long, short)]
        follow: bool,
        container: String,
    },
    /// List containers: id, image, status, name.
    #[command(alias = "list", alias = "ps")]
    Ls {
        /// Include exited containers.
        #[arg(long, short)]
        all: bool,
        /// Only ids.
        #[arg(long, short)]
        quiet: bool,
        /// Filters: status=running|created|exited, label=K=V, id=PREFIX. Repeatable.
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Print a container's record and state as JSON.
    Inspect { container: String },
    /// Stop containers: stop signal, then SIGKILL after the grace period.
    Stop {
        /// Grace period in seconds.
        #[arg(long, short, default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers (running ones need --force).
    Rm {
        #[arg(long, short)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Print CPU, memory and pids usage.
    Stats {
        #[arg(required = true)]
        containers: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Detach: print the id and return once started.
    #[arg(long, short)]
    pub detach: bool,
    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// Environment entry KEY=VALUE. Repeatable.
    #[arg(long, short)]
    pub env: Vec<String>,
    /// User: name, uid, name:group or uid:gid.
    #[arg(long, short)]
    pub user: Option<String>,
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Memory limit: bytes or with k/m/g suffix.
    #[arg(long, short)]
    pub memory: Option<String>,
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// CPUs as a fraction (1.5 = 150ms per 100ms period).
    #[arg(long)]
    pub cpus: Option<f64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub pids_limit: Option<i64>,
    #[arg(long)]
    pub cap_add: Vec<String>,
    #[arg(long)]
    pub cap_drop: Vec<String>,
    #[arg(long)]
    pub privileged: bool,
    /// Read-only root filesystem.
    #[arg(long)]
    pub read_only: bool,
    #[arg(long)]
    pub no_new_privileges: bool,
    /// runtime-default, unconfined, or a path to a JSON profile.
    #[arg(long, default_value = "runtime-default")]
    pub seccomp: String,
    /// Network: "none" (own namespace, loopback only) or "host".
    #[arg(long, default_value = "none")]
    pub net: String,
    /// Bind mount SRC:DST[:ro]. Repeatable.
    #[arg(long, short)]
    pub volume: Vec<String>,
    /// tmpfs at DST. Repeatable.
    #[arg(long)]
    pub tmpfs: Vec<String>,
    /// Label K=V. Repeatable.
    #[arg(long, short)]
    pub label: Vec<String>,
    /// Keep the container's stdin open (`keel ctr run -i` passes this terminal's; `keel ctr
    /// attach` writes it later).
    #[arg(long, short)]
    pub interactive: bool,
    /// Run the container on a terminal of its own (`-it` for a shell).
    #[arg(long, short)]
    pub tty: bool,
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long)]
    pub oom_score_adj: Option<i32>,
    /// cgroup parent, relative to each hierarchy's root (default: keel).
    #[arg(long)]
    pub cgroup_parent: Option<String>,
    /// Signal `stop` sends first (default: the image's, else SIGTERM).
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Put the container into this pod sandbox (id, name or id prefix): it joins the pod's
    /// namespaces and cgroup and sees its hostname, /etc/hosts and /etc/resolv.conf.
    #[arg(long)]
    pub pod: Option<String>,
    /// Image reference or id.
    pub image: String,
    /// Command and arguments (replace the image's cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn parse_size(s: &str) -> anyhow::Result<i64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1i64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: i64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    Ok(n * mult)
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

impl CreateArgs {
    fn config(&self) -> anyhow::Result<ContainerConfig> {
        let mut c = ContainerConfig {
            name: self.name.clone().unwrap_or_default(),
            env: self.env.clone(),
            user: self.user.clone(),
            working_dir: self.workdir.clone(),
            hostname: self.hostname.clone(),
            oom_score_adj: self.oom_score_adj,
            cgroup_parent: self.cgroup_parent.clone(),
            stop_signal: self.stop_signal.clone(),
            stdin: self.interactive,
            tty: self.tty,
            labels: key_values(&self.label, "label")?,
            ..Default::default()
        };
        match &self.entrypoint {
            Some(e) => {
                c.command = vec![e.clone()];
                c.args = self.command.clone();
            }
            // Like `docker run IMAGE CMD...`: CMD replaces the image's cmd, the entrypoint stays.
            None => c.args = self.command.clone(),
        }
        c.resources.memory_limit = self.memory.as_deref().map(parse_size).transpose()?;
        c.resources.cpu_shares = self.cpu_shares;
        if let Some(cpus) = self.cpus {
            c.resources.cpu_period = Some(100_000);
            c.resources.cpu_quota = Some((cpus * 100_000.0) as i64);
        }
        c.resources.cpuset_cpus = self.cpuset_cpus.clone();
        c.resources.pids_limit = self.pids_limit;
        let sec = &mut c.security;
        sec.cap_add = self.cap_add.clone();
        sec.cap_drop = self.cap_drop.clone();
        sec.privileged = self.privileged;
        sec.readonly_rootfs = self.read_only;
        sec.no_new_privs = self.no_new_privileges;
        sec.seccomp = match self.seccomp.as_str() {
            "runtime-default" | "default" => SeccompProfile::RuntimeDefault,
            "unconfined" => SeccompProfile::Unconfined,
            path => SeccompProfile::Localhost(PathBuf::from(path)),
        };
        c.namespaces.network = match self.net.as_str() {
            "none" => NamespaceMode::Private,
            "host" => NamespaceMode::Host,
            other => bail!("--net {other:?}: expected none or host"),
        };
        for v in &self.volume {
            let parts: Vec<&str> = v.split(':').collect();
            let (src, dst, ro) = match parts.as_slice() {
                [s, d] => (s, d, false),
                [s, d, "ro"] => (s, d, true),
                [s, d, "rw"] => (s, d, false),
                _ => bail!("--volume {v:?}: expected SRC:DST[:ro]"),
            };
            c.mounts.push(MountConfig {
                kind: MountKind::Bind,
                source: std::fs::canonicalize(src).with_context(|| format!("volume {src}"))?,
                destination: dst.to_string(),
                readonly: ro,
                ..Default::default()
            });
        }
        for t in &self.tmpfs {
            c.mounts.push(MountConfig {
                kind: MountKind::Tmpfs,
                destination: t.clone(),
                ..Default::default()
            });
        }
        Ok(c)
    }
}

pub(crate) fn runtime(root: &Path) -> anyhow::Result<ContainerRuntime> {
    let mut opts = RuntimeOptions::new(root);
    if let Some(run) = std::env::var_os("KEEL_RUN_DIR") {
        opts.run_dir = PathBuf::from(run);
    }
    Ok(ContainerRuntime::open(opts)?)
}

fn create(
    root: &Path,
    config: &Config,
    args: &CreateArgs,
) -> anyhow::Result<(ContainerRuntime, String)> {
    let rt = runtime(root)?;
    let cfg = args.config()?;
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    let image = tokio_rt.block_on(async {
        let store = ImageStore::open(root, config.registry.clone())?;
        anyhow::Ok(ImageInfo::resolve(&store, &args.image).await?)
    })?;
    drop(tokio_rt);
    let id = match &args.pod {
        Some(pod) => {
            let pods = super::pod::pods(root)?;
            pods.create_container(&pods.resolve(pod)?, &cfg, &image)?
        }
        None => rt.create(&cfg, &image)?,
    };
    Ok((rt, id))
}

pub fn run(root: &Path, config: &Config, cmd: CtrCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CtrCommand::Run(args) => run_container(root, config, *args),
        CtrCommand::Create(args) => {
            let (_, id) = create(root, config, &args)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Start { containers } => {
            let rt = runtime(root)?;
            for c in containers {
                rt.start(&rt.resolve(&c)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Exec {
            timeout,
            interactive,
            tty,
            container,
            command,
        } => {
            let rt = runtime(root)?;
            let id = rt.resolve(&container)?;
            if interactive || tty {
                let code = crate::cli::ctr_exec::interactive(&rt, &id, &command, interactive, tty)?;
                return Ok(ExitCode::from(code.clamp(0, 255) as u8));
            }
            let t = (timeout > 0).then(|| Duration::from_secs(timeout));
            let r = rt.exec_sync(&id, &command, t)?;
            std::io::stdout().write_all(&r.stdout)?;
            std::io::stderr().write_all(&r.stderr)?;
            if r.timed_out {
                eprintln!("keel: exec timed out after {timeout}s");
            }
            Ok(ExitCode::from(r.exit_code.clamp(0, 255) as u8))
        }
        CtrCommand::Attach { container } => {
            let rt = runtime(root)?;
            let id = rt.resolve(&container)?;
            let cfg = rt.status(&id)?.record.config;
            if cfg.tty {
                block_winch();
            }
            let sock = rt.attach(&id)?;
            crate::cli::ctr_exec::relay_attached(sock, cfg.stdin, cfg.tty)?;
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Logs { follow, container } => {
            let rt = runtime(root)?;
            let id = rt.resolve(&container)?;
            print_log(&rt, &id, follow)?;
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Ls {
            all,
            quiet,
            filters,
        } => ls(&runtime(root)?, all, quiet, &filters),
        CtrCommand::Inspect { container } => {
            let rt = runtime(root)?;
            let info = rt.status(&rt.resolve(&container)?)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Stop { time, containers } => {
            let rt = runtime(root)?;
            for c in containers {
                let id = rt.resolve(&c)?;
                rt.stop(&id, Duration::from_secs(time))?;
                println!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Rm { force, containers } => {
            let rt = runtime(root)?;
            for c in containers {
                let id = rt.resolve(&c)?;
                rt.remove(&id, force)?;
                println!("{id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        CtrCommand::Stats { containers } => {
            let rt = runtime(root)?;
            println!(
                "{:<14} {:>14} {:>14} {:>6}",
                "ID", "CPU(ns)", "MEM(ws)", "PIDS"
            );
            for c in containers {
                let s = rt.stats(&rt.resolve(&c)?)?;
                println!(
                    "{:<14} {:>14} {:>14} {:>6}",
                    &s.id[..12.min(s.id.len())],
                    s.usage.cpu_usage_ns,
                    s.usage.memory_working_set_bytes,
                    s.usage.pids
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_log(rt: &ContainerRuntime, id: &str, follow: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    rt.read_log(id, follow, &mut |l| {
        let w: &mut dyn Write = match l.stream {
            Stream::Stdout => &mut out,
            Stream::Stderr => &mut err,
        };
        let _ = w.write_all(l.msg.as_bytes());
        if !l.partial {
            let _ = w.write_all(b"\n");
        }
        let _ = w.flush();
        true
    })?;
    Ok(())
}

fn run_container(root: &Path, config: &Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    let live = !args.detach && (args.create.interactive || args.create.tty);
    if live && args.create.tty {
        block_winch();
    }
    let (rt, id) = create(root, config, &args.create)?;
    // Attached before the start, so no output is missed.
    let attached = if live {
        match rt.attach(&id) {
            Ok(s) => Some(s),
            Err(e) => {
                let _ = rt.remove(&id, true);
                return Err(e.into());
            }
        }
    } else {
        None
    };
    if let Err(e) = rt.start(&id) {
        if args.rm {
            let _ = rt.remove(&id, true);
        }
        return Err(e.into());
    }
    if args.detach {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    match attached {
        Some(sock) => {
            crate::cli::ctr_exec::relay_attached(sock, args.create.interactive, args.create.tty)?
        }
        None => print_log(&rt, &id, true)?,
    }
    let exit = rt
        .wait(&id, None)?
        .with_context(|| format!("container {id}: no exit status"))?;
    if args.rm {
        rt.remove(&id, true)?;
    }
    if exit.oom_killed {
        eprintln!("keel: container {id} was OOM-killed");
    }
    Ok(ExitCode::from(exit.exit_code.clamp(0, 255) as u8))
}

fn ls(
    rt: &ContainerRuntime,
    all: bool,
    quiet: bool,
    filters: &[String],
) -> anyhow::Result<ExitCode> {
    let mut filter = ListFilter::default();
    for f in filters {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("filter {f:?}: expected KEY=VALUE"))?;
        match k {
            "status" => {
                filter.status = Some(match v {
                    "created" => Status::Created,
                    "running" => Status::Running,
                    "exited" => Status::Exited,
                    "unknown" => Status::Unknown,
                    _ => bail!("filter status={v}: expected created, running, exited or unknown"),
                })
            }
            "label" => {
                let (lk, lv) = v.split_once('=').unwrap_or((v, ""));
                filter.labels.insert(lk.to_string(), lv.to_string());
            }
            "id" => filter.id_prefix = Some(v.to_string()),
            _ => bail!("unknown filter {k:?} (status, label, id)"),
        }
    }
    let list = rt.list(&filter)?;
    if !quiet {
        println!("{:<14} {:<36} {:<22} NAME", "ID", "IMAGE", "STATUS");
    }
    for c in list {
        if !all && filter.status.is_none() && c.status == Status::Exited {
            continue;
        }
        if quiet {
            println!("{}", c.record.id);
            continue;
        }
        let status = match &c.exit {
            Some(e) if e.oom_killed => format!("exited ({}, oom)", e.exit_code),
            Some(e) => format!("exited ({})", e.exit_code),
            None => c.status.to_string(),
        };
        println!(
            "{:<14} {:<36} {:<22} {}",
            &c.record.id[..12],
            c.record.image_ref,
            status,
            c.record.config.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Blocks SIGWINCH in this (still single-threaded) process, so the relay's watcher thread is
/// the one to take it.
fn block_winch() {
    let _ = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGWINCH).thread_block();
}
