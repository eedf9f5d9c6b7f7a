//! remove (RemovePodSandbox): removes the pod's containers (killing running ones), tears the
//! network down if stop did not, ends the keeper, unpins the namespaces, unmounts /dev/shm,
//! removes the cgroup and both directories, in that order, so nothing is left. Idempotent:
//! removing a pod that is gone succeeds.

use super::namespaces::{self, NsKind};
use super::network::PodNetwork;
use super::pod_stop::stop_keeper;
use super::state::PodRecord;
use super::{PodError, PodRuntime, cgroup, exists};
use crate::container::sys;
use crate::fsutil::{self, FsError};

impl PodRuntime {
    /// Removes a pod and everything of it; a pod that does not exist is success.
    pub fn remove(&self, id: &str, network: &dyn PodNetwork) -> Result<(), PodError> {
        let rec = match self.record(id) {
            Ok(r) => Some(r),
            Err(PodError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        if rec.is_none() && !exists(&self.paths.dir(id)) && !exists(&self.paths.run_dir(id)) {
            return Ok(());
        }
        for c in self.pod_containers(id)? {
            self.containers.remove(&c.record.id, true)?;
        }
        let mut rec = rec;
        if let Some(r) = rec.as_mut() {
            self.teardown_network(r, network)?;
        }
        self.remove_everything(id, rec.as_ref())
    }

    /// Removes whatever exists of a pod but its containers and network.
    pub(super) fn remove_everything(
        &self,
        id: &str,
        rec: Option<&PodRecord>,
    ) -> Result<(), PodError> {
        if let Some(r) = rec {
            stop_keeper(r);
        }
        let ns_err = |e: std::io::Error| PodError::Namespace {
            id: id.to_string(),
            reason: e.to_string(),
        };
        for kind in NsKind::ALL {
            namespaces::unpin(&self.paths.pin(id, kind)).map_err(ns_err)?;
        }
        let shm = self.paths.shm(id);
        if exists(&shm) {
            sys::unmount(&shm)
                .map_err(|e| FsError::new("unmount", &shm, e))
                .map_err(PodError::from)?;
        }
        if let Some(r) = rec {
            // A cgroup we named (`<parent>/pod-<id>`) is ours to remove whole; one the caller
            // named may hold other pods' containers.
            if r.config.cgroup_parent.is_some() {
                cgroup::remove_if_unused(&r.cgroup_parent)?;
            } else {
                cgroup::remove(&r.cgroup_parent)?;
            }
        }
        fsutil::remove_dir_all_if_exists(&self.paths.run_dir(id))?;
        fsutil::remove_dir_all_if_exists(&self.paths.dir(id))?;
        Ok(())
    }
}
