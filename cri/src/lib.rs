//! keel-cri: the Kubernetes Container Runtime Interface v1 server (RuntimeService, ImageService)
//! over a unix socket, with a Prometheus metrics endpoint; pods get their network from CNI
//! plugins, and the streaming server Exec, Attach and PortForward point clients at (WebSocket
//! only; attach is output only).
//!
//! Owns RPC translation only: every decision about images, pods and containers lives in
//! keel-runtime. The layout follows containerd's `internal/cri/server`: one file per RPC
//! (`image_pull.rs`, `runtime_status.rs`, ...) holding a thin handler plus the pure functions
//! that translate between CRI messages and keel-runtime types, and one instrumentation layer
//! ([`instrument`]) through which every RPC passes (span, duration histogram, error log,
//! error -> gRPC status).
//!
//! | file | owns |
//! | --- | --- |
//! | `server.rs` | the unix socket, the tonic server for both services, the metrics endpoint |
//! | `service.rs` | the service state and the two tonic trait impls (one line per RPC) |
//! | `instrument.rs` | the per-RPC span, metrics and error-to-status layer |
//! | `error.rs` | [`CriError`] and its gRPC code mapping |
//! | `image_*.rs` | ImageService RPCs (`image_convert.rs`: record -> CRI `Image`) |
//! | `runtime_*.rs`, `update_runtime_config.rs` | RuntimeService status/config RPCs; `runtime_unimplemented.rs` answers what keel does not serve (checkpoints, metric descriptors) |
//! | `pod_sandbox_{run,stop,remove,status,list,stats,stats_list}.rs` | the pod sandbox RPCs |
//! | `pod_convert.rs` | pure: CRI sandbox config -> runtime `PodConfig`, pod record -> CRI messages, filters |
//! | `container_{create,start,stop,remove,list,status,update,reopen_log,exec_sync,exec,attach,stats,stats_list}.rs` | the container RPCs |
//! | `pod_sandbox_port_forward.rs` | PortForward: the URL of a port-forward stream |
//! | `streaming/` | the streaming HTTP server: tokens, the WebSocket channel protocol, exec, attach and port-forward streams |
//! | `container_convert.rs` | pure: CRI container config (security context, resources, mounts) -> runtime `ContainerConfig`, record -> CRI messages, stats |
//! | `container_events.rs` | GetContainerEvents: the event broadcast, fed by the RPCs and by an exit watcher |
//! | `cni_exec.rs` | pod networking: the runtime's `PodNetwork` hook as CNI plugin executions (ADD/DEL, chains, portMappings) |
//! | `cni_config.rs` | reading the CNI conf dir (NetworkReady, and the network pods get) |
//! | `client.rs` | connecting a CRI client to the unix socket (tests, tools) |
//!
//! Errors: [`CriError`] (what an RPC returns, mapped to a gRPC code) and [`ServerError`]
//! (starting and running the server).

pub mod client;
mod cni_config;
mod cni_exec;
mod container_attach;
mod container_convert;
mod container_create;
mod container_events;
mod container_exec;
mod container_exec_sync;
mod container_list;
mod container_remove;
mod container_reopen_log;
mod container_start;
mod container_stats;
mod container_stats_list;
mod container_status;
mod container_stop;
mod container_update;
mod error;
mod image_convert;
mod image_fs_info;
mod image_list;
mod image_pull;
mod image_remove;
mod image_status;
mod instrument;
mod pod_convert;
mod pod_sandbox_list;
mod pod_sandbox_port_forward;
mod pod_sandbox_remove;
mod pod_sandbox_run;
mod pod_sandbox_stats;
mod pod_sandbox_stats_list;
mod pod_sandbox_status;
mod pod_sandbox_stop;
mod runtime_config;
mod runtime_status;
mod runtime_unimplemented;
mod runtime_version;
pub mod server;
mod service;
pub mod streaming;
mod update_runtime_config;

pub use error::CriError;
pub use server::{ServerConfig, ServerError, serve};

/// The CRI v1 messages, clients and servers (generated from the upstream proto by `k8s-cri`).
pub use k8s_cri::v1 as api;
/// The tonic version the API is generated for (status codes, channels), for clients.
pub use tonic;
