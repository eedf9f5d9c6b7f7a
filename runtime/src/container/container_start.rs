//! start: tells the created container's init (waiting in libcontainer) to exec the process,
//! and records the start time. No process is spawned here, so any thread may call it.
//!
//! libcontainer's own `Container::start` reaches the init's notify socket by a `chdir` into
//! the container's directory and back: the working directory is process-wide, so in a
//! multi-threaded daemon a monitor spawned by another thread meanwhile inherits that directory
//! (and fails with "failed to get cwd" once it is removed). Here the socket is reached through
//! an `O_PATH` descriptor of the directory (`/proc/self/fd/N/notify.sock`), which keeps the
//! path short without touching the cwd; then libcontainer's state is saved as its start does.
//! Poststart hooks are not run: keel's specs carry no hooks (`spec.rs` clears them).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use libcontainer::container::{Container, ContainerStatus};

use super::state::{RunState, read_json, write_json};
use super::{ContainerError, ContainerRuntime, Status};

/// The socket libcontainer's init listens on, in the container's libcontainer directory.
const NOTIFY_FILE: &str = "notify.sock";

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
        container.refresh_status().map_err(|e| lib(e.to_string()))?;
        if !container.can_start() {
            return Err(lib(format!(
                "libcontainer state is {:?}, not created",
                container.status()
            )));
        }
        // Recorded first: once started, the init may exit (and the monitor write exit.json)
        // before this call returns.
        let mut run: RunState = read_json(&self.paths.run_state(id))?.unwrap_or_default();
        run.started_at = Some(chrono::Utc::now());
        write_json(&self.paths.run_state(id), &run)?;
        notify_start(&container.root).map_err(lib)?;
        container
            .set_status(ContainerStatus::Running)
            .save()
            .map_err(|e| lib(format!("save state: {e}")))
    }
}

/// Sends libcontainer's "start container" message to the init waiting on `dir`/notify.sock.
fn notify_start(dir: &Path) -> Result<(), String> {
    let handle = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| format!("open {}: {e}", dir.display()))?;
    let via = format!("/proc/self/fd/{}/{NOTIFY_FILE}", handle.as_raw_fd());
    let mut stream = UnixStream::connect(&via)
        .map_err(|e| format!("connect {}/{NOTIFY_FILE}: {e}", dir.display()))?;
    stream
        .write_all(b"start container")
        .map_err(|e| format!("write {}/{NOTIFY_FILE}: {e}", dir.display()))
}
