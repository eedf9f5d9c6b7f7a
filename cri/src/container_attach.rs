//! Attach: refused with FailedPrecondition. A keel container's stdin is /dev/null and its
//! stdout and stderr go to its monitor, which writes the CRI log file and keeps no stream to
//! attach to; reading output is `crictl logs -f` (ContainerStatus' log path). Checked first:
//! the container exists (NotFound otherwise).

use crate::container_start::existing_container;
use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn attach(
    svc: &CriService,
    req: api::AttachRequest,
) -> Result<api::AttachResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    Err(CriError::FailedPrecondition(format!(
        "attach to container {id}: keel keeps no stdio stream of a running container (stdin is /dev/null, output goes to the log file); use the container log (crictl logs -f) or exec"
    )))
}
