//! remove: kills the container if asked to, waits for its monitor, then removes
//! libcontainer's state, the cgroup, the rootfs mount and the container's directory, in that
//! order, so nothing is left: no mount, no cgroup, no directory.

use std::time::{Duration, Instant};

use libcontainer::container::Container;

use super::container_create::phase;
use super::state::{ContainerRecord, RunState, read_json};
use super::{ContainerError, ContainerRuntime, Status, cgroups, rootfs};

impl ContainerRuntime {
    /// Removes a container. A created or running one needs `force` (it is killed first).
    pub fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let info = self.status(id)?;
        if matches!(info.status, Status::Created | Status::Running) {
            if !force {
                return Err(ContainerError::InvalidState {
                    id: id.to_string(),
                    op: "remove",
                    status: info.status.to_string(),
                });
            }
            self.stop(id, Duration::ZERO)?;
        }
        self.remove_everything(id)
    }

    /// Removes whatever exists of a container, whatever state it is in.
    pub(super) fn remove_everything(&self, id: &str) -> Result<(), ContainerError> {
        let t = Instant::now();
        let run: RunState = read_json(&self.paths.run_state(id))
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Some(monitor) = run.monitor
            && !monitor.wait_gone(Duration::from_secs(5))
        {
            let _ = monitor.signal(9);
        }
        phase(id, "remove: monitor exit", t);
        let t = Instant::now();
        let libdir = self.paths.libcontainer(id);
        // With the init gone, libcontainer's delete only removes the cgroup (done below) and
        // its state directory; it is needed for an init that still exists (a create that
        // failed half way, a monitor that was killed).
        let init_alive = run.init.is_some_and(|p| p.is_alive());
        if init_alive && libdir.exists() {
            match Container::load(libdir.clone()) {
                Ok(mut c) => {
                    if let Err(e) = c.delete(true) {
                        tracing::warn!(%id, error = %e, "libcontainer delete");
                    }
                }
                Err(e) => tracing::warn!(%id, error = %e, "libcontainer load"),
            }
        }
        crate::fsutil::remove_dir_all_if_exists(&libdir)?;
        phase(id, "remove: libcontainer delete", t);
        let t = Instant::now();
        let record: Option<ContainerRecord> = read_json(&self.paths.record(id)).ok().flatten();
        if let Some(rec) = &record {
            cgroups::remove(&rec.cgroups_path)?;
            // A pod's cgroup belongs to the pod: it outlives its containers.
            if rec.config.pod_id.is_none() {
                cgroups::remove_empty_parent(&rec.cgroups_path);
            }
        }
        phase(id, "remove: cgroups", t);
        let t = Instant::now();
        rootfs::unmount(&self.paths.rootfs(id))?;
        phase(id, "remove: unmount", t);
        let t = Instant::now();
        crate::fsutil::remove_dir_all_if_exists(&self.paths.dir(id))?;
        phase(id, "remove: dir", t);
        Ok(())
    }
}
