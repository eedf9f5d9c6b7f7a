//! StartContainer: starts a created container (its monitor releases the init).

use crate::container_events::Kind;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

/// Resolves a container id (or unique prefix) and its pod; `None` when there is no such
/// container (or it was not made through CRI: it has no pod).
pub(crate) async fn resolve_container(
    svc: &CriService,
    id: &str,
) -> Result<Option<(String, String)>, CriError> {
    if id.is_empty() {
        return Err(CriError::invalid("container_id", "empty"));
    }
    let containers = svc.containers().clone();
    let id = id.to_owned();
    blocking(move || {
        let id = match containers.resolve(&id) {
            Ok(id) => id,
            Err(keel_runtime::container::ContainerError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match containers.status(&id) {
            Ok(info) => Ok(info.record.config.pod_id.map(|pod| (id, pod))),
            Err(keel_runtime::container::ContainerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// Like [`resolve_container`], but an unknown container is NotFound.
pub(crate) async fn existing_container(
    svc: &CriService,
    id: &str,
) -> Result<(String, String), CriError> {
    resolve_container(svc, id)
        .await?
        .ok_or_else(|| CriError::NotFound {
            what: "container",
            id: id.to_owned(),
        })
}

pub(crate) async fn start_container(
    svc: &CriService,
    req: api::StartContainerRequest,
) -> Result<api::StartContainerResponse, CriError> {
    let (id, pod_id) = existing_container(svc, &req.container_id).await?;
    let _lock = svc.lock_pod(&pod_id).await;
    let pods = svc.pods.clone();
    let events = svc.events.clone();
    blocking(move || {
        pods.containers().start(&id)?;
        events.publish(&pods, &id, Some(&pod_id), Kind::Started);
        Ok(())
    })
    .await?;
    Ok(api::StartContainerResponse {})
}
