//! status and list: a container's status is derived on every read from its records and from
//! process liveness (pid + start time), never cached, so containers that exited while no
//! daemon ran, or whose monitor vanished, are reported as they are.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::state::{ContainerRecord, ExitRecord, RunState, read_json, write_json};
use super::{ContainerError, ContainerRuntime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, init waiting for start.
    Created,
    Running,
    Exited,
    /// Records incomplete (create in progress or interrupted).
    Unknown,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Unknown => "unknown",
        })
    }
}

/// A container as it is now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ContainerInfo {
    pub record: ContainerRecord,
    pub status: Status,
    /// Init pid while created or running.
    pub pid: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    pub exit: Option<ExitRecord>,
}

/// Which containers `list` returns; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub id_prefix: Option<String>,
    pub status: Option<Status>,
    /// Only containers of this pod sandbox.
    pub pod_id: Option<String>,
    /// Every label here must be present with this value.
    pub labels: BTreeMap<String, String>,
}

impl ListFilter {
    pub fn matches(&self, c: &ContainerInfo) -> bool {
        self.id_prefix
            .as_ref()
            .is_none_or(|p| c.record.id.starts_with(p.as_str()))
            && self.status.is_none_or(|s| s == c.status)
            && self
                .pod_id
                .as_ref()
                .is_none_or(|p| c.record.config.pod_id.as_ref() == Some(p))
            && self
                .labels
                .iter()
                .all(|(k, v)| c.record.config.labels.get(k) == Some(v))
    }
}

impl ContainerRuntime {
    /// The container's current state.
    pub fn status(&self, id: &str) -> Result<ContainerInfo, ContainerError> {
        let record = self.record(id)?;
        let run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
        let mut info = ContainerInfo {
            record,
            status: Status::Unknown,
            pid: None,
            started_at: run.started_at,
            exit: None,
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(exit) = read_json::<ExitRecord>(&self.paths.exit(id))? {
                info.status = Status::Exited;
                info.exit = Some(exit);
                return Ok(info);
            }
            if let Some(init) = run.init.filter(|p| p.is_alive()) {
                info.pid = Some(init.pid);
                info.status = if run.started_at.is_some() {
                    Status::Running
                } else {
                    Status::Created
                };
                return Ok(info);
            }
            let monitor_alive = run.monitor.is_some_and(|m| m.is_alive());
            if run.init.is_none() {
                // Create has not finished (or died half way).
                return Ok(info);
            }
            if !monitor_alive {
                // Init and monitor are gone without an exit record: the node rebooted or the
                // monitor was killed. Record that, once, so the answer stays the same.
                let exit = ExitRecord {
                    exit_code: 255,
                    signal: None,
                    oom_killed: false,
                    finished_at: Utc::now(),
                    reason: Some("container and its monitor vanished".to_string()),
                };
                write_json(&self.paths.exit(id), &exit)?;
                continue;
            }
            // The monitor is writing the exit record right now (or still draining output of
            // processes that inherited the init's stdio): it exits once the record is there.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                info.status = Status::Running;
                return Ok(info);
            }
            if let Some(m) = run.monitor {
                m.wait_gone(left);
            }
        }
    }

    /// Every container matching `filter`, sorted by creation time.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<ContainerInfo>, ContainerError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if filter
                .id_prefix
                .as_ref()
                .is_some_and(|p| !id.starts_with(p.as_str()))
            {
                continue;
            }
            match self.status(&id) {
                Ok(info) if filter.matches(&info) => out.push(info),
                Ok(_) => {}
                // Removed meanwhile, or a directory without a record (interrupted create).
                Err(ContainerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|c| c.record.created_at);
        Ok(out)
    }

    /// Blocks until the container has exited (or `timeout` passes); returns its exit record.
    pub fn wait(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitRecord>, ContainerError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let info = self.status(id)?;
            if info.exit.is_some() {
                return Ok(info.exit);
            }
            if info.status == Status::Unknown || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            // The monitor writes the exit record, then exits: block on its exit. A slice of
            // at most a second bounds the wait should the record be written some other way.
            let left = deadline.map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let slice = left.min(Duration::from_secs(1));
            let run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
            match (run.monitor.filter(|m| m.is_alive()), run.init) {
                (Some(monitor), _) => {
                    monitor.wait_gone(slice);
                }
                // The monitor was killed: the init's end is what status waits for.
                (None, Some(init)) => {
                    init.wait_gone(slice);
                }
                (None, None) => std::thread::sleep(slice.min(Duration::from_millis(25))),
            }
        }
    }
}
