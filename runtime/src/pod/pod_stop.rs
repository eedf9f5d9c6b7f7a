//! stop (StopPodSandbox): stops the pod's containers (stop signal, grace, SIGKILL), tears its
//! network down, ends the PID keeper, and records the pod NotReady. Idempotent: stopping a
//! stopped pod does nothing and succeeds; a failed network teardown is retried next time.

use std::time::{Duration, Instant};

use super::network::PodNetwork;
use super::state::{PodRecord, PodState};
use super::{PodError, PodRuntime};
use crate::container::{ListFilter, Status};

impl PodRuntime {
    /// Stops a pod: its containers get `grace` after their stop signal before SIGKILL.
    pub fn stop(
        &self,
        id: &str,
        grace: Duration,
        network: &dyn PodNetwork,
    ) -> Result<(), PodError> {
        let mut rec = self.record(id)?;
        for c in self.pod_containers(id)? {
            if matches!(c.status, Status::Created | Status::Running) {
                self.containers.stop(&c.record.id, grace)?;
            }
        }
        self.teardown_network(&mut rec, network)?;
        stop_keeper(&rec);
        if rec.state != PodState::NotReady {
            rec.state = PodState::NotReady;
            rec.stopped_at = Some(chrono::Utc::now());
            self.write_record(&rec)?;
        }
        Ok(())
    }

    /// Every container of the pod, whatever its status.
    pub fn pod_containers(
        &self,
        id: &str,
    ) -> Result<Vec<crate::container::ContainerInfo>, PodError> {
        Ok(self.containers.list(&ListFilter {
            pod_id: Some(id.to_string()),
            ..Default::default()
        })?)
    }

    /// Calls the hook's teardown once per successful setup, and records that it happened.
    pub(super) fn teardown_network(
        &self,
        rec: &mut PodRecord,
        network: &dyn PodNetwork,
    ) -> Result<(), PodError> {
        if !rec.network_ready {
            return Ok(());
        }
        if let Some(netns) = rec.netns().map(|p| p.to_owned()) {
            network
                .teardown(rec, &netns)
                .map_err(|e| PodError::Network {
                    id: rec.id.clone(),
                    op: "teardown",
                    reason: e.to_string(),
                })?;
        }
        rec.network_ready = false;
        self.write_record(rec)
    }
}

/// Kills the PID namespace's init (and with it every process left in the namespace) and
/// waits a little for it to go.
pub(super) fn stop_keeper(rec: &PodRecord) {
    let Some(keeper) = rec.keeper else { return };
    if !keeper.is_alive() {
        return;
    }
    let _ = keeper.signal(9);
    let deadline = Instant::now() + Duration::from_secs(2);
    while keeper.is_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}
