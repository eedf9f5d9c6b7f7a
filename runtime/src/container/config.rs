//! What a caller asks for when it creates a container: plain data, no OCI or CRI types.
//!
//! keel-cri translates CRI requests into a [`ContainerConfig`] and `keel ctr` builds one from
//! flags; [`super::spec`] turns it (with the image config) into an OCI runtime spec. It is
//! stored as-is in the container's `config.json`, so every field has a serde default and new
//! fields must stay optional.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything that defines a container besides its image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerConfig {
    /// Optional human name; unique among the node's containers when set.
    pub name: String,
    /// Overrides the image's entrypoint (CRI `command`).
    pub command: Vec<String>,
    /// Overrides the image's cmd (CRI `args`).
    pub args: Vec<String>,
    /// `KEY=VALUE` entries, applied over the image's environment.
    pub env: Vec<String>,
    /// Overrides the image's working directory.
    pub working_dir: Option<String>,
    /// Overrides the image's user: `name`, `uid`, `name:group`, `uid:gid`.
    pub user: Option<String>,
    /// Extra group ids for the process, beyond those /etc/group gives the user.
    pub supplementary_groups: Vec<u32>,
    pub mounts: Vec<MountConfig>,
    pub resources: Resources,
    pub security: Security,
    pub namespaces: Namespaces,
    pub hostname: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Requested oom_score_adj; clamped to the runtime's own (no CAP_SYS_RESOURCE needed).
    pub oom_score_adj: Option<i32>,
    /// Where the CRI log goes; default `<state>/containers/<id>/container.log`.
    pub log_path: Option<PathBuf>,
    /// Signal `stop` sends first (name like `SIGTERM` or number); default the image's
    /// StopSignal, else SIGTERM.
    pub stop_signal: Option<String>,
    /// cgroup parent (relative to each hierarchy's root) overriding the runtime's.
    pub cgroup_parent: Option<String>,
    /// Keep the container's stdin open for attach (CRI `stdin`); without it stdin is
    /// /dev/null.
    pub stdin: bool,
    /// Close that stdin when the first attached client leaves (CRI `stdin_once`).
    pub stdin_once: bool,
    /// Run the init on a terminal (CRI `tty`): its output is the terminal's, logged as stdout.
    pub tty: bool,
    /// The pod sandbox this container belongs to (set by `PodRuntime::create_container`,
    /// which also points `namespaces`, `cgroup_parent` and the /etc mounts at the pod).
    pub pod_id: Option<String>,
}

/// A mount into the container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MountConfig {
    pub kind: MountKind,
    /// Host path for bind mounts; ignored for tmpfs.
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
    pub readonly: bool,
    pub propagation: Propagation,
    /// Extra mount options passed through (e.g. `size=64m` for tmpfs).
    pub options: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    #[default]
    Bind,
    Tmpfs,
}

/// Mount propagation, as CRI names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    /// rprivate
    #[default]
    Private,
    /// rslave: host mounts appear in the container.
    HostToContainer,
    /// rshared: both ways.
    Bidirectional,
}

/// Resource limits; `None` leaves the kernel default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per `cpu_period`.
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// Bytes.
    pub memory_limit: Option<i64>,
    pub pids_limit: Option<i64>,
    /// Page size (`2MB`, `1GB`) -> limit in bytes. Sizes the host lacks are ignored.
    pub hugepage_limits: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Security {
    /// All capabilities, host devices, no seccomp, no masked paths, writable /sys.
    pub privileged: bool,
    /// Capability names (`NET_ADMIN` or `CAP_NET_ADMIN`, or `ALL`) added to the default set.
    pub cap_add: Vec<String>,
    /// Capability names (or `ALL`) removed from the default set; applied before `cap_add`.
    pub cap_drop: Vec<String>,
    pub no_new_privs: bool,
    pub seccomp: SeccompProfile,
    pub readonly_rootfs: bool,
    /// Replaces the default masked paths when set.
    pub masked_paths: Option<Vec<String>>,
    /// Replaces the default read-only paths when set.
    pub readonly_paths: Option<Vec<String>>,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            privileged: false,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            no_new_privs: false,
            seccomp: SeccompProfile::RuntimeDefault,
            readonly_rootfs: false,
            masked_paths: None,
            readonly_paths: None,
        }
    }
}

/// Which seccomp filter the container gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompProfile {
    /// The runtime's default profile (containerd's RuntimeDefault).
    #[default]
    RuntimeDefault,
    Unconfined,
    /// An OCI/Docker seccomp JSON profile on the host.
    Localhost(PathBuf),
}

/// How the container gets each namespace. The mount namespace is always its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Namespaces {
    pub network: NamespaceMode,
    pub ipc: NamespaceMode,
    pub uts: NamespaceMode,
    pub pid: NamespaceMode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceMode {
    /// A new namespace of its own.
    #[default]
    Private,
    /// The host's namespace.
    Host,
    /// Join the namespace at this path (a pinned pod namespace or /proc/<pid>/ns/<kind>).
    Join(PathBuf),
}
