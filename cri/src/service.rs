//! The CRI services' shared state and the two tonic trait impls.
//!
//! Each trait method is one call to [`instrument::unary`] with the RPC's name and its handler
//! from the RPC's own file, nothing else: the instrumentation layer cannot be bypassed, and the
//! behaviour of an RPC is found in the file named after it.

use std::path::PathBuf;
use std::sync::RwLock;

use keel_runtime::ImageStore;
use keel_runtime::image::RegistryOptions;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::api;
use crate::api::image_service_server::ImageService;
use crate::api::runtime_service_server::RuntimeService;
use crate::instrument::{Metrics, unary};
use crate::runtime_unimplemented::reject;
use crate::{
    image_fs_info, image_list, image_pull, image_remove, image_status, runtime_config,
    runtime_status, runtime_version, update_runtime_config,
};

type Rpc<T> = Result<Response<T>, Status>;

/// Settings the RuntimeService reports (Status verbose info) and acts on.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Shown without credentials.
    pub registry: RegistryOptions,
}

/// What every RPC handler gets: the image store, the settings, and the little state CRI keeps
/// in memory.
pub(crate) struct CriService {
    pub images: ImageStore,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Pod CIDRs from the last UpdateRuntimeConfig (kubelet sends the node's `spec.podCIDRs`).
    pod_cidrs: RwLock<Vec<String>>,
}

impl CriService {
    pub fn new(images: ImageStore, metrics: Metrics, settings: Settings) -> Self {
        CriService {
            images,
            metrics,
            settings,
            pod_cidrs: RwLock::default(),
        }
    }

    pub fn pod_cidrs(&self) -> Vec<String> {
        // A poisoned lock only means a writer panicked between two plain assignments.
        self.pod_cidrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_pod_cidrs(&self, cidrs: Vec<String>) {
        *self.pod_cidrs.write().unwrap_or_else(|p| p.into_inner()) = cidrs;
    }
}

#[tonic::async_trait]
impl ImageService for CriService {
    async fn list_images(
        &self,
        r: Request<api::ListImagesRequest>,
    ) -> Rpc<api::ListImagesResponse> {
        unary(&self.metrics, "ListImages", r, |r| {
            image_list::list_images(self, r)
        })
        .await
    }

    async fn image_status(
        &self,
        r: Request<api::ImageStatusRequest>,
    ) -> Rpc<api::ImageStatusResponse> {
        unary(&self.metrics, "ImageStatus", r, |r| {
            image_status::image_status(self, r)
        })
        .await
    }

    async fn pull_image(&self, r: Request<api::PullImageRequest>) -> Rpc<api::PullImageResponse> {
        unary(&self.metrics, "PullImage", r, |r| {
            image_pull::pull_image(self, r)
        })
        .await
    }

    async fn remove_image(
        &self,
        r: Request<api::RemoveImageRequest>,
    ) -> Rpc<api::RemoveImageResponse> {
        unary(&self.metrics, "RemoveImage", r, |r| {
            image_remove::remove_image(self, r)
        })
        .await
    }

    async fn image_fs_info(
        &self,
        r: Request<api::ImageFsInfoRequest>,
    ) -> Rpc<api::ImageFsInfoResponse> {
        unary(&self.metrics, "ImageFsInfo", r, |r| {
            image_fs_info::image_fs_info(self, r)
        })
        .await
    }
}

#[tonic::async_trait]
impl RuntimeService for CriService {
    async fn version(&self, r: Request<api::VersionRequest>) -> Rpc<api::VersionResponse> {
        unary(&self.metrics, "Version", r, runtime_version::version).await
    }

    async fn status(&self, r: Request<api::StatusRequest>) -> Rpc<api::StatusResponse> {
        unary(&self.metrics, "Status", r, |r| {
            runtime_status::status(self, r)
        })
        .await
    }

    async fn runtime_config(
        &self,
        r: Request<api::RuntimeConfigRequest>,
    ) -> Rpc<api::RuntimeConfigResponse> {
        unary(
            &self.metrics,
            "RuntimeConfig",
            r,
            runtime_config::runtime_config,
        )
        .await
    }

    async fn update_runtime_config(
        &self,
        r: Request<api::UpdateRuntimeConfigRequest>,
    ) -> Rpc<api::UpdateRuntimeConfigResponse> {
        unary(&self.metrics, "UpdateRuntimeConfig", r, |r| {
            update_runtime_config::update_runtime_config(self, r)
        })
        .await
    }

    // Everything below is answered by runtime_unimplemented.rs until the runtime issue.

    async fn run_pod_sandbox(
        &self,
        r: Request<api::RunPodSandboxRequest>,
    ) -> Rpc<api::RunPodSandboxResponse> {
        unary(&self.metrics, "RunPodSandbox", r, reject("RunPodSandbox")).await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<api::StopPodSandboxRequest>,
    ) -> Rpc<api::StopPodSandboxResponse> {
        unary(&self.metrics, "StopPodSandbox", r, reject("StopPodSandbox")).await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<api::RemovePodSandboxRequest>,
    ) -> Rpc<api::RemovePodSandboxResponse> {
        unary(
            &self.metrics,
            "RemovePodSandbox",
            r,
            reject("RemovePodSandbox"),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<api::PodSandboxStatusRequest>,
    ) -> Rpc<api::PodSandboxStatusResponse> {
        unary(
            &self.metrics,
            "PodSandboxStatus",
            r,
            reject("PodSandboxStatus"),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<api::ListPodSandboxRequest>,
    ) -> Rpc<api::ListPodSandboxResponse> {
        unary(&self.metrics, "ListPodSandbox", r, reject("ListPodSandbox")).await
    }

    async fn create_container(
        &self,
        r: Request<api::CreateContainerRequest>,
    ) -> Rpc<api::CreateContainerResponse> {
        unary(
            &self.metrics,
            "CreateContainer",
            r,
            reject("CreateContainer"),
        )
        .await
    }

    async fn start_container(
        &self,
        r: Request<api::StartContainerRequest>,
    ) -> Rpc<api::StartContainerResponse> {
        unary(&self.metrics, "StartContainer", r, reject("StartContainer")).await
    }

    async fn stop_container(
        &self,
        r: Request<api::StopContainerRequest>,
    ) -> Rpc<api::StopContainerResponse> {
        unary(&self.metrics, "StopContainer", r, reject("StopContainer")).await
    }

    async fn remove_container(
        &self,
        r: Request<api::RemoveContainerRequest>,
    ) -> Rpc<api::RemoveContainerResponse> {
        unary(
            &self.metrics,
            "RemoveContainer",
            r,
            reject("RemoveContainer"),
        )
        .await
    }

    async fn list_containers(
        &self,
        r: Request<api::ListContainersRequest>,
    ) -> Rpc<api::ListContainersResponse> {
        unary(&self.metrics, "ListContainers", r, reject("ListContainers")).await
    }

    async fn container_status(
        &self,
        r: Request<api::ContainerStatusRequest>,
    ) -> Rpc<api::ContainerStatusResponse> {
        unary(
            &self.metrics,
            "ContainerStatus",
            r,
            reject("ContainerStatus"),
        )
        .await
    }

    async fn update_container_resources(
        &self,
        r: Request<api::UpdateContainerResourcesRequest>,
    ) -> Rpc<api::UpdateContainerResourcesResponse> {
        let rpc = "UpdateContainerResources";
        unary(&self.metrics, rpc, r, reject(rpc)).await
    }

    async fn reopen_container_log(
        &self,
        r: Request<api::ReopenContainerLogRequest>,
    ) -> Rpc<api::ReopenContainerLogResponse> {
        unary(
            &self.metrics,
            "ReopenContainerLog",
            r,
            reject("ReopenContainerLog"),
        )
        .await
    }

    async fn exec_sync(&self, r: Request<api::ExecSyncRequest>) -> Rpc<api::ExecSyncResponse> {
        unary(&self.metrics, "ExecSync", r, reject("ExecSync")).await
    }

    async fn exec(&self, r: Request<api::ExecRequest>) -> Rpc<api::ExecResponse> {
        unary(&self.metrics, "Exec", r, reject("Exec")).await
    }

    async fn attach(&self, r: Request<api::AttachRequest>) -> Rpc<api::AttachResponse> {
        unary(&self.metrics, "Attach", r, reject("Attach")).await
    }

    async fn port_forward(
        &self,
        r: Request<api::PortForwardRequest>,
    ) -> Rpc<api::PortForwardResponse> {
        unary(&self.metrics, "PortForward", r, reject("PortForward")).await
    }

    async fn container_stats(
        &self,
        r: Request<api::ContainerStatsRequest>,
    ) -> Rpc<api::ContainerStatsResponse> {
        unary(&self.metrics, "ContainerStats", r, reject("ContainerStats")).await
    }

    async fn list_container_stats(
        &self,
        r: Request<api::ListContainerStatsRequest>,
    ) -> Rpc<api::ListContainerStatsResponse> {
        unary(
            &self.metrics,
            "ListContainerStats",
            r,
            reject("ListContainerStats"),
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<api::PodSandboxStatsRequest>,
    ) -> Rpc<api::PodSandboxStatsResponse> {
        unary(
            &self.metrics,
            "PodSandboxStats",
            r,
            reject("PodSandboxStats"),
        )
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<api::ListPodSandboxStatsRequest>,
    ) -> Rpc<api::ListPodSandboxStatsResponse> {
        unary(
            &self.metrics,
            "ListPodSandboxStats",
            r,
            reject("ListPodSandboxStats"),
        )
        .await
    }

    async fn checkpoint_container(
        &self,
        r: Request<api::CheckpointContainerRequest>,
    ) -> Rpc<api::CheckpointContainerResponse> {
        unary(
            &self.metrics,
            "CheckpointContainer",
            r,
            reject("CheckpointContainer"),
        )
        .await
    }

    type GetContainerEventsStream = BoxStream<api::ContainerEventResponse>;

    async fn get_container_events(
        &self,
        r: Request<api::GetEventsRequest>,
    ) -> Rpc<Self::GetContainerEventsStream> {
        unary(
            &self.metrics,
            "GetContainerEvents",
            r,
            reject("GetContainerEvents"),
        )
        .await
    }

    async fn list_metric_descriptors(
        &self,
        r: Request<api::ListMetricDescriptorsRequest>,
    ) -> Rpc<api::ListMetricDescriptorsResponse> {
        let rpc = "ListMetricDescriptors";
        unary(&self.metrics, rpc, r, reject(rpc)).await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        r: Request<api::ListPodSandboxMetricsRequest>,
    ) -> Rpc<api::ListPodSandboxMetricsResponse> {
        let rpc = "ListPodSandboxMetrics";
        unary(&self.metrics, rpc, r, reject(rpc)).await
    }
}
