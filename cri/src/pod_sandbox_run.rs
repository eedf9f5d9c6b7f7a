//! RunPodSandbox: translates the sandbox config ([`pod_convert::pod_config`]), refuses a
//! reused metadata with AlreadyExists naming the holder, and runs the pod through keel-runtime
//! with CNI as its network ([`CniExec`]). A pod on its own network needs a CNI config: without
//! one the RPC fails with FailedPrecondition naming the conf dir (kubelet shows it in the pod's
//! events) rather than running a pod nothing can reach. Host-network pods skip CNI.

use crate::cni_exec::CniExec;
use crate::service::{CriService, blocking};
use crate::{CriError, api, cni_config, pod_convert};

pub(crate) async fn run_pod_sandbox(
    svc: &CriService,
    req: api::RunPodSandboxRequest,
) -> Result<api::RunPodSandboxResponse, CriError> {
    if !req.runtime_handler.is_empty() {
        return Err(CriError::invalid(
            "runtime_handler",
            format!(
                "{:?}: keel has only the default runtime handler",
                req.runtime_handler
            ),
        ));
    }
    let config = pod_convert::pod_config(req.config.as_ref())?;
    let _name = svc.lock_name(&config.name).await;
    let pods = svc.pods.clone();
    let conf_dir = svc.settings.cni_conf_dir.clone();
    let bin_dir = svc.settings.cni_bin_dir.clone();
    let id = blocking(move || {
        if let Ok(holder) = pods.resolve(&config.name)
            && pods
                .record(&holder)
                .is_ok_and(|r| r.config.name == config.name)
        {
            return Err(CriError::AlreadyExists {
                what: "pod sandbox",
                name: config.name.clone(),
                id: holder,
            });
        }
        let list = if config.host.network {
            None
        } else {
            let network = cni_config::load(&conf_dir).map_err(|e| {
                CriError::FailedPrecondition(format!(
                    "pod network is not ready: no usable CNI config in {}: {e}",
                    conf_dir.display()
                ))
            })?;
            Some(network.list)
        };
        let cni = CniExec { bin_dir, list };
        Ok(pods.run(&config, &cni)?)
    })
    .await?;
    tracing::info!(pod = %id, "pod sandbox ready");
    Ok(api::RunPodSandboxResponse { pod_sandbox_id: id })
}
