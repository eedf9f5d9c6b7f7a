//! A container's records on disk and where they live.
//!
//! ```text
//! <root>/containers/<id>/config.json   ContainerRecord: what was asked for (written once at create)
//! <root>/containers/<id>/state.json    RunState: monitor and init identities, start time
//! <root>/containers/<id>/exit.json     ExitRecord: written once by the monitor when init exits
//! <root>/containers/<id>/bundle/       OCI bundle (config.json = the generated spec)
//! <root>/containers/<id>/rootfs        overlay mount point; upper/ and work/ beside it
//! <root>/containers/<id>/container.log CRI log (unless the config names another path)
//! <run>/<id>/                          libcontainer's own state (tmpfs in production)
//! ```
//!
//! Every file is written with [`atomic_write`](crate::fsutil::atomic_write), so a crash leaves
//! the old or the new version. Status is derived from these files plus process liveness, never
//! stored, so whatever happened while no daemon ran is seen correctly on the next read.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::config::ContainerConfig;
use super::sys::ProcessId;
use crate::fsutil::{self, FsError};

/// Problems with a container's records.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("container record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Where one runtime keeps its containers.
#[derive(Clone, Debug)]
pub struct Paths {
    /// `<root>/containers`
    pub containers: PathBuf,
    /// The run dir (libcontainer state).
    pub run: PathBuf,
}

impl Paths {
    pub fn dir(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }
    pub fn record(&self, id: &str) -> PathBuf {
        self.dir(id).join("config.json")
    }
    pub fn run_state(&self, id: &str) -> PathBuf {
        self.dir(id).join("state.json")
    }
    pub fn exit(&self, id: &str) -> PathBuf {
        self.dir(id).join("exit.json")
    }
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir(id).join("bundle")
    }
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.dir(id).join("rootfs")
    }
    pub fn upper(&self, id: &str) -> PathBuf {
        self.dir(id).join("upper")
    }
    pub fn work(&self, id: &str) -> PathBuf {
        self.dir(id).join("work")
    }
    pub fn default_log(&self, id: &str) -> PathBuf {
        self.dir(id).join("container.log")
    }
    pub fn monitor_log(&self, id: &str) -> PathBuf {
        self.dir(id).join("monitor.log")
    }
    /// libcontainer's directory for this container.
    pub fn libcontainer(&self, id: &str) -> PathBuf {
        self.run.join(id)
    }
}

/// What the container was created from; never changes except `config.resources` on update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    /// The image name the caller gave.
    pub image_ref: String,
    /// The image's id (config digest).
    pub image_id: String,
    pub config: ContainerConfig,
    pub created_at: DateTime<Utc>,
    pub log_path: PathBuf,
    /// cgroups path relative to each hierarchy's root (`/<parent>/<id>`).
    pub cgroups_path: PathBuf,
    /// Signal number `stop` sends first.
    pub stop_signal: i32,
}

/// Processes of a created container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub monitor: Option<ProcessId>,
    pub init: Option<ProcessId>,
    pub started_at: Option<DateTime<Utc>>,
}

/// How the container's init ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status, or 128 + signal when killed by one.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub finished_at: DateTime<Utc>,
    /// Why the status is not the process's own (e.g. "monitor vanished").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    fsutil::atomic_write(path, &data)?;
    Ok(())
}

/// Reads a JSON record; a missing file is `None`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StateError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::new("read", path, e).into()),
    };
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exit.json");
        assert!(read_json::<ExitRecord>(&p).unwrap().is_none());
        let rec = ExitRecord {
            exit_code: 137,
            signal: Some(9),
            oom_killed: true,
            finished_at: Utc::now(),
            reason: None,
        };
        write_json(&p, &rec).unwrap();
        assert_eq!(read_json::<ExitRecord>(&p).unwrap(), Some(rec));
        std::fs::write(&p, b"{").unwrap();
        assert!(read_json::<ExitRecord>(&p).is_err());
    }
}
