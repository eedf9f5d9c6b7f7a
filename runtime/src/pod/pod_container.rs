//! Containers joining a pod: [`join`] turns a container config into one that uses the pod's
//! namespaces (pinned paths, or the node's with host options), sits in the pod's cgroup and
//! sees the pod's /etc/hosts, /etc/resolv.conf, /etc/hostname and /dev/shm. Pure; the
//! runtime methods check the pod is Ready and create the container.

use std::path::{Path, PathBuf};

use super::state::{PodRecord, PodState};
use super::{PodError, PodRuntime};
use crate::container::{ContainerConfig, ImageInfo, MountConfig, MountKind, NamespaceMode};

/// The pod files a container bind-mounts.
#[derive(Clone, Debug)]
pub struct PodFiles {
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub hostname: PathBuf,
}

fn mode(pinned: Option<&Path>) -> NamespaceMode {
    match pinned {
        Some(p) => NamespaceMode::Join(p.to_owned()),
        None => NamespaceMode::Host,
    }
}

/// `cfg` made a member of the pod. Mounts the caller already put at one of the pod's
/// destinations win over the pod's.
pub fn join(pod: &PodRecord, files: &PodFiles, cfg: &ContainerConfig) -> ContainerConfig {
    let mut c = cfg.clone();
    let ns = &pod.namespaces;
    c.pod_id = Some(pod.id.clone());
    c.namespaces.network = mode(ns.network.as_deref());
    c.namespaces.ipc = mode(ns.ipc.as_deref());
    c.namespaces.uts = mode(ns.uts.as_deref());
    c.namespaces.pid = match (&ns.pid, pod.config.host.pid) {
        (Some(p), _) => NamespaceMode::Join(p.clone()),
        (None, true) => NamespaceMode::Host,
        (None, false) => NamespaceMode::Private,
    };
    c.cgroup_parent = Some(pod.cgroup_parent.clone());
    // The pod's UTS namespace already has the hostname.
    c.hostname = None;
    if !c.env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        c.env.insert(0, format!("HOSTNAME={}", pod.hostname));
    }
    let readonly = cfg.security.readonly_rootfs;
    let mut extra = vec![
        (files.hosts.clone(), "/etc/hosts", readonly),
        (files.resolv_conf.clone(), "/etc/resolv.conf", readonly),
        (files.hostname.clone(), "/etc/hostname", readonly),
    ];
    if let Some(shm) = &pod.shm {
        extra.push((shm.clone(), "/dev/shm", false));
    }
    for (source, dest, ro) in extra {
        let taken = c
            .mounts
            .iter()
            .any(|m| m.destination.trim_end_matches('/') == dest);
        if !taken {
            c.mounts.push(MountConfig {
                kind: MountKind::Bind,
                source,
                destination: dest.to_string(),
                readonly: ro,
                ..Default::default()
            });
        }
    }
    c
}

impl PodRuntime {
    /// The files of a pod that its containers mount.
    pub fn pod_files(&self, id: &str) -> PodFiles {
        PodFiles {
            hosts: self.paths.hosts(id),
            resolv_conf: self.paths.resolv_conf(id),
            hostname: self.paths.hostname(id),
        }
    }

    /// `cfg` joined to a Ready pod (see [`join`]), for callers that create the container
    /// themselves.
    pub fn container_config(
        &self,
        pod_id: &str,
        cfg: &ContainerConfig,
    ) -> Result<ContainerConfig, PodError> {
        let info = self.status(pod_id)?;
        if info.state != PodState::Ready {
            return Err(PodError::InvalidState {
                id: pod_id.to_string(),
                op: "add a container",
                state: info.state,
            });
        }
        Ok(join(&info.record, &self.pod_files(pod_id), cfg))
    }

    /// Creates a container (not started) in a Ready pod; returns its id.
    pub fn create_container(
        &self,
        pod_id: &str,
        cfg: &ContainerConfig,
        image: &ImageInfo,
    ) -> Result<String, PodError> {
        let joined = self.container_config(pod_id, cfg)?;
        Ok(self.containers.create(&joined, image)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::state::PodNamespaces;

    fn pod(ns: PodNamespaces, host_pid: bool) -> PodRecord {
        let mut config = crate::pod::PodConfig::default();
        config.host.pid = host_pid;
        PodRecord {
            id: "p1".into(),
            config,
            created_at: chrono::Utc::now(),
            state: PodState::Ready,
            hostname: "web".into(),
            cgroup_parent: "keel/pod-p1".into(),
            namespaces: ns,
            keeper: None,
            shm: Some("/run/keel/pods/p1/shm".into()),
            network: Default::default(),
            network_ready: false,
            stopped_at: None,
        }
    }

    fn files() -> PodFiles {
        PodFiles {
            hosts: "/s/p1/hosts".into(),
            resolv_conf: "/s/p1/resolv.conf".into(),
            hostname: "/s/p1/hostname".into(),
        }
    }

    #[test]
    fn containers_join_pinned_namespaces_and_pod_files() {
        let ns = PodNamespaces {
            network: Some("/r/p1/net".into()),
            ipc: Some("/r/p1/ipc".into()),
            uts: Some("/r/p1/uts".into()),
            pid: Some("/r/p1/pid".into()),
        };
        let cfg = ContainerConfig {
            hostname: Some("ignored".into()),
            mounts: vec![MountConfig {
                source: "/mine".into(),
                destination: "/etc/resolv.conf".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let c = join(&pod(ns, false), &files(), &cfg);
        assert_eq!(c.pod_id.as_deref(), Some("p1"));
        assert_eq!(
            c.namespaces.network,
            NamespaceMode::Join("/r/p1/net".into())
        );
        assert_eq!(c.namespaces.pid, NamespaceMode::Join("/r/p1/pid".into()));
        assert_eq!(c.cgroup_parent.as_deref(), Some("keel/pod-p1"));
        assert_eq!(c.hostname, None);
        assert!(c.env.contains(&"HOSTNAME=web".to_string()));
        let dest = |d: &str| {
            c.mounts
                .iter()
                .filter(|m| m.destination == d)
                .collect::<Vec<_>>()
        };
        assert_eq!(dest("/etc/hosts")[0].source, PathBuf::from("/s/p1/hosts"));
        // The caller's own resolv.conf wins.
        assert_eq!(dest("/etc/resolv.conf").len(), 1);
        assert_eq!(dest("/etc/resolv.conf")[0].source, PathBuf::from("/mine"));
        assert_eq!(
            dest("/dev/shm")[0].source,
            PathBuf::from("/run/keel/pods/p1/shm")
        );
    }

    #[test]
    fn host_namespaces_map_to_host_mode() {
        let c = join(
            &pod(PodNamespaces::default(), true),
            &files(),
            &Default::default(),
        );
        assert_eq!(c.namespaces.network, NamespaceMode::Host);
        assert_eq!(c.namespaces.ipc, NamespaceMode::Host);
        assert_eq!(c.namespaces.uts, NamespaceMode::Host);
        assert_eq!(c.namespaces.pid, NamespaceMode::Host);
        let c = join(
            &pod(PodNamespaces::default(), false),
            &files(),
            &Default::default(),
        );
        assert_eq!(c.namespaces.pid, NamespaceMode::Private);
    }
}
