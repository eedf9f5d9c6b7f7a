//! ExecSync: runs a command in a running container and answers its output and exit code. A
//! command still running after `timeout` seconds is killed and the RPC fails with
//! DeadlineExceeded, which kubelet reads as a probe timeout.

use std::time::Duration;

use keel_runtime::container::ContainerError;

use crate::container_start::existing_container;
use crate::service::{CriService, blocking};
use crate::{CriError, api};

pub(crate) async fn exec_sync(
    svc: &CriService,
    req: api::ExecSyncRequest,
) -> Result<api::ExecSyncResponse, CriError> {
    if req.cmd.is_empty() {
        return Err(CriError::invalid("cmd", "empty"));
    }
    let (id, _) = existing_container(svc, &req.container_id).await?;
    let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));
    let containers = svc.containers().clone();
    blocking(move || {
        let r = containers.exec_sync(&id, &req.cmd, timeout)?;
        if r.timed_out {
            return Err(ContainerError::Timeout {
                id,
                op: "exec",
                secs: req.timeout as u64,
            }
            .into());
        }
        Ok(api::ExecSyncResponse {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        })
    })
    .await
}
