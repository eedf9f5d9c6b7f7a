//! Exec: checks the request and answers the streaming server's URL for it (a single-use
//! token); the command starts when the client connects (`streaming/exec.rs`). Not served: a
//! tty (kubectl exec -t), which needs a terminal keel-runtime does not allocate yet.

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
    if req.tty {
        return Err(CriError::invalid(
            "tty",
            "keel does not allocate a terminal for exec yet; exec without -t",
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
