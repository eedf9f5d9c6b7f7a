//! Pod sandboxes without a pause image: network, IPC and UTS namespaces created and pinned by
//! bind mounts (as CRI-O's pinns does), an optional shared PID namespace kept by a tiny
//! keeper process, the pod's hostname, /etc/hosts, /etc/resolv.conf and /dev/shm, a cgroup
//! parent, namespaced sysctls, and a network hook the caller implements (CNI in keel-cri).
//!
//! | file | owns |
//! | --- | --- |
//! | `config.rs` | [`PodConfig`]: what a caller asks for (plain data) |
//! | `dns.rs`, `sysctl.rs` | pure: the /etc files; which namespace each sysctl goes to |
//! | `namespaces.rs`, `keeper.rs`, `cgroup.rs` | the syscall seam: pins, setns, shm; the PID keeper; the pod cgroup |
//! | `network.rs` | the [`PodNetwork`] hook |
//! | `state.rs` | [`PodRecord`] on disk and its paths |
//! | `pod_<verb>.rs` | one file per operation; `pod_container.rs`: containers joining a pod |
//!
//! It must not know CRI or Kubernetes types. Every operation is blocking (mounts, process
//! spawns): async callers run them on `spawn_blocking`. Operations on one pod are not
//! serialized against each other: the caller (keel-cri) must not run two of them on the same
//! pod at once.

pub mod cgroup;
pub mod config;
pub mod dns;
pub mod keeper;
pub mod namespaces;
pub mod network;
pub mod pod_container;
pub mod pod_list;
pub mod pod_remove;
pub mod pod_run;
pub mod pod_stop;
pub mod state;
pub mod sysctl;

use std::path::{Path, PathBuf};

pub use config::{DnsConfig, HostNamespaces, PodConfig, PortMapping, Protocol};
pub use network::{LoopbackOnly, NetworkError, PodIps, PodNetwork};
pub use pod_list::{PodFilter, PodInfo};
pub use state::{PodNamespaces, PodRecord, PodState};

use crate::container::state::{StateError, read_json};
use crate::container::{ContainerError, ContainerRuntime, RuntimeOptions};
use crate::fsutil::FsError;

/// Everything that can go wrong operating pods. Each message names the pod or the culprit.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod {0:?} not found")]
    NotFound(String),
    #[error("pod name {0:?} matches several pods")]
    Ambiguous(String),
    #[error("pod name {0:?} is already in use")]
    NameInUse(String),
    #[error("invalid pod config: {0}")]
    InvalidConfig(String),
    #[error("pod {id}: cannot {op} while {state}")]
    InvalidState {
        id: String,
        op: &'static str,
        state: PodState,
    },
    #[error("pod {id}: namespaces: {reason}")]
    Namespace { id: String, reason: String },
    #[error("pod {id}: PID namespace keeper: {reason}")]
    Keeper { id: String, reason: String },
    #[error("pod {id}: network {op}: {reason}")]
    Network {
        id: String,
        op: &'static str,
        reason: String,
    },
    #[error("pod {id}: {reason}")]
    Sysctl { id: String, reason: String },
    #[error("pod cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Where a pod runtime keeps its state.
#[derive(Clone, Debug)]
pub struct PodOptions {
    /// Pod records and /etc files (default `<root>/pods`).
    pub state_dir: PathBuf,
    /// Namespace pins and /dev/shm mounts (default `/run/keel/pods`).
    pub run_dir: PathBuf,
    /// Parent of pod cgroups that name none (default: the container runtime's, `keel`).
    pub cgroup_parent: String,
}

impl PodOptions {
    /// Defaults beside a container runtime's: `<root>/pods`, and beside its run dir a
    /// `pods` dir (`/run/keel/containers` -> `/run/keel/pods`; any other run dir `X` ->
    /// `X-pods`).
    pub fn for_runtime(opts: &RuntimeOptions) -> Self {
        let run_dir = match opts.run_dir.file_name().and_then(|n| n.to_str()) {
            Some("containers") => opts.run_dir.with_file_name("pods"),
            Some(name) => opts.run_dir.with_file_name(format!("{name}-pods")),
            None => opts.run_dir.join("pods"),
        };
        PodOptions {
            state_dir: opts.root.join("pods"),
            run_dir,
            cgroup_parent: opts.cgroup_parent.clone(),
        }
    }
}

/// The node's pod sandboxes. Cheap to clone; instances over one state dir see the same pods,
/// also across processes and restarts (nothing is cached).
#[derive(Clone, Debug)]
pub struct PodRuntime {
    containers: ContainerRuntime,
    opts: PodOptions,
    paths: state::PodPaths,
}

impl PodRuntime {
    /// Opens (creating if needed) the pod store, beside `containers` whose containers it
    /// stops and removes with their pods.
    pub fn open(containers: ContainerRuntime, opts: PodOptions) -> Result<Self, PodError> {
        crate::fsutil::mkdir_all(&opts.state_dir)?;
        crate::fsutil::mkdir_all(&opts.run_dir)?;
        let paths = state::PodPaths {
            state: opts.state_dir.clone(),
            run: opts.run_dir.clone(),
        };
        Ok(PodRuntime {
            containers,
            opts,
            paths,
        })
    }

    /// Opens the pod store at its default place beside `containers`.
    pub fn open_default(containers: ContainerRuntime) -> Result<Self, PodError> {
        let opts = PodOptions::for_runtime(containers.options());
        Self::open(containers, opts)
    }

    pub fn options(&self) -> &PodOptions {
        &self.opts
    }

    /// The container runtime pods put their containers in.
    pub fn containers(&self) -> &ContainerRuntime {
        &self.containers
    }

    /// The directory holding a pod's record and /etc files.
    pub fn pod_dir(&self, id: &str) -> PathBuf {
        self.paths.dir(id)
    }

    /// Resolves a full id, a name, or a unique id prefix to an id.
    pub fn resolve(&self, name: &str) -> Result<String, PodError> {
        let ids = self.ids()?;
        if ids.iter().any(|i| i == name) {
            return Ok(name.to_string());
        }
        let by_name: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !name.is_empty()
                    && self
                        .record(id)
                        .is_ok_and(|r| !r.config.name.is_empty() && r.config.name == name)
            })
            .collect();
        if by_name.len() == 1 {
            return Ok(by_name[0].clone());
        }
        let prefixed: Vec<&String> = ids.iter().filter(|i| i.starts_with(name)).collect();
        match (prefixed.len(), name.is_empty()) {
            (1, false) => Ok(prefixed[0].clone()),
            (0, _) | (_, true) => Err(PodError::NotFound(name.to_string())),
            _ => Err(PodError::Ambiguous(name.to_string())),
        }
    }

    /// Ids of every pod directory.
    fn ids(&self) -> Result<Vec<String>, PodError> {
        let rd = std::fs::read_dir(&self.paths.state)
            .map_err(|e| FsError::new("read dir", &self.paths.state, e))?;
        let mut ids: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The pod's record as written (see [`Self::status`] for the live state).
    pub fn record(&self, id: &str) -> Result<PodRecord, PodError> {
        read_json(&self.paths.record(id))?.ok_or_else(|| PodError::NotFound(id.to_string()))
    }

    fn write_record(&self, rec: &PodRecord) -> Result<(), PodError> {
        crate::container::state::write_json(&self.paths.record(&rec.id), rec)?;
        Ok(())
    }

    fn keeper_exe(&self) -> Result<PathBuf, PodError> {
        match &self.containers.options().monitor_exe {
            Some(p) => Ok(p.clone()),
            None => std::fs::read_link("/proc/self/exe")
                .map_err(|e| FsError::new("resolve", "/proc/self/exe", e).into()),
        }
    }
}

/// Whether `path` exists (a pin, a mount point).
fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
