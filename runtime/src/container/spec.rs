//! The pure translation: image config + [`ContainerConfig`] + facts about the node
//! ([`SpecContext`]) -> OCI runtime spec. Defaults follow containerd's CRI plugin (default
//! capability set, masked and read-only paths, device rules, mounts), so workloads see what
//! they would see under containerd.
//!
//! It must not touch the system: everything it needs from the host or the rootfs (passwd and
//! group files, current oom_score_adj, hugepage sizes, host devices, Localhost seccomp profile)
//! is read by the caller and passed in the context, so every rule here is unit-tested.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use super::config::{
    ContainerConfig, MountKind, NamespaceMode, Propagation, Resources, SeccompProfile,
};
use super::seccomp::{self, SeccompError};
use super::user::{self, UserError};

/// Why a spec could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command: neither the container config nor the image gives one")]
    NoCommand,
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("invalid mount {destination:?}: {reason}")]
    InvalidMount { destination: String, reason: String },
    #[error("invalid environment entry {0:?}: expected KEY=VALUE")]
    InvalidEnv(String),
    #[error("seccomp profile is Localhost but no profile was loaded")]
    MissingLocalhostProfile,
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("building the OCI spec: {0}")]
    Oci(String),
}

impl From<oci_spec::OciSpecError> for SpecError {
    fn from(e: oci_spec::OciSpecError) -> Self {
        SpecError::Oci(e.to_string())
    }
}

/// Facts the translation needs that come from the node or the rootfs.
#[derive(Clone, Debug, Default)]
pub struct SpecContext {
    pub id: String,
    /// Absolute path of the mounted rootfs.
    pub rootfs: PathBuf,
    /// cgroups path for the spec (`/<parent>/<id>`).
    pub cgroups_path: PathBuf,
    /// Contents of the rootfs's /etc/passwd and /etc/group, when present.
    pub passwd: Option<String>,
    pub group: Option<String>,
    /// The runtime's own oom_score_adj: the container's is never lower.
    pub current_oom_score_adj: i32,
    /// Hugepage sizes the host has (`2MB`, `1GB`).
    pub hugepage_sizes: Vec<String>,
    /// The node runs the unified (v2) hierarchy: containers get a cgroup namespace.
    pub cgroup_v2: bool,
    /// Host devices for privileged containers.
    pub host_devices: Vec<LinuxDevice>,
    /// The parsed Localhost seccomp profile when the config asks for one.
    pub localhost_seccomp: Option<LinuxSeccomp>,
}

/// containerd's default capability set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability the OCI spec knows.
pub const ALL_CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETGID",
    "SETFCAP",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// containerd / moby masked paths.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd / moby read-only paths.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Parses a capability name (`NET_ADMIN`, `CAP_NET_ADMIN`, any case).
pub fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| SpecError::UnknownCapability(name.to_string()))
}

fn cap_set(names: &[&str]) -> Result<HashSet<Capability>, SpecError> {
    names.iter().map(|n| parse_capability(n)).collect()
}

/// The capability set: default (or all when privileged), then `ALL` adds/drops, then the named
/// adds, then the named drops (containerd's order).
pub fn capabilities(cfg: &ContainerConfig) -> Result<HashSet<Capability>, SpecError> {
    let sec = &cfg.security;
    if sec.privileged {
        return cap_set(ALL_CAPABILITIES);
    }
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    let mut caps = cap_set(DEFAULT_CAPABILITIES)?;
    if sec.cap_add.iter().any(is_all) {
        caps = cap_set(ALL_CAPABILITIES)?;
    }
    if sec.cap_drop.iter().any(is_all) {
        caps.clear();
    }
    for n in sec.cap_add.iter().filter(|n| !is_all(n)) {
        caps.insert(parse_capability(n)?);
    }
    for n in sec.cap_drop.iter().filter(|n| !is_all(n)) {
        caps.remove(&parse_capability(n)?);
    }
    Ok(caps)
}

/// The process arguments (CRI rules: `command` replaces the entrypoint, `args` the cmd; the
/// image's cmd is used only when neither is given).
pub fn process_args(
    image: &ImageConfiguration,
    cfg: &ContainerConfig,
) -> Result<Vec<String>, SpecError> {
    let img = image.config().as_ref();
    let mut command = cfg.command.clone();
    let mut args = cfg.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = img.and_then(|c| c.cmd().clone()).unwrap_or_default();
        }
        command = img.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    }
    command.extend(args);
    if command.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(command)
}

/// The environment: the image's, PATH if missing, then the config's entries (replacing by
/// key), then HOME from passwd if still missing.
pub fn environment(
    image: &ImageConfiguration,
    cfg: &ContainerConfig,
    home: Option<&str>,
    hostname: Option<&str>,
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<String> = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let key = |e: &str| e.split_once('=').map(|(k, _)| k.to_string());
    let set = |env: &mut Vec<String>, entry: String| {
        let k = key(&entry);
        env.retain(|e| key(e) != k);
        env.push(entry);
    };
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if let Some(h) = hostname {
        set(&mut env, format!("HOSTNAME={h}"));
    }
    for e in &cfg.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(SpecError::InvalidEnv(e.clone()));
        }
        set(&mut env, e.clone());
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            home.filter(|h| !h.is_empty()).unwrap_or("/")
        ));
    }
    Ok(env)
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn default_mounts(cfg: &ContainerConfig) -> Result<Vec<Mount>, SpecError> {
    let privileged = cfg.security.privileged;
    let ro = if privileged { "rw" } else { "ro" };
    let mut m = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
    ];
    if cfg.namespaces.ipc == NamespaceMode::Host {
        m.push(mount(
            "/dev/mqueue",
            "bind",
            "/dev/mqueue",
            &["rbind", "nosuid", "noexec", "nodev"],
        )?);
    } else {
        m.push(mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?);
    }
    // A fresh sysfs needs a network namespace of the container's own; otherwise bind the host's.
    if cfg.namespaces.network == NamespaceMode::Host {
        m.push(mount(
            "/sys",
            "bind",
            "/sys",
            &["rbind", "nosuid", "noexec", "nodev", ro],
        )?);
    } else {
        m.push(mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", ro],
        )?);
        if super::cgroups::is_v2() || !matches!(cfg.namespaces.pid, NamespaceMode::Join(_)) {
            m.push(mount(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                &["nosuid", "noexec", "nodev", "relatime", ro],
            )?);
        } else {
            // libcontainer 0.7 emulates a cgroup v1 mount from the host's /proc/<ppid>/cgroup,
            // and an init that joined an existing PID namespace (a pod's shared one) has no
            // parent there, so it reads /proc/<its own pid in the pod> of the host: another
            // process, or none (create fails). Such containers get an empty read-only
            // /sys/fs/cgroup instead of that emulation.
            m.push(mount(
                "/sys/fs/cgroup",
                "tmpfs",
                "tmpfs",
                &["nosuid", "noexec", "nodev", "mode=755", "size=4k", ro],
            )?);
        }
    }
    Ok(m)
}

fn user_mounts(cfg: &ContainerConfig) -> Result<Vec<Mount>, SpecError> {
    let mut mounts = cfg.mounts.clone();
    // Parents before children.
    mounts.sort_by_key(|m| m.destination.trim_end_matches('/').matches('/').count());
    let mut out = Vec::new();
    for m in &mounts {
        if !m.destination.starts_with('/') {
            return Err(SpecError::InvalidMount {
                destination: m.destination.clone(),
                reason: "destination must be absolute".into(),
            });
        }
        let mut opts: Vec<String> = Vec::new();
        let (typ, source) = match m.kind {
            MountKind::Bind => {
                if !m.source.is_absolute() {
                    return Err(SpecError::InvalidMount {
                        destination: m.destination.clone(),
                        reason: format!("source {} must be absolute", m.source.display()),
                    });
                }
                opts.push("rbind".into());
                opts.push(
                    match m.propagation {
                        Propagation::Private => "rprivate",
                        Propagation::HostToContainer => "rslave",
                        Propagation::Bidirectional => "rshared",
                    }
                    .into(),
                );
                ("bind", m.source.display().to_string())
            }
            MountKind::Tmpfs => {
                opts.extend(["nosuid".to_string(), "nodev".to_string()]);
                ("tmpfs", "tmpfs".to_string())
            }
        };
        opts.push(if m.readonly { "ro" } else { "rw" }.into());
        opts.extend(m.options.iter().cloned());
        out.push(
            MountBuilder::default()
                .destination(&m.destination)
                .typ(typ)
                .source(source)
                .options(opts)
                .build()?,
        );
    }
    Ok(out)
}

/// Default mounts not shadowed by a user mount, then the user mounts.
pub fn mounts(cfg: &ContainerConfig) -> Result<Vec<Mount>, SpecError> {
    let user = user_mounts(cfg)?;
    let shadowed = |dest: &std::path::Path| {
        user.iter()
            .any(|u| dest == u.destination() || dest.starts_with(u.destination()))
    };
    let mut all: Vec<Mount> = default_mounts(cfg)?
        .into_iter()
        .filter(|m| !shadowed(m.destination()))
        .collect();
    all.extend(user);
    Ok(all)
}

/// The device cgroup rules of the spec. libcgroups (v1 and v2 alike) appends its default allow
/// list to whatever the spec says: `c *:* m`, `b *:* m`, null, zero, full, random, urandom,
/// tty, console, ptmx, pts and tun. An ordinary container therefore needs only the leading
/// deny-all; repeating the allow list here made every create write each rule twice (one open +
/// write per rule on v1, ~30% of the create under strace).
fn device_rules(privileged: bool) -> Result<Vec<LinuxDeviceCgroup>, SpecError> {
    let all = LinuxDeviceCgroupBuilder::default()
        .allow(privileged)
        .access("rwm")
        .build()?;
    Ok(vec![all])
}

/// The cgroup limits for `r` (and the device rules for a privileged or ordinary container).
pub fn linux_resources(
    r: &Resources,
    privileged: bool,
    ctx: &SpecContext,
) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    let mut b = LinuxResourcesBuilder::default().devices(device_rules(privileged)?);
    if r.memory_limit.is_some() {
        let mut m = LinuxMemoryBuilder::default();
        if let Some(l) = r.memory_limit {
            m = m.limit(l);
        }
        b = b.memory(m.build()?);
    }
    if r.cpu_shares.is_some()
        || r.cpu_quota.is_some()
        || r.cpu_period.is_some()
        || r.cpuset_cpus.is_some()
        || r.cpuset_mems.is_some()
    {
        let mut c = LinuxCpuBuilder::default();
        if let Some(v) = r.cpu_shares {
            c = c.shares(v);
        }
        if let Some(v) = r.cpu_quota {
            c = c.quota(v);
        }
        if let Some(v) = r.cpu_period {
            c = c.period(v);
        }
        if let Some(v) = &r.cpuset_cpus {
            c = c.cpus(v.clone());
        }
        if let Some(v) = &r.cpuset_mems {
            c = c.mems(v.clone());
        }
        b = b.cpu(c.build()?);
    }
    if let Some(l) = r.pids_limit {
        b = b.pids(LinuxPidsBuilder::default().limit(l).build()?);
    }
    let huge: Vec<_> = r
        .hugepage_limits
        .iter()
        .filter(|(size, _)| ctx.hugepage_sizes.contains(size))
        .map(|(size, limit)| {
            LinuxHugepageLimitBuilder::default()
                .page_size(size.clone())
                .limit(*limit as i64)
                .build()
        })
        .collect::<Result<_, _>>()?;
    if !huge.is_empty() {
        b = b.hugepage_limits(huge);
    }
    Ok(b.build()?)
}

fn namespace(typ: LinuxNamespaceType, path: Option<&PathBuf>) -> Result<LinuxNamespace, SpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p.clone());
    }
    Ok(b.build()?)
}

fn namespaces(cfg: &ContainerConfig, ctx: &SpecContext) -> Result<Vec<LinuxNamespace>, SpecError> {
    let ns = &cfg.namespaces;
    let mut out = vec![namespace(LinuxNamespaceType::Mount, None)?];
    for (typ, mode) in [
        (LinuxNamespaceType::Pid, &ns.pid),
        (LinuxNamespaceType::Ipc, &ns.ipc),
        (LinuxNamespaceType::Uts, &ns.uts),
        (LinuxNamespaceType::Network, &ns.network),
    ] {
        match mode {
            NamespaceMode::Private => out.push(namespace(typ, None)?),
            NamespaceMode::Join(p) => out.push(namespace(typ, Some(p))?),
            NamespaceMode::Host => {}
        }
    }
    if ctx.cgroup_v2 && !cfg.security.privileged {
        out.push(namespace(LinuxNamespaceType::Cgroup, None)?);
    }
    Ok(out)
}

/// Builds the OCI spec. The seccomp profile is in the OCI meaning; see
/// [`seccomp::for_libcontainer`] for what the monitor hands to libcontainer.
pub fn build_spec(
    image: &ImageConfiguration,
    cfg: &ContainerConfig,
    ctx: &SpecContext,
) -> Result<Spec, SpecError> {
    let img = image.config().as_ref();
    let sec = &cfg.security;

    let user_spec = cfg
        .user
        .clone()
        .or_else(|| img.and_then(|c| c.user().clone()))
        .unwrap_or_default();
    let resolved = user::resolve(&user_spec, ctx.passwd.as_deref(), ctx.group.as_deref())?;
    let mut additional = resolved.additional_gids.clone();
    additional.extend(cfg.supplementary_groups.iter().copied());
    additional.sort_unstable();
    additional.dedup();
    additional.retain(|g| *g != resolved.gid);

    let hostname = match cfg.namespaces.uts {
        NamespaceMode::Private => Some(
            cfg.hostname
                .clone()
                .unwrap_or_else(|| ctx.id.chars().take(12).collect()),
        ),
        _ => None,
    };
    let mut env = environment(image, cfg, resolved.home.as_deref(), hostname.as_deref())?;
    if cfg.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let cwd = cfg
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| {
            img.and_then(|c| c.working_dir().clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".to_string());

    let caps = capabilities(cfg)?;
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()?;

    let mut process = ProcessBuilder::default()
        .terminal(cfg.tty)
        .user(
            UserBuilder::default()
                .uid(resolved.uid)
                .gid(resolved.gid)
                .additional_gids(additional)
                .build()?,
        )
        .args(process_args(image, cfg)?)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .build()?;
    process.set_rlimits(None);
    // libcontainer 0.7 loads the seccomp filter after dropping capabilities whenever the
    // field is present, even `false`; without no_new_privs that load fails. Absent = false.
    process.set_no_new_privileges(sec.no_new_privs.then_some(true));
    if let Some(adj) = cfg.oom_score_adj {
        process.set_oom_score_adj(Some(adj.max(ctx.current_oom_score_adj)));
    }

    let seccomp = if sec.privileged {
        None
    } else {
        match &sec.seccomp {
            SeccompProfile::Unconfined => None,
            SeccompProfile::RuntimeDefault => Some(seccomp::default_profile(&caps)?),
            SeccompProfile::Localhost(_) => Some(
                ctx.localhost_seccomp
                    .clone()
                    .ok_or(SpecError::MissingLocalhostProfile)?,
            ),
        }
    };

    let all_mounts = mounts(cfg)?;
    let propagation = if cfg
        .mounts
        .iter()
        .any(|m| m.propagation == Propagation::Bidirectional)
    {
        Some("shared")
    } else if cfg
        .mounts
        .iter()
        .any(|m| m.propagation == Propagation::HostToContainer)
    {
        Some("slave")
    } else {
        // libcontainer's default (rslave, as runc's).
        None
    };

    let (masked, readonly): (Vec<String>, Vec<String>) = if sec.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            sec.masked_paths
                .clone()
                .unwrap_or_else(|| DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect()),
            sec.readonly_paths.clone().unwrap_or_else(|| {
                DEFAULT_READONLY_PATHS
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
        )
    };

    let mut linux = LinuxBuilder::default()
        .cgroups_path(ctx.cgroups_path.clone())
        .namespaces(namespaces(cfg, ctx)?)
        .resources(linux_resources(&cfg.resources, sec.privileged, ctx)?)
        .masked_paths(masked)
        .readonly_paths(readonly)
        .build()?;
    linux.set_seccomp(seccomp);
    // libcontainer takes the kind without "r" (it always applies it recursively).
    linux.set_rootfs_propagation(propagation.map(str::to_string));
    linux.set_devices(if sec.privileged {
        Some(ctx.host_devices.clone())
    } else {
        None
    });
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_sysctl(None);

    let annotations: HashMap<String, String> = cfg
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut builder = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(ctx.rootfs.clone())
                .readonly(sec.readonly_rootfs)
                .build()?,
        )
        .process(process)
        .mounts(all_mounts)
        .linux(linux)
        .annotations(annotations);
    if let Some(h) = hostname.clone() {
        builder = builder.hostname(h);
    }
    let mut spec = builder.build()?;
    // oci-spec's default spec names the host "youki"; a shared UTS namespace takes none.
    spec.set_hostname(hostname);
    spec.set_hooks(None);
    Ok(spec)
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
