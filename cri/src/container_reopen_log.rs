//! ReopenContainerLog: the container's monitor reopens its log file (after kubelet rotated
//! it). Only a running container has a monitor writing the log: otherwise FailedPrecondition.

use crate::container_start::existing_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn reopen_container_log(
    svc: &CriService,
    req: api::ReopenContainerLogRequest,
) -> Result<api::ReopenContainerLogResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    let containers = svc.containers().clone();
    blocking(move || {
        let info = containers.status(&id)?;
        if info.status != keel_runtime::container::Status::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {id} is not running ({}): no log to reopen",
                info.status
            )));
        }
        Ok(containers.reopen_log(&id)?)
    })
    .await?;
    Ok(api::ReopenContainerLogResponse {})
}
