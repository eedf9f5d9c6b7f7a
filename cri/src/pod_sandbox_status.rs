//! PodSandboxStatus: the pod as the runtime reads it now (state derived from its records and
//! pins), with its IPs, namespace modes, labels and annotations, and the statuses of its
//! containers (for kubelet's evented PLEG). `verbose` adds the runtime record as JSON `info`.

use std::collections::HashMap;

use keel_runtime::pod::PodError;

use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert, pod_convert};

pub(crate) async fn pod_sandbox_status(
    svc: &CriService,
    req: api::PodSandboxStatusRequest,
) -> Result<api::PodSandboxStatusResponse, CriError> {
    if req.pod_sandbox_id.is_empty() {
        return Err(CriError::invalid("pod_sandbox_id", "empty"));
    }
    let pods = svc.pods.clone();
    blocking(move || {
        let not_found = || CriError::NotFound {
            what: "pod sandbox",
            id: req.pod_sandbox_id.clone(),
        };
        let id = match pods.resolve(&req.pod_sandbox_id) {
            Ok(id) => id,
            Err(PodError::NotFound(_)) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        let info = match pods.status(&id) {
            Ok(i) => i,
            Err(PodError::NotFound(_)) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        let containers = pods
            .pod_containers(&id)?
            .iter()
            .filter(|c| container_convert::meta(&c.record.config).is_some())
            .map(container_convert::container_status)
            .collect();
        let info_map = if req.verbose {
            HashMap::from([(
                "info".to_owned(),
                serde_json::to_string(&info.record).unwrap_or_default(),
            )])
        } else {
            HashMap::new()
        };
        Ok(api::PodSandboxStatusResponse {
            status: Some(pod_convert::pod_status(&info)),
            info: info_map,
            containers_statuses: containers,
            timestamp: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        })
    })
    .await
}
