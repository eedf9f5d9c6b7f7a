//! ListPodSandboxStats: [`crate::pod_sandbox_stats`] for every ready pod matching the filter
//! (id prefix, labels).

use keel_runtime::pod::{PodFilter, PodState};

use crate::pod_sandbox_stats::pod_stats;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn list_pod_sandbox_stats(
    svc: &CriService,
    req: api::ListPodSandboxStatsRequest,
) -> Result<api::ListPodSandboxStatsResponse, CriError> {
    let f = req.filter.unwrap_or_default();
    let pods = svc.pods.clone();
    let infos = blocking(move || {
        Ok(pods.list(&PodFilter {
            id_prefix: (!f.id.is_empty()).then_some(f.id),
            state: Some(PodState::Ready),
            labels: f.label_selector.into_iter().collect(),
        })?)
    })
    .await?;
    let mut stats = Vec::with_capacity(infos.len());
    for info in infos {
        stats.push(pod_stats(svc, info).await?);
    }
    Ok(api::ListPodSandboxStatsResponse { stats })
}
