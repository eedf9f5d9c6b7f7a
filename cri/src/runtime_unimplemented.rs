//! The RuntimeService RPCs keel does not serve yet (pods, containers, streaming, stats, events,
//! checkpoints): each answers gRPC UNIMPLEMENTED with a message naming the RPC and saying why,
//! never a fake success. Kubelet handles UNIMPLEMENTED for the optional RPCs
//! (ListMetricDescriptors, ListPodSandboxMetrics, GetContainerEvents) by falling back; for the
//! pod and container RPCs it reports the error, which is the truth until the runtime issue lands.
//!
//! When an RPC gets served, its name leaves [`reason`] and gets a file of its own.

use std::future::Ready;

use crate::CriError;

/// Why `rpc` is not served, as the second half of its UNIMPLEMENTED message.
pub(crate) fn reason(rpc: &str) -> &'static str {
    match rpc {
        "RunPodSandbox" | "StopPodSandbox" | "RemovePodSandbox" | "PodSandboxStatus"
        | "ListPodSandbox" => "pod sandboxes land with the runtime issue",
        "CreateContainer"
        | "StartContainer"
        | "StopContainer"
        | "RemoveContainer"
        | "ListContainers"
        | "ContainerStatus"
        | "UpdateContainerResources"
        | "ReopenContainerLog" => "containers land with the runtime issue",
        "ExecSync" | "Exec" | "Attach" | "PortForward" => {
            "exec, attach and port-forward land with the runtime issue"
        }
        "ContainerStats"
        | "ListContainerStats"
        | "PodSandboxStats"
        | "ListPodSandboxStats"
        | "ListMetricDescriptors"
        | "ListPodSandboxMetrics" => "pod and container stats land with the runtime issue",
        "GetContainerEvents" => "container events land with the runtime issue",
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
        let e = reject::<(), ()>("RunPodSandbox")(()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "RunPodSandbox: pod sandboxes land with the runtime issue"
        );
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = reject::<(), ()>("ExecSync")(()).await.unwrap_err();
        assert!(e.to_string().starts_with("ExecSync: exec"), "{e}");
    }
}
