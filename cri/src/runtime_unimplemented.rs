//! The RuntimeService RPCs keel does not serve (checkpoints, metric descriptors): each answers gRPC UNIMPLEMENTED with a message naming the
//! RPC and saying why, never a fake success. Kubelet handles UNIMPLEMENTED for the optional
//! RPCs (ListMetricDescriptors, ListPodSandboxMetrics) by falling back; `kubectl exec` reports it.
//!
//! When an RPC gets served, its name leaves [`reason`] and gets a file of its own.

use std::future::Ready;

use crate::CriError;

/// Why `rpc` is not served, as the second half of its UNIMPLEMENTED message.
pub(crate) fn reason(rpc: &str) -> &'static str {
    match rpc {
        "ListMetricDescriptors" | "ListPodSandboxMetrics" => {
            "pod and container metrics are served as stats (ContainerStats, PodSandboxStats)"
        }
        "CheckpointContainer" => "container checkpoints are not supported",
        _ => "not served by keel",
    }
}

/// The handler of an RPC keel does not serve: every request gets UNIMPLEMENTED naming `rpc`.
pub(crate) fn reject<Req, Resp>(
    rpc: &'static str,
) -> impl FnOnce(Req) -> Ready<Result<Resp, CriError>> {
    move |_| {
        std::future::ready(Err(CriError::Unimplemented {
            rpc,
            reason: reason(rpc),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_message_names_the_rpc_and_the_reason() {
        let e = reject::<(), ()>("ListMetricDescriptors")(())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ListMetricDescriptors: pod and container metrics are served as stats (ContainerStats, PodSandboxStats)"
        );
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = reject::<(), ()>("CheckpointContainer")(())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
