//! RemovePodSandbox: removes the pod's containers (killing running ones), tears the network
//! down if StopPodSandbox did not, and removes the pins, /dev/shm, cgroup and state. An unknown
//! pod is removed already (CRI).

use keel_runtime::container::Status;
use keel_runtime::pod::PodError;

use crate::container_events::Kind;
use crate::pod_sandbox_stop::{resolve_pod, teardown_cni};
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn remove_pod_sandbox(
    svc: &CriService,
    req: api::RemovePodSandboxRequest,
) -> Result<api::RemovePodSandboxResponse, CriError> {
    let Some(id) = resolve_pod(svc, &req.pod_sandbox_id).await? else {
        return Ok(api::RemovePodSandboxResponse {});
    };
    let lock = svc.lock_pod(&id).await;
    let pods = svc.pods.clone();
    let cni = teardown_cni(svc);
    let events = svc.events.clone();
    let pod_id = id.clone();
    let removed = blocking(move || {
        let containers = pods.pod_containers(&pod_id)?;
        for c in &containers {
            if matches!(c.status, Status::Created | Status::Running) {
                events.publish(&pods, &c.record.id, Some(&pod_id), Kind::Stopped);
            }
        }
        match pods.remove(&pod_id, &cni) {
            Ok(()) | Err(PodError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        for c in &containers {
            events.publish(&pods, &c.record.id, Some(&pod_id), Kind::Deleted);
        }
        Ok(containers
            .into_iter()
            .map(|c| c.record.id)
            .collect::<Vec<_>>())
    })
    .await?;
    for c in removed {
        svc.forget_cpu_sample(&c);
    }
    drop(lock);
    svc.forget_pod(&id);
    tracing::info!(pod = %id, "pod sandbox removed");
    Ok(api::RemovePodSandboxResponse {})
}
