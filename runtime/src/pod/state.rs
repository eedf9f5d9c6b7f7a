//! A pod's record on disk and where its pieces live.
//!
//! ```text
//! <state>/<id>/pod.json      PodRecord (written atomically at every transition)
//! <state>/<id>/resolv.conf   bind-mounted into the pod's containers as /etc/resolv.conf
//! <state>/<id>/hosts         ... as /etc/hosts
//! <state>/<id>/hostname      ... as /etc/hostname
//! <run>/<id>/net|ipc|uts|pid namespace pins (bind mounts of nsfs files)
//! <run>/<id>/shm             the pod's /dev/shm (tmpfs), when it has its own IPC namespace
//! ```
//!
//! The record says what was made; the status is derived from it and from the keeper's
//! liveness on every read, so a pod whose keeper died while no runtime ran reads NotReady.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::config::PodConfig;
use super::namespaces::NsKind;
use super::network::PodIps;
use crate::container::sys::ProcessId;

/// Where one runtime keeps its pods.
#[derive(Clone, Debug)]
pub struct PodPaths {
    pub state: PathBuf,
    pub run: PathBuf,
}

impl PodPaths {
    pub fn dir(&self, id: &str) -> PathBuf {
        self.state.join(id)
    }
    pub fn record(&self, id: &str) -> PathBuf {
        self.dir(id).join("pod.json")
    }
    pub fn resolv_conf(&self, id: &str) -> PathBuf {
        self.dir(id).join("resolv.conf")
    }
    pub fn hosts(&self, id: &str) -> PathBuf {
        self.dir(id).join("hosts")
    }
    pub fn hostname(&self, id: &str) -> PathBuf {
        self.dir(id).join("hostname")
    }
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.run.join(id)
    }
    pub fn pin(&self, id: &str, kind: NsKind) -> PathBuf {
        self.run_dir(id).join(kind.name())
    }
    pub fn shm(&self, id: &str) -> PathBuf {
        self.run_dir(id).join("shm")
    }
}

/// Where the pod is in its life, as recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// `run` has not finished (or died half way; `remove` cleans it up).
    #[default]
    Creating,
    /// Namespaces, network and files are in place; containers may join.
    Ready,
    /// Stopped (or its keeper died): containers are stopped, the network is torn down.
    NotReady,
}

impl std::fmt::Display for PodState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodState::Creating => "creating",
            PodState::Ready => "ready",
            PodState::NotReady => "notready",
        })
    }
}

/// The pod's namespaces: a pinned path, or `None` for the node's (host) namespace, or, for
/// PID, for "each container its own".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodNamespaces {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub pid: Option<PathBuf>,
}

/// Everything known about a pod; `pod.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub config: PodConfig,
    pub created_at: DateTime<Utc>,
    pub state: PodState,
    /// The hostname inside the pod.
    pub hostname: String,
    /// The pod's cgroup, relative to each hierarchy's root.
    pub cgroup_parent: String,
    #[serde(default)]
    pub namespaces: PodNamespaces,
    /// The init of the shared PID namespace.
    #[serde(default)]
    pub keeper: Option<ProcessId>,
    /// The pod's /dev/shm (own tmpfs, or the node's with host IPC).
    #[serde(default)]
    pub shm: Option<PathBuf>,
    /// What the network hook returned.
    #[serde(default)]
    pub network: PodIps,
    /// Set up by the hook and not yet torn down.
    #[serde(default)]
    pub network_ready: bool,
    #[serde(default)]
    pub stopped_at: Option<DateTime<Utc>>,
}

impl PodRecord {
    /// The pinned network namespace, if the pod has its own.
    pub fn netns(&self) -> Option<&Path> {
        self.namespaces.network.as_deref()
    }
}
