//! ListContainerStats: [`crate::container_stats`] for every running CRI container matching the
//! filter (id prefix, pod id prefix, labels); exited containers have no cgroup to read.

use keel_runtime::container::Status;

use crate::container_list::{in_pod, list_filter};
use crate::container_stats::stats_of;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn list_container_stats(
    svc: &CriService,
    req: api::ListContainerStatsRequest,
) -> Result<api::ListContainerStatsResponse, CriError> {
    let f = req.filter.unwrap_or_default();
    let containers = svc.containers().clone();
    let infos = blocking(move || {
        let filter = list_filter(
            &f.id,
            Some(api::ContainerState::ContainerRunning as i32),
            &f.label_selector,
        );
        Ok(containers
            .list(&filter)?
            .into_iter()
            .filter(|c| c.status == Status::Running && in_pod(c, &f.pod_sandbox_id))
            .collect())
    })
    .await?;
    Ok(api::ListContainerStatsResponse {
        stats: stats_of(svc, infos).await?,
    })
}
