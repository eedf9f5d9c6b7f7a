//! stop: the stop signal, a grace period, then SIGKILL for the init and anything left in the
//! container's cgroup. Returns when the monitor has recorded the exit.

use std::time::{Duration, Instant};

use super::state::{ExitRecord, RunState, read_json};
use super::{ContainerError, ContainerRuntime, Status, cgroups};

const SIGKILL: i32 = 9;

impl ContainerRuntime {
    /// Stops a container; a container that is not running is left as it is.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<ExitRecord, ContainerError> {
        let info = self.status(id)?;
        if let Some(exit) = info.exit {
            return Ok(exit);
        }
        let run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
        let Some(init) = run.init else {
            return Err(ContainerError::InvalidState {
                id: id.to_string(),
                op: "stop",
                status: info.status.to_string(),
            });
        };
        let signal_err = |e: std::io::Error| ContainerError::Libcontainer {
            id: id.to_string(),
            op: "signal",
            reason: e.to_string(),
        };
        // A created container's init has not run the workload: nothing to be graceful to.
        if info.status == Status::Running && !grace.is_zero() {
            init.signal(info.record.stop_signal).map_err(signal_err)?;
            if let Some(exit) = self.wait_exit(id, grace)? {
                return Ok(exit);
            }
        }
        init.signal(SIGKILL).map_err(signal_err)?;
        for pid in cgroups::pids(&info.record.cgroups_path) {
            // Processes outside the init's pid namespace (host pid mode) survive the init.
            let _ = rustix::process::Pid::from_raw(pid)
                .map(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL));
        }
        let secs = 10;
        self.wait_exit(id, Duration::from_secs(secs))?
            .ok_or(ContainerError::Timeout {
                id: id.to_string(),
                op: "stop",
                secs,
            })
    }

    fn wait_exit(&self, id: &str, timeout: Duration) -> Result<Option<ExitRecord>, ContainerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = read_json::<ExitRecord>(&self.paths.exit(id))? {
                return Ok(Some(exit));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            // Status also covers a vanished monitor (it writes the exit record then).
            if self.status(id)?.exit.is_some() {
                continue;
            }
            // The monitor exits right after writing the record: block on that.
            let left = deadline.saturating_duration_since(Instant::now());
            let run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
            match (run.monitor.filter(|m| m.is_alive()), run.init) {
                (Some(monitor), _) => {
                    monitor.wait_gone(left);
                }
                (None, Some(init)) => {
                    init.wait_gone(left);
                }
                (None, None) => std::thread::sleep(left.min(Duration::from_millis(20))),
            }
        }
    }
}
