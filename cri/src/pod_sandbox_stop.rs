//! StopPodSandbox: stops the pod's containers at once (kubelet stopped them gracefully
//! before, as containerd assumes), CNI DEL, the PID keeper; the pod becomes NOTREADY.
//! Idempotent, and an unknown pod is stopped already (CRI).

use std::time::Duration;

use keel_runtime::container::Status;
use keel_runtime::pod::PodError;

use crate::cni_exec::CniExec;
use crate::container_events::Kind;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

/// Resolves a pod id (or unique prefix); `None` when there is no such pod.
pub(crate) async fn resolve_pod(svc: &CriService, id: &str) -> Result<Option<String>, CriError> {
    if id.is_empty() {
        return Err(CriError::invalid("pod_sandbox_id", "empty"));
    }
    let pods = svc.pods.clone();
    let id = id.to_owned();
    blocking(move || match pods.resolve(&id) {
        Ok(id) => Ok(Some(id)),
        Err(PodError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    })
    .await
}

/// A CNI runner for teardown: the pod's stored network, else the current config.
pub(crate) fn teardown_cni(svc: &CriService) -> CniExec {
    CniExec {
        bin_dir: svc.settings.cni_bin_dir.clone(),
        list: crate::cni_config::load(&svc.settings.cni_conf_dir)
            .ok()
            .map(|n| n.list),
    }
}

pub(crate) async fn stop_pod_sandbox(
    svc: &CriService,
    req: api::StopPodSandboxRequest,
) -> Result<api::StopPodSandboxResponse, CriError> {
    let Some(id) = resolve_pod(svc, &req.pod_sandbox_id).await? else {
        return Ok(api::StopPodSandboxResponse {});
    };
    let _lock = svc.lock_pod(&id).await;
    let pods = svc.pods.clone();
    let cni = teardown_cni(svc);
    let events = svc.events.clone();
    blocking(move || {
        let running: Vec<String> = pods
            .pod_containers(&id)?
            .into_iter()
            .filter(|c| matches!(c.status, Status::Created | Status::Running))
            .map(|c| c.record.id)
            .collect();
        match pods.stop(&id, Duration::ZERO, &cni) {
            Ok(()) | Err(PodError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        for c in running {
            events.publish(&pods, &c, Some(&id), Kind::Stopped);
        }
        Ok(())
    })
    .await?;
    Ok(api::StopPodSandboxResponse {})
}
