//! Exec: checks the request and answers the streaming server's URL for it (a single-use
//! token); the command starts when the client connects (`streaming/exec.rs`), with a
//! terminal when `tty` is set (kubectl exec -t).

use crate::container_start::existing_container;
use crate::service::CriService;
use crate::streaming::Pending;
use crate::{CriError, api};

pub(crate) async fn exec(
    svc: &CriService,
    mut req: api::ExecRequest,
) -> Result<api::ExecResponse, CriError> {
    if req.cmd.is_empty() {
        return Err(CriError::invalid("cmd", "empty"));
    }
    if req.tty && req.stderr {
        // The CRI spec: with a tty, stderr is merged into stdout and must not be asked for.
        return Err(CriError::invalid(
            "tty, stderr",
            "tty and stderr cannot both be true (a terminal merges stderr into stdout)",
        ));
    }
    if !(req.stdin || req.stdout || req.stderr) {
        return Err(CriError::invalid(
            "stdin, stdout, stderr",
            "one of them must be set",
        ));
    }
    let (id, _) = existing_container(svc, &req.container_id).await?;
    req.container_id = id;
    let url = svc.streaming.url(Pending::Exec(req)).ok_or_else(|| {
        CriError::FailedPrecondition("too many streaming requests wait for their connection".into())
    })?;
    Ok(api::ExecResponse { url })
}
