//! Attach: the streaming server's URL for the container's stdio. A container created with
//! `stdin` or `tty` is attached live through its monitor (keel-runtime's `attach`); for one
//! created without, stdin and tty are refused with FailedPrecondition (its stdin is /dev/null)
//! and its output is the log file followed from the moment of attaching (`streaming/attach.rs`).

use crate::container_start::existing_container;
use crate::service::CriService;
use crate::streaming::Pending;
use crate::{CriError, api};

pub(crate) async fn attach(
    svc: &CriService,
    mut req: api::AttachRequest,
) -> Result<api::AttachResponse, CriError> {
    let (id, _) = existing_container(svc, &req.container_id).await?;
    let containers = svc.containers().clone();
    let cid = id.clone();
    let cfg = tokio::task::spawn_blocking(move || containers.status(&cid))
        .await??
        .record
        .config;
    if req.stdin && !cfg.stdin {
        return Err(CriError::FailedPrecondition(format!(
            "attach to container {id} with stdin: it was created without stdin (its stdin is /dev/null)"
        )));
    }
    if req.tty != cfg.tty {
        return Err(CriError::invalid(
            "tty",
            format!(
                "container {id} was created {} a tty",
                if cfg.tty { "with" } else { "without" }
            ),
        ));
    }
    if req.tty && req.stderr {
        return Err(CriError::invalid(
            "tty, stderr",
            "tty and stderr cannot both be true (a terminal merges stderr into stdout)",
        ));
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
