//! ListPodSandbox: every pod the runtime has on disk (so a restarted daemon lists what the
//! previous one ran), filtered by id prefix, state and labels.

use crate::service::{CriService, blocking};
use crate::{CriError, api, pod_convert};

pub(crate) async fn list_pod_sandbox(
    svc: &CriService,
    req: api::ListPodSandboxRequest,
) -> Result<api::ListPodSandboxResponse, CriError> {
    let pods = svc.pods.clone();
    blocking(move || {
        let f = req.filter.as_ref();
        let items = pods
            .list(&pod_convert::pod_filter(f))?
            .iter()
            .filter(|p| pod_convert::state_matches(f, p))
            .map(pod_convert::pod_sandbox)
            .collect();
        Ok(api::ListPodSandboxResponse { items })
    })
    .await
}
