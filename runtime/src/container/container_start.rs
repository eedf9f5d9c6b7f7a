//! start: tells the created container's init (waiting in libcontainer) to exec the process,
//! and records the start time. No process is spawned here, so any thread may call it.

use libcontainer::container::Container;

use super::state::{RunState, read_json, write_json};
use super::{ContainerError, ContainerRuntime, Status};

impl ContainerRuntime {
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let info = self.status(id)?;
        if info.status != Status::Created {
            return Err(ContainerError::InvalidState {
                id: id.to_string(),
                op: "start",
                status: info.status.to_string(),
            });
        }
        let lib = |reason: String| ContainerError::Libcontainer {
            id: id.to_string(),
            op: "start",
            reason,
        };
        let mut container =
            Container::load(self.paths.libcontainer(id)).map_err(|e| lib(e.to_string()))?;
        // Recorded first: once started, the init may exit (and the monitor write exit.json)
        // before this call returns.
        let mut run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
        run.started_at = Some(chrono::Utc::now());
        write_json(&self.paths.run_state(id), &run)?;
        container.start().map_err(|e| lib(e.to_string()))
    }
}
