//! What a caller asks for when it runs a pod sandbox: plain data, no CRI types.
//!
//! keel-cri translates `RunPodSandboxRequest` into a [`PodConfig`] and `keel pod run` builds
//! one from flags. It is stored as-is in the pod's record, so every field has a serde default
//! and new fields must stay optional.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything that defines a pod sandbox.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodConfig {
    /// Optional human name; unique among the node's pods when set. (keel-cri should pass a
    /// name unique per sandbox, e.g. `<name>_<namespace>_<uid>_<attempt>` as containerd does.)
    pub name: String,
    /// Kubernetes metadata, handed to the network hook (CNI args) untouched.
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    /// Hostname in the pod's UTS namespace; default: the name, else the id's first 12 chars.
    /// Ignored with host network (the pod then has the node's hostname).
    pub hostname: Option<String>,
    /// /etc/resolv.conf of the pod; `None` copies the node's.
    pub dns: Option<DnsConfig>,
    /// Which namespaces are the node's instead of the pod's own.
    pub host: HostNamespaces,
    /// One PID namespace for all the pod's containers (CRI `NamespaceMode::POD`), kept by a
    /// tiny keeper process that is its init. Otherwise each container has its own.
    pub share_pid: bool,
    /// The pod's cgroup, relative to each hierarchy's root (kubelet's `cgroup_parent`).
    /// Default `<runtime cgroup parent>/pod-<id>`. Containers of the pod go below it.
    pub cgroup_parent: Option<String>,
    /// Namespaced sysctls applied in the pod's namespaces: `net.*` (network namespace),
    /// `kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*` (IPC namespace),
    /// `kernel.domainname` (UTS namespace). Names use `.` or `/` as separator.
    pub sysctls: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Handed to the network hook (CNI `portMappings` capability).
    pub port_mappings: Vec<PortMapping>,
    /// Directory for the containers' logs (CRI `log_directory`); informational.
    pub log_directory: Option<PathBuf>,
}

/// DNS settings written to the pod's /etc/resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    /// resolv.conf options such as `ndots:5`.
    pub options: Vec<String>,
}

/// Namespaces the pod shares with the node. Host network implies the host UTS namespace
/// (as kubelet and containerd do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostNamespaces {
    pub network: bool,
    pub pid: bool,
    pub ipc: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

/// A port of the pod published on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty: every address of the node.
    pub host_ip: String,
}
