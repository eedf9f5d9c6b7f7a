//! Pure translation between CRI container messages and keel-runtime's container types:
//! `ContainerConfig` (+ the sandbox's record) -> runtime [`ContainerConfig`], security context
//! and resources included; [`ContainerInfo`] -> `Container` / `ContainerStatus`; stats.
//!
//! The runtime's container name is node-unique; CRI's key is (pod, name, attempt), so the
//! runtime name is [`unique_name`] and the CRI metadata, the image as the caller wrote it and
//! the CRI mounts travel in the reserved annotation [`META_KEY`] (never shown in answers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel_runtime::container::{
    ContainerConfig, ContainerInfo, ContainerStats, MountConfig, Propagation, Resources,
    SeccompProfile, Security, Status,
};
use keel_runtime::pod::PodRecord;
use serde::{Deserialize, Serialize};

use crate::pod_convert::{RESERVED_PREFIX, visible};
use crate::{CriError, api};

/// Annotation holding [`CriMeta`] as JSON.
pub(crate) const META_KEY: &str = "io.keel.cri.container";

/// What CRI answers need and the runtime record does not keep in CRI form.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct CriMeta {
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it.
    pub image: String,
    pub mounts: Vec<CriMount>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct CriMount {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub propagation: i32,
}

/// The runtime name of a container: unique for (pod, name, attempt).
pub(crate) fn unique_name(pod_id: &str, m: &api::ContainerMetadata) -> String {
    format!("{}_{}_{}", m.name, m.attempt, pod_id)
}

/// The CRI metadata of a container record (absent for containers not made through CRI).
pub(crate) fn meta(cfg: &ContainerConfig) -> Option<CriMeta> {
    serde_json::from_str(cfg.annotations.get(META_KEY)?).ok()
}

fn positive<T: TryFrom<i64>>(v: i64) -> Option<T> {
    if v > 0 { T::try_from(v).ok() } else { None }
}

/// CRI resources -> runtime resources (zero / empty means "not set", as in CRI).
pub(crate) fn resources(r: &api::LinuxContainerResources) -> Resources {
    Resources {
        cpu_shares: positive(r.cpu_shares),
        cpu_quota: positive(r.cpu_quota),
        cpu_period: positive(r.cpu_period),
        cpuset_cpus: (!r.cpuset_cpus.is_empty()).then(|| r.cpuset_cpus.clone()),
        cpuset_mems: (!r.cpuset_mems.is_empty()).then(|| r.cpuset_mems.clone()),
        memory_limit: positive(r.memory_limit_in_bytes),
        pids_limit: r
            .unified
            .get("pids.max")
            .and_then(|v| v.parse::<i64>().ok()),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|h| (h.page_size.clone(), h.limit))
            .collect(),
    }
}

/// Runtime resources -> CRI resources (ContainerStatus).
pub(crate) fn cri_resources(r: &Resources, oom_score_adj: Option<i32>) -> api::ContainerResources {
    api::ContainerResources {
        linux: Some(api::LinuxContainerResources {
            cpu_period: r.cpu_period.map_or(0, |v| v as i64),
            cpu_quota: r.cpu_quota.unwrap_or(0),
            cpu_shares: r.cpu_shares.map_or(0, |v| v as i64),
            memory_limit_in_bytes: r.memory_limit.unwrap_or(0),
            oom_score_adj: oom_score_adj.unwrap_or(0) as i64,
            cpuset_cpus: r.cpuset_cpus.clone().unwrap_or_default(),
            cpuset_mems: r.cpuset_mems.clone().unwrap_or_default(),
            hugepage_limits: r
                .hugepage_limits
                .iter()
                .map(|(page_size, limit)| api::HugepageLimit {
                    page_size: page_size.clone(),
                    limit: *limit,
                })
                .collect(),
            ..Default::default()
        }),
        windows: None,
    }
}

/// The seccomp profile: the structured field first, then the deprecated path string;
/// nothing set is Unconfined (what containerd and kubelet's default mean).
pub(crate) fn seccomp(
    profile: Option<&api::SecurityProfile>,
    legacy_path: &str,
) -> Result<SeccompProfile, CriError> {
    use api::security_profile::ProfileType;
    if let Some(p) = profile {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompProfile::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompProfile::Unconfined),
            Ok(ProfileType::Localhost) if !p.localhost_ref.is_empty() => {
                Ok(SeccompProfile::Localhost(PathBuf::from(&p.localhost_ref)))
            }
            Ok(ProfileType::Localhost) => Err(CriError::invalid(
                "config.linux.security_context.seccomp.localhost_ref",
                "empty for a Localhost profile",
            )),
            Err(_) => Err(CriError::invalid(
                "config.linux.security_context.seccomp.profile_type",
                format!("unknown type {}", p.profile_type),
            )),
        };
    }
    match legacy_path {
        "" | "unconfined" => Ok(SeccompProfile::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompProfile::RuntimeDefault),
        p => match p.strip_prefix("localhost/") {
            Some(path) if !path.is_empty() => Ok(SeccompProfile::Localhost(PathBuf::from(path))),
            _ => Err(CriError::invalid(
                "config.linux.security_context.seccomp_profile_path",
                format!("unknown profile {p:?}"),
            )),
        },
    }
}

/// The runtime user spec (`name`, `uid`, `name:gid`, `uid:gid`) of a security context.
pub(crate) fn user(sc: &api::LinuxContainerSecurityContext) -> Result<Option<String>, CriError> {
    let group = sc.run_as_group.as_ref().map(|g| g.value);
    let user = if !sc.run_as_username.is_empty() {
        sc.run_as_username.clone()
    } else if let Some(u) = &sc.run_as_user {
        if u.value < 0 {
            return Err(CriError::invalid(
                "config.linux.security_context.run_as_user",
                format!("{} is negative", u.value),
            ));
        }
        u.value.to_string()
    } else if group.is_some() {
        return Err(CriError::invalid(
            "config.linux.security_context.run_as_group",
            "set without run_as_user or run_as_username",
        ));
    } else {
        return Ok(None);
    };
    Ok(Some(match group {
        Some(g) if g < 0 => {
            return Err(CriError::invalid(
                "config.linux.security_context.run_as_group",
                format!("{g} is negative"),
            ));
        }
        Some(g) => format!("{user}:{g}"),
        None => user,
    }))
}

/// Security settings of a security context. The deprecated `seccomp_profile_path` is still
/// what older kubelets and crictl configs send, so it is read when `seccomp` is unset.
/// AppArmor is checked apart ([`check_apparmor`]).
#[expect(
    deprecated,
    reason = "seccomp_profile_path: older kubelets still send it"
)]
pub(crate) fn security(sc: &api::LinuxContainerSecurityContext) -> Result<Security, CriError> {
    let caps = sc.capabilities.clone().unwrap_or_default();
    let nonempty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Ok(Security {
        privileged: sc.privileged,
        cap_add: caps.add_capabilities,
        cap_drop: caps.drop_capabilities,
        no_new_privs: sc.no_new_privs,
        seccomp: if sc.privileged {
            SeccompProfile::Unconfined
        } else {
            seccomp(sc.seccomp.as_ref(), &sc.seccomp_profile_path)?
        },
        readonly_rootfs: sc.readonly_rootfs,
        masked_paths: nonempty(&sc.masked_paths),
        readonly_paths: nonempty(&sc.readonly_paths),
    })
}

/// Whether the node enforces AppArmor (the kernel module says so).
pub(crate) fn host_has_apparmor() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

/// AppArmor: keel does not load or apply profiles. Where the host has no AppArmor every
/// request is accepted and ignored (there is nothing to confine with, as containerd does);
/// on an AppArmor host a Localhost profile is refused rather than silently not applied, and
/// RuntimeDefault runs unconfined (logged).
#[expect(deprecated, reason = "apparmor_profile: older kubelets still send it")]
pub(crate) fn check_apparmor(
    sc: &api::LinuxContainerSecurityContext,
    host_has_apparmor: bool,
) -> Result<(), CriError> {
    use api::security_profile::ProfileType;
    let localhost = match &sc.apparmor {
        Some(p) => p.profile_type == ProfileType::Localhost as i32,
        None => sc.apparmor_profile.starts_with("localhost/"),
    };
    if localhost && host_has_apparmor && !sc.privileged {
        return Err(CriError::invalid(
            "config.linux.security_context.apparmor",
            "keel cannot apply AppArmor profiles; use RuntimeDefault or Unconfined",
        ));
    }
    Ok(())
}

fn propagation(p: i32) -> Propagation {
    match api::MountPropagation::try_from(p) {
        Ok(api::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
        Ok(api::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
        _ => Propagation::Private,
    }
}

/// The fields CreateContainer cannot do without: the config, its metadata (with a name) and
/// the image.
pub(crate) fn required(
    config: Option<&api::ContainerConfig>,
) -> Result<(&api::ContainerConfig, &api::ContainerMetadata, &str), CriError> {
    let c = config.ok_or_else(|| CriError::invalid("config", "missing"))?;
    let m = c
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata", "missing"))?;
    if m.name.is_empty() {
        return Err(CriError::invalid("config.metadata.name", "empty"));
    }
    let image = c.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
    if image.is_empty() {
        return Err(CriError::invalid("config.image.image", "empty"));
    }
    Ok((c, m, image))
}

/// What CreateContainer asks the runtime for, before the pod joins it (namespaces, cgroup,
/// /etc files: `PodRuntime::container_config`).
pub(crate) fn container_config(
    config: Option<&api::ContainerConfig>,
    pod: &PodRecord,
) -> Result<(ContainerConfig, CriMeta), CriError> {
    let (c, m, image) = required(config)?;
    let mut mounts = Vec::new();
    let mut cri_mounts = Vec::new();
    for mt in &c.mounts {
        if mt.container_path.is_empty() {
            return Err(CriError::invalid("config.mounts.container_path", "empty"));
        }
        if mt.host_path.is_empty() {
            return Err(CriError::invalid(
                "config.mounts.host_path",
                format!("empty for {}", mt.container_path),
            ));
        }
        mounts.push(MountConfig {
            source: PathBuf::from(&mt.host_path),
            destination: mt.container_path.clone(),
            readonly: mt.readonly,
            propagation: propagation(mt.propagation),
            ..Default::default()
        });
        cri_mounts.push(CriMount {
            container_path: mt.container_path.clone(),
            host_path: mt.host_path.clone(),
            readonly: mt.readonly,
            propagation: mt.propagation,
        });
    }
    let linux = c.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    check_apparmor(&sc, host_has_apparmor())?;
    let res = linux.resources.clone().unwrap_or_default();
    let meta = CriMeta {
        name: m.name.clone(),
        attempt: m.attempt,
        image: image.to_owned(),
        mounts: cri_mounts,
    };
    let mut annotations: BTreeMap<String, String> = c
        .annotations
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Serializing plain strings and numbers cannot fail.
    annotations.insert(
        META_KEY.to_owned(),
        serde_json::to_string(&meta).unwrap_or_default(),
    );
    let log_path = match (&pod.config.log_directory, c.log_path.as_str()) {
        (Some(dir), rel) if !rel.is_empty() => Some(dir.join(rel)),
        _ => None,
    };
    let cfg = ContainerConfig {
        name: unique_name(&pod.id, m),
        command: c.command.clone(),
        args: c.args.clone(),
        env: c
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect(),
        working_dir: (!c.working_dir.is_empty()).then(|| c.working_dir.clone()),
        user: user(&sc)?,
        supplementary_groups: sc
            .supplemental_groups
            .iter()
            .map(|g| {
                u32::try_from(*g).map_err(|_| {
                    CriError::invalid(
                        "config.linux.security_context.supplemental_groups",
                        format!("{g} is not a group id"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        mounts,
        resources: resources(&res),
        security: security(&sc)?,
        labels: c
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        annotations,
        oom_score_adj: (res.oom_score_adj != 0).then_some(res.oom_score_adj as i32),
        log_path,
        stdin: c.stdin,
        stdin_once: c.stdin && c.stdin_once,
        tty: c.tty,
        ..Default::default()
    };
    Ok((cfg, meta))
}

/// The container's PID namespace mode when it differs from what joining the pod gives:
/// `CONTAINER` (own), `NODE`, `TARGET` (another container's, `target_pid` its init).
pub(crate) fn pid_mode(
    ns: Option<&api::NamespaceOption>,
    target_pid: Option<i32>,
) -> Result<Option<keel_runtime::container::NamespaceMode>, CriError> {
    use keel_runtime::container::NamespaceMode;
    let Some(ns) = ns else { return Ok(None) };
    match api::NamespaceMode::try_from(ns.pid) {
        Ok(api::NamespaceMode::Pod) | Err(_) => Ok(None),
        Ok(api::NamespaceMode::Container) => Ok(Some(NamespaceMode::Private)),
        Ok(api::NamespaceMode::Node) => Ok(Some(NamespaceMode::Host)),
        Ok(api::NamespaceMode::Target) => match target_pid {
            Some(pid) => Ok(Some(NamespaceMode::Join(PathBuf::from(format!(
                "/proc/{pid}/ns/pid"
            ))))),
            None => Err(CriError::invalid(
                "config.linux.security_context.namespace_options.target_id",
                format!("container {:?} is not running", ns.target_id),
            )),
        },
    }
}

pub(crate) fn state(s: Status) -> api::ContainerState {
    match s {
        Status::Created => api::ContainerState::ContainerCreated,
        Status::Running => api::ContainerState::ContainerRunning,
        Status::Exited => api::ContainerState::ContainerExited,
        Status::Unknown => api::ContainerState::ContainerUnknown,
    }
}

fn nanos(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(0)
}

fn cri_metadata(info: &ContainerInfo) -> (api::ContainerMetadata, CriMeta) {
    let meta = meta(&info.record.config).unwrap_or_default();
    (
        api::ContainerMetadata {
            name: meta.name.clone(),
            attempt: meta.attempt,
        },
        meta,
    )
}

fn image_spec(info: &ContainerInfo, meta: &CriMeta) -> api::ImageSpec {
    api::ImageSpec {
        image: if meta.image.is_empty() {
            info.record.image_ref.clone()
        } else {
            meta.image.clone()
        },
        ..Default::default()
    }
}

/// A container as ListContainers shows it.
pub(crate) fn container(info: &ContainerInfo) -> api::Container {
    let (metadata, meta) = cri_metadata(info);
    let rec = &info.record;
    api::Container {
        id: rec.id.clone(),
        pod_sandbox_id: rec.config.pod_id.clone().unwrap_or_default(),
        metadata: Some(metadata),
        image: Some(image_spec(info, &meta)),
        image_ref: rec.image_id.clone(),
        state: state(info.status) as i32,
        created_at: nanos(rec.created_at),
        labels: visible(&rec.config.labels),
        annotations: visible(&rec.config.annotations),
        image_id: rec.image_id.clone(),
    }
}

/// Why an exited container ended, as kubelet expects the reason.
pub(crate) fn exit_reason(info: &ContainerInfo) -> (String, String) {
    match &info.exit {
        Some(e) if e.oom_killed => ("OOMKilled".into(), e.reason.clone().unwrap_or_default()),
        Some(e) if e.exit_code == 0 => ("Completed".into(), e.reason.clone().unwrap_or_default()),
        Some(e) => ("Error".into(), e.reason.clone().unwrap_or_default()),
        None => (String::new(), String::new()),
    }
}

/// A container as ContainerStatus shows it.
pub(crate) fn container_status(info: &ContainerInfo) -> api::ContainerStatus {
    let (metadata, meta) = cri_metadata(info);
    let rec = &info.record;
    let (reason, message) = exit_reason(info);
    api::ContainerStatus {
        id: rec.id.clone(),
        metadata: Some(metadata),
        state: state(info.status) as i32,
        created_at: nanos(rec.created_at),
        started_at: info.started_at.map_or(0, nanos),
        finished_at: info.exit.as_ref().map_or(0, |e| nanos(e.finished_at)),
        exit_code: info.exit.as_ref().map_or(0, |e| e.exit_code),
        image: Some(image_spec(info, &meta)),
        image_ref: rec.image_id.clone(),
        reason,
        message,
        labels: visible(&rec.config.labels),
        annotations: visible(&rec.config.annotations),
        mounts: meta
            .mounts
            .iter()
            .map(|m| api::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: rec.log_path.to_string_lossy().into_owned(),
        resources: Some(cri_resources(
            &rec.config.resources,
            rec.config.oom_score_adj,
        )),
        image_id: rec.image_id.clone(),
        user: None,
    }
}

fn u64v(value: u64) -> Option<api::UInt64Value> {
    Some(api::UInt64Value { value })
}

/// Container attributes for stats.
pub(crate) fn attributes(info: &ContainerInfo) -> api::ContainerAttributes {
    let (metadata, _) = cri_metadata(info);
    api::ContainerAttributes {
        id: info.record.id.clone(),
        metadata: Some(metadata),
        labels: visible(&info.record.config.labels),
        annotations: visible(&info.record.config.annotations),
    }
}

/// One stats sample as CRI shows it; `nano_cores` from the previous sample when known.
pub(crate) fn container_stats(
    info: &ContainerInfo,
    s: &ContainerStats,
    nano_cores: Option<u64>,
    writable_layer: Option<(&Path, u64)>,
) -> api::ContainerStats {
    let ts = nanos(s.timestamp);
    api::ContainerStats {
        attributes: Some(attributes(info)),
        cpu: Some(api::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: u64v(s.usage.cpu_usage_ns),
            usage_nano_cores: nano_cores.and_then(u64v),
        }),
        memory: Some(api::MemoryUsage {
            timestamp: ts,
            working_set_bytes: u64v(s.usage.memory_working_set_bytes),
            usage_bytes: u64v(s.usage.memory_usage_bytes),
            ..Default::default()
        }),
        writable_layer: writable_layer.map(|(dir, used)| api::FilesystemUsage {
            timestamp: ts,
            fs_id: Some(api::FilesystemIdentifier {
                mountpoint: dir.to_string_lossy().into_owned(),
            }),
            used_bytes: u64v(used),
            inodes_used: None,
        }),
        swap: None,
    }
}

/// CPU use between two samples (timestamp ns, cumulative CPU ns) in nanocores.
pub(crate) fn nano_cores(prev: (i64, u64), now: (i64, u64)) -> Option<u64> {
    let dt = now.0.checked_sub(prev.0).filter(|d| *d > 0)?;
    let dcpu = now.1.checked_sub(prev.1)?;
    Some((dcpu as u128 * 1_000_000_000 / dt as u128) as u64)
}

#[cfg(test)]
#[path = "container_convert_tests.rs"]
mod tests;
