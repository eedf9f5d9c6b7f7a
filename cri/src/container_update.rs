//! UpdateContainerResources: new CPU, memory, cpuset and hugepage limits, applied to the
//! container's cgroup and recorded (ContainerStatus shows them).

use crate::container_start::existing_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert};

pub(crate) async fn update_container_resources(
    svc: &CriService,
    req: api::UpdateContainerResourcesRequest,
) -> Result<api::UpdateContainerResourcesResponse, CriError> {
    let linux = req
        .linux
        .as_ref()
        .ok_or_else(|| CriError::invalid("linux", "missing"))?;
    let resources = container_convert::resources(linux);
    let (id, pod_id) = existing_container(svc, &req.container_id).await?;
    let _lock = svc.lock_pod(&pod_id).await;
    let containers = svc.containers().clone();
    blocking(move || Ok(containers.update(&id, &resources)?)).await?;
    Ok(api::UpdateContainerResourcesResponse {})
}
