//! StopContainer: the stop signal, `timeout` seconds, then SIGKILL. Stopping an exited or
//! unknown container succeeds (CRI).

use std::time::Duration;

use keel_runtime::container::Status;

use crate::container_events::Kind;
use crate::container_start::resolve_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn stop_container(
    svc: &CriService,
    req: api::StopContainerRequest,
) -> Result<api::StopContainerResponse, CriError> {
    let Some((id, pod_id)) = resolve_container(svc, &req.container_id).await? else {
        return Ok(api::StopContainerResponse {});
    };
    let grace = Duration::from_secs(req.timeout.max(0) as u64);
    let _lock = svc.lock_pod(&pod_id).await;
    let pods = svc.pods.clone();
    let events = svc.events.clone();
    blocking(move || {
        let containers = pods.containers();
        let info = match containers.status(&id) {
            Ok(i) => i,
            Err(keel_runtime::container::ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if matches!(info.status, Status::Created | Status::Running) {
            containers.stop(&id, grace)?;
        }
        events.publish(&pods, &id, Some(&pod_id), Kind::Stopped);
        Ok(())
    })
    .await?;
    Ok(api::StopContainerResponse {})
}
