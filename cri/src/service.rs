//! The CRI services' shared state and the two tonic trait impls.
//!
//! Each trait method is one call to [`instrument::unary`] with the RPC's name and its handler
//! from the RPC's own file, nothing else: the instrumentation layer cannot be bypassed, and the
//! behaviour of an RPC is found in the file named after it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use keel_runtime::ImageStore;
use keel_runtime::container::ContainerRuntime;
use keel_runtime::image::RegistryOptions;
use keel_runtime::pod::PodRuntime;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::api;
use crate::api::image_service_server::ImageService;
use crate::api::runtime_service_server::RuntimeService;
use crate::instrument::{Metrics, unary};
use crate::runtime_unimplemented::reject;
use crate::streaming::Streaming;
use crate::{
    CriError, container_attach, container_create, container_events, container_exec,
    container_exec_sync, container_list, container_remove, container_reopen_log, container_start,
    container_stats, container_stats_list, container_status, container_stop, container_update,
    image_fs_info, image_list, image_pull, image_remove, image_status, pod_sandbox_list,
    pod_sandbox_port_forward, pod_sandbox_remove, pod_sandbox_run, pod_sandbox_stats,
    pod_sandbox_stats_list, pod_sandbox_status, pod_sandbox_stop, runtime_config, runtime_status,
    runtime_version, update_runtime_config,
};

type Rpc<T> = Result<Response<T>, Status>;

/// Runs a blocking runtime call off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CriError> + Send + 'static,
) -> Result<T, CriError> {
    tokio::task::spawn_blocking(f).await?
}

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

/// What every RPC handler gets: the image store, the pod runtime (and through it the
/// containers), the settings, and the little state CRI keeps in memory. Everything about pods
/// and containers is read from the runtime's records on disk, so a restarted daemon serves
/// what the previous one made.
pub(crate) struct CriService {
    pub images: ImageStore,
    pub pods: PodRuntime,
    pub metrics: Metrics,
    pub settings: Settings,
    pub events: Arc<container_events::Events>,
    /// The streaming server's tokens and address (Exec, PortForward URLs).
    pub streaming: Streaming,
    locks: Locks,
    /// Pod CIDRs from the last UpdateRuntimeConfig (kubelet sends the node's `spec.podCIDRs`).
    pod_cidrs: RwLock<Vec<String>>,
    /// The last CPU sample per container (timestamp ns, CPU ns) for `usage_nano_cores`.
    cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
}

/// One async mutex per pod: keel-runtime does not serialize operations on a pod, so every
/// RPC that changes a pod or one of its containers holds its pod's lock (and RunPodSandbox
/// the lock of the name it reserves).
#[derive(Default)]
struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        m.lock_owned().await
    }

    fn forget(&self, key: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Someone waiting on it holds a clone; they keep their own mutex, which is fine: the
        // pod is gone and their operation finds it so.
        map.remove(key);
    }
}

impl CriService {
    pub fn new(
        images: ImageStore,
        pods: PodRuntime,
        metrics: Metrics,
        settings: Settings,
        streaming: Streaming,
    ) -> Self {
        CriService {
            images,
            pods,
            metrics,
            settings,
            events: Arc::default(),
            streaming,
            locks: Locks::default(),
            pod_cidrs: RwLock::default(),
            cpu_samples: Mutex::default(),
        }
    }

    pub fn containers(&self) -> &ContainerRuntime {
        self.pods.containers()
    }

    /// Holds pod `id`'s lock until the guard drops.
    pub async fn lock_pod(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.locks.lock(&format!("pod:{id}")).await
    }

    /// Holds the lock of a pod name being reserved (RunPodSandbox).
    pub async fn lock_name(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.locks.lock(&format!("name:{name}")).await
    }

    pub fn forget_pod(&self, id: &str) {
        self.locks.forget(&format!("pod:{id}"));
    }

    /// Records a CPU sample and returns nanocores since the previous one.
    pub fn cpu_sample(&self, id: &str, ts: i64, cpu_ns: u64) -> Option<u64> {
        let mut m = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        let prev = m.insert(id.to_owned(), (ts, cpu_ns));
        prev.and_then(|p| crate::container_convert::nano_cores(p, (ts, cpu_ns)))
    }

    pub fn forget_cpu_sample(&self, id: &str) {
        let mut m = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(id);
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

    async fn run_pod_sandbox(
        &self,
        r: Request<api::RunPodSandboxRequest>,
    ) -> Rpc<api::RunPodSandboxResponse> {
        unary(&self.metrics, "RunPodSandbox", r, |r| {
            pod_sandbox_run::run_pod_sandbox(self, r)
        })
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<api::StopPodSandboxRequest>,
    ) -> Rpc<api::StopPodSandboxResponse> {
        unary(&self.metrics, "StopPodSandbox", r, |r| {
            pod_sandbox_stop::stop_pod_sandbox(self, r)
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<api::RemovePodSandboxRequest>,
    ) -> Rpc<api::RemovePodSandboxResponse> {
        unary(&self.metrics, "RemovePodSandbox", r, |r| {
            pod_sandbox_remove::remove_pod_sandbox(self, r)
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<api::PodSandboxStatusRequest>,
    ) -> Rpc<api::PodSandboxStatusResponse> {
        unary(&self.metrics, "PodSandboxStatus", r, |r| {
            pod_sandbox_status::pod_sandbox_status(self, r)
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<api::ListPodSandboxRequest>,
    ) -> Rpc<api::ListPodSandboxResponse> {
        unary(&self.metrics, "ListPodSandbox", r, |r| {
            pod_sandbox_list::list_pod_sandbox(self, r)
        })
        .await
    }

    async fn create_container(
        &self,
        r: Request<api::CreateContainerRequest>,
    ) -> Rpc<api::CreateContainerResponse> {
        unary(&self.metrics, "CreateContainer", r, |r| {
            container_create::create_container(self, r)
        })
        .await
    }

    async fn start_container(
        &self,
        r: Request<api::StartContainerRequest>,
    ) -> Rpc<api::StartContainerResponse> {
        unary(&self.metrics, "StartContainer", r, |r| {
            container_start::start_container(self, r)
        })
        .await
    }

    async fn stop_container(
        &self,
        r: Request<api::StopContainerRequest>,
    ) -> Rpc<api::StopContainerResponse> {
        unary(&self.metrics, "StopContainer", r, |r| {
            container_stop::stop_container(self, r)
        })
        .await
    }

    async fn remove_container(
        &self,
        r: Request<api::RemoveContainerRequest>,
    ) -> Rpc<api::RemoveContainerResponse> {
        unary(&self.metrics, "RemoveContainer", r, |r| {
            container_remove::remove_container(self, r)
        })
        .await
    }

    async fn list_containers(
        &self,
        r: Request<api::ListContainersRequest>,
    ) -> Rpc<api::ListContainersResponse> {
        unary(&self.metrics, "ListContainers", r, |r| {
            container_list::list_containers(self, r)
        })
        .await
    }

    async fn container_status(
        &self,
        r: Request<api::ContainerStatusRequest>,
    ) -> Rpc<api::ContainerStatusResponse> {
        unary(&self.metrics, "ContainerStatus", r, |r| {
            container_status::container_status(self, r)
        })
        .await
    }

    async fn update_container_resources(
        &self,
        r: Request<api::UpdateContainerResourcesRequest>,
    ) -> Rpc<api::UpdateContainerResourcesResponse> {
        unary(&self.metrics, "UpdateContainerResources", r, |r| {
            container_update::update_container_resources(self, r)
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        r: Request<api::ReopenContainerLogRequest>,
    ) -> Rpc<api::ReopenContainerLogResponse> {
        unary(&self.metrics, "ReopenContainerLog", r, |r| {
            container_reopen_log::reopen_container_log(self, r)
        })
        .await
    }

    async fn exec_sync(&self, r: Request<api::ExecSyncRequest>) -> Rpc<api::ExecSyncResponse> {
        unary(&self.metrics, "ExecSync", r, |r| {
            container_exec_sync::exec_sync(self, r)
        })
        .await
    }

    async fn exec(&self, r: Request<api::ExecRequest>) -> Rpc<api::ExecResponse> {
        unary(&self.metrics, "Exec", r, |r| container_exec::exec(self, r)).await
    }

    async fn attach(&self, r: Request<api::AttachRequest>) -> Rpc<api::AttachResponse> {
        unary(&self.metrics, "Attach", r, |r| {
            container_attach::attach(self, r)
        })
        .await
    }

    async fn port_forward(
        &self,
        r: Request<api::PortForwardRequest>,
    ) -> Rpc<api::PortForwardResponse> {
        unary(&self.metrics, "PortForward", r, |r| {
            pod_sandbox_port_forward::port_forward(self, r)
        })
        .await
    }

    async fn container_stats(
        &self,
        r: Request<api::ContainerStatsRequest>,
    ) -> Rpc<api::ContainerStatsResponse> {
        unary(&self.metrics, "ContainerStats", r, |r| {
            container_stats::container_stats(self, r)
        })
        .await
    }

    async fn list_container_stats(
        &self,
        r: Request<api::ListContainerStatsRequest>,
    ) -> Rpc<api::ListContainerStatsResponse> {
        unary(&self.metrics, "ListContainerStats", r, |r| {
            container_stats_list::list_container_stats(self, r)
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<api::PodSandboxStatsRequest>,
    ) -> Rpc<api::PodSandboxStatsResponse> {
        unary(&self.metrics, "PodSandboxStats", r, |r| {
            pod_sandbox_stats::pod_sandbox_stats(self, r)
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<api::ListPodSandboxStatsRequest>,
    ) -> Rpc<api::ListPodSandboxStatsResponse> {
        unary(&self.metrics, "ListPodSandboxStats", r, |r| {
            pod_sandbox_stats_list::list_pod_sandbox_stats(self, r)
        })
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
        unary(&self.metrics, "GetContainerEvents", r, |r| {
            container_events::get_container_events(self, r)
        })
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
