//! Containers: OCI containers run through youki's libcontainer, each watched by its own
//! monitor process, with state on disk that any later runtime instance picks up.
//!
//! | file | owns |
//! | --- | --- |
//! | `config.rs` | [`ContainerConfig`]: what a caller asks for (plain data) |
//! | `spec.rs` | pure translation image config + config -> OCI spec |
//! | `seccomp.rs`, `user.rs` | the RuntimeDefault profile; user/group resolution |
//! | `rootfs.rs`, `cgroups.rs`, `sys.rs` | overlay rootfs; cgroup reads/updates; the syscall seam |
//! | `state.rs` | records on disk and their paths |
//! | `monitor.rs`, `crilog.rs` | the per-container monitor process and the CRI log format |
//! | `container_<verb>.rs` | one file per operation |
//!
//! It must not know CRI or Kubernetes types. Every operation is blocking (mounts, process
//! spawns, waits): async callers run them on `spawn_blocking`.

pub mod cgroups;
pub mod config;
pub mod container_attach;
pub mod container_create;
pub mod container_exec;
pub mod container_exec_stream;
pub mod container_list;
pub mod container_logs;
pub mod container_remove;
pub mod container_start;
pub mod container_stats;
pub mod container_stop;
pub mod container_update;
pub mod crilog;
pub mod monitor;
pub mod rootfs;
pub mod seccomp;
pub mod seccomp_bpf;
pub mod spec;
pub mod state;
pub mod sys;
mod tty;
pub mod user;

use std::path::{Path, PathBuf};

pub use config::{
    ContainerConfig, MountConfig, MountKind, NamespaceMode, Namespaces, Propagation, Resources,
    SeccompProfile, Security,
};
pub use container_create::ImageInfo;
pub use container_exec::ExecResult;
pub use container_exec_stream::{ExecIo, ExecProcess, resize_terminal};
pub use container_list::{ContainerInfo, ListFilter, Status};
pub use container_stats::ContainerStats;
pub use state::{ContainerRecord, ExitRecord};

use crate::fsutil::FsError;

/// Everything that can go wrong operating containers. Each message names the container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("container name {0:?} matches several containers")]
    Ambiguous(String),
    #[error("container name {0:?} is already in use")]
    NameInUse(String),
    #[error("container {id}: cannot {op} while {status}")]
    InvalidState {
        id: String,
        op: &'static str,
        status: String,
    },
    #[error("container {id}: {op}: {reason}")]
    Libcontainer {
        id: String,
        op: &'static str,
        reason: String,
    },
    #[error("container {id}: monitor: {reason}")]
    Monitor { id: String, reason: String },
    #[error("container {id}: {op} timed out after {secs}s")]
    Timeout {
        id: String,
        op: &'static str,
        secs: u64,
    },
    #[error("container {id}: exec: {reason}")]
    Exec { id: String, reason: String },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Cgroup(#[from] cgroups::CgroupError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Where a runtime keeps state and how it runs monitors.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// State root: containers live in `<root>/containers`.
    pub root: PathBuf,
    /// Run dir for libcontainer's state (default `/run/keel/containers`).
    pub run_dir: PathBuf,
    /// cgroup parent, relative to each hierarchy's root (default `keel`).
    pub cgroup_parent: String,
    /// The executable re-executed as monitor; default: this process's own (`/proc/self/exe`).
    pub monitor_exe: Option<PathBuf>,
}

impl RuntimeOptions {
    /// Production defaults for a state root.
    pub fn new(root: &Path) -> Self {
        RuntimeOptions {
            root: root.to_owned(),
            run_dir: PathBuf::from("/run/keel/containers"),
            cgroup_parent: "keel".to_string(),
            monitor_exe: None,
        }
    }
}

/// The node's containers. Cheap to clone; instances over one root see the same containers,
/// also across processes and restarts.
#[derive(Clone, Debug)]
pub struct ContainerRuntime {
    opts: RuntimeOptions,
    paths: state::Paths,
    /// Seccomp programs compiled so far (see `seccomp_bpf`).
    filters: std::sync::Arc<seccomp_bpf::FilterCache>,
}

impl ContainerRuntime {
    /// Opens (creating if needed) the container store. Nothing is cached: every call reads
    /// the records, so a new instance over an existing root recovers every container.
    pub fn open(opts: RuntimeOptions) -> Result<Self, ContainerError> {
        let paths = state::Paths {
            containers: opts.root.join("containers"),
            run: opts.run_dir.clone(),
        };
        crate::fsutil::mkdir_all(&paths.containers)?;
        Ok(ContainerRuntime {
            opts,
            paths,
            filters: Default::default(),
        })
    }

    pub fn options(&self) -> &RuntimeOptions {
        &self.opts
    }

    /// The directory holding a container's state.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.paths.dir(id)
    }

    /// Resolves a full id, a name, or a unique id prefix to an id.
    pub fn resolve(&self, name: &str) -> Result<String, ContainerError> {
        let ids = self.ids()?;
        if ids.iter().any(|i| i == name) {
            return Ok(name.to_string());
        }
        let mut by_name = Vec::new();
        for id in &ids {
            if let Ok(Some(rec)) = state::read_json::<ContainerRecord>(&self.paths.record(id))
                && !rec.config.name.is_empty()
                && rec.config.name == name
            {
                by_name.push(id.clone());
            }
        }
        if by_name.len() == 1 {
            return Ok(by_name.remove(0));
        }
        let prefixed: Vec<&String> = ids.iter().filter(|i| i.starts_with(name)).collect();
        match (prefixed.len(), name.is_empty()) {
            (1, false) => Ok(prefixed[0].clone()),
            (0, _) | (_, true) => Err(ContainerError::NotFound(name.to_string())),
            _ => Err(ContainerError::Ambiguous(name.to_string())),
        }
    }

    /// Ids of every container directory.
    fn ids(&self) -> Result<Vec<String>, ContainerError> {
        let rd = match std::fs::read_dir(&self.paths.containers) {
            Ok(rd) => rd,
            Err(e) => return Err(FsError::new("read dir", &self.paths.containers, e).into()),
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn record(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        state::read_json(&self.paths.record(id))?
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    fn monitor_exe(&self) -> Result<PathBuf, ContainerError> {
        match &self.opts.monitor_exe {
            Some(p) => Ok(p.clone()),
            None => std::fs::read_link("/proc/self/exe")
                .map_err(|e| FsError::new("resolve", "/proc/self/exe", e).into()),
        }
    }
}
