//! RemoveContainer: kills the container if it still runs and removes it with its rootfs and
//! state (its log file stays: kubelet owns the log directory). Removing an unknown container
//! succeeds (CRI).

use keel_runtime::container::{ContainerError, Status};

use crate::container_events::Kind;
use crate::container_start::resolve_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn remove_container(
    svc: &CriService,
    req: api::RemoveContainerRequest,
) -> Result<api::RemoveContainerResponse, CriError> {
    let Some((id, pod_id)) = resolve_container(svc, &req.container_id).await? else {
        return Ok(api::RemoveContainerResponse {});
    };
    let lock = svc.lock_pod(&pod_id).await;
    let pods = svc.pods.clone();
    let events = svc.events.clone();
    let cid = id.clone();
    blocking(move || {
        let containers = pods.containers();
        let running = containers
            .status(&cid)
            .is_ok_and(|i| matches!(i.status, Status::Created | Status::Running));
        match containers.remove(&cid, true) {
            Ok(()) | Err(ContainerError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if running {
            events.publish(&pods, &cid, Some(&pod_id), Kind::Stopped);
        }
        events.publish(&pods, &cid, Some(&pod_id), Kind::Deleted);
        Ok(())
    })
    .await?;
    drop(lock);
    svc.forget_cpu_sample(&id);
    Ok(api::RemoveContainerResponse {})
}
