//! ContainerStatus: the container as the runtime reads it now: state, times (ns), exit code
//! and reason (OOMKilled / Completed / Error), image and image ref, log path, mounts and
//! resources. `verbose` adds the runtime record as JSON `info` (with the pid while running).

use std::collections::HashMap;

use crate::container_start::existing_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert};

pub(crate) async fn container_status(
    svc: &CriService,
    req: api::ContainerStatusRequest,
) -> Result<api::ContainerStatusResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    let containers = svc.containers().clone();
    blocking(move || {
        let info = containers.status(&id)?;
        let info_map = if req.verbose {
            HashMap::from([(
                "info".to_owned(),
                serde_json::to_string(&info).unwrap_or_default(),
            )])
        } else {
            HashMap::new()
        };
        Ok(api::ContainerStatusResponse {
            status: Some(container_convert::container_status(&info)),
            info: info_map,
        })
    })
    .await
}
