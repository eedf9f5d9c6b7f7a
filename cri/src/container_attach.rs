//! Attach: the streaming server's URL for the container's output. keel keeps no stdio stream
//! of a running container (its stdin is /dev/null, its output goes to the monitor, which
//! writes the CRI log file), so stdin and tty are refused with FailedPrecondition and output
//! is the log file followed from the moment of attaching (`streaming/attach.rs`).

use crate::container_start::existing_container;
use crate::service::CriService;
use crate::streaming::Pending;
use crate::{CriError, api};

pub(crate) async fn attach(
    svc: &CriService,
    mut req: api::AttachRequest,
) -> Result<api::AttachResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    if req.stdin || req.tty {
        return Err(CriError::FailedPrecondition(format!(
            "attach to container {id} with stdin or tty: keel keeps no stdin or terminal of a running container (stdin is /dev/null); attach for output only, or exec"
        )));
    }
    if !(req.stdout || req.stderr) {
        return Err(CriError::invalid(
            "stdout, stderr",
            "one of them must be set",
        ));
    }
    req.container_id = id;
    let url = svc.streaming.url(Pending::Attach(req)).ok_or_else(|| {
        CriError::FailedPrecondition("too many streaming requests wait for their connection".into())
    })?;
    Ok(api::AttachResponse { url })
}
