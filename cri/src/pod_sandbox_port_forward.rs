//! PortForward: checks the pod and answers the streaming server's URL for it (a single-use
//! token); connections to the pod's ports are made when the client connects
//! (`streaming/port_forward.rs`).

use crate::pod_sandbox_stop::resolve_pod;
use crate::service::CriService;
use crate::streaming::Pending;
use crate::{CriError, api};

pub(crate) async fn port_forward(
    svc: &CriService,
    mut req: api::PortForwardRequest,
) -> Result<api::PortForwardResponse, CriError> {
    if let Some(p) = req
        .port
        .iter()
        .find(|p| u16::try_from(**p).is_err() || **p == 0)
    {
        return Err(CriError::invalid("port", format!("{p} is not a TCP port")));
    }
    let id = resolve_pod(svc, &req.pod_sandbox_id)
        .await?
        .ok_or_else(|| CriError::NotFound {
            what: "pod sandbox",
            id: req.pod_sandbox_id.clone(),
        })?;
    req.pod_sandbox_id = id;
    let url = svc
        .streaming
        .url(Pending::PortForward(req))
        .ok_or_else(|| {
            CriError::FailedPrecondition(
                "too many streaming requests wait for their connection".into(),
            )
        })?;
    Ok(api::PortForwardResponse { url })
}
