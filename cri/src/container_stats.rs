//! ContainerStats: CPU (cumulative, and nanocores since the previous sample), memory usage
//! and working set, read from the container's cgroup, and the writable layer's usage.

use std::path::Path;

use keel_runtime::container::{ContainerInfo, ContainerRuntime};

use crate::container_start::existing_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert};

/// Bytes used under `dir` (the container's overlay upper dir), not following symlinks.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// One container's stats (blocking). The CPU sample is recorded in `svc` by the caller.
pub(crate) fn sample(
    containers: &ContainerRuntime,
    info: &ContainerInfo,
) -> Result<(keel_runtime::container::ContainerStats, u64), CriError> {
    let s = containers.stats(&info.record.id)?;
    let upper = containers.container_dir(&info.record.id).join("upper");
    Ok((s, du(&upper)))
}

/// Stats of `infos` as CRI shows them, nanocores from the previous samples.
pub(crate) async fn stats_of(
    svc: &CriService,
    infos: Vec<ContainerInfo>,
) -> Result<Vec<api::ContainerStats>, CriError> {
    let containers = svc.containers().clone();
    let samples = blocking(move || {
        let mut out = Vec::new();
        for info in infos {
            match sample(&containers, &info) {
                Ok((s, used)) => out.push((info, s, used)),
                // Removed meanwhile: not listed.
                Err(CriError::Container(keel_runtime::container::ContainerError::NotFound(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((containers, out))
    })
    .await?;
    let (containers, samples) = samples;
    Ok(samples
        .iter()
        .map(|(info, s, used)| {
            let ts = s.timestamp.timestamp_nanos_opt().unwrap_or(0);
            let cores = svc.cpu_sample(&info.record.id, ts, s.usage.cpu_usage_ns);
            let upper = containers.container_dir(&info.record.id).join("upper");
            container_convert::container_stats(info, s, cores, Some((&upper, *used)))
        })
        .collect())
}

pub(crate) async fn container_stats(
    svc: &CriService,
    req: api::ContainerStatsRequest,
) -> Result<api::ContainerStatsResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    let containers = svc.containers().clone();
    let info = blocking(move || Ok(containers.status(&id)?)).await?;
    let stats = stats_of(svc, vec![info]).await?.pop();
    Ok(api::ContainerStatsResponse { stats })
}
