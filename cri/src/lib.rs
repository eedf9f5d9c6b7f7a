//! keel-cri: the Kubernetes Container Runtime Interface v1 server (RuntimeService, ImageService)
//! over a unix socket, with a Prometheus metrics endpoint; later the streaming server for
//! exec/attach/port-forward.
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
//! | `runtime_*.rs`, `update_runtime_config.rs` | RuntimeService RPCs; `runtime_unimplemented.rs` answers the pod and container RPCs until the runtime issue lands them |
//! | `cni_config.rs` | reading the CNI conf dir for the NetworkReady condition |
//! | `client.rs` | connecting a CRI client to the unix socket (tests, tools) |
//!
//! Errors: [`CriError`] (what an RPC returns, mapped to a gRPC code) and [`ServerError`]
//! (starting and running the server).

pub mod client;
mod cni_config;
mod error;
mod image_convert;
mod image_fs_info;
mod image_list;
mod image_pull;
mod image_remove;
mod image_status;
mod instrument;
mod runtime_config;
mod runtime_status;
mod runtime_unimplemented;
mod runtime_version;
pub mod server;
mod service;
mod update_runtime_config;

pub use error::CriError;
pub use server::{ServerConfig, ServerError, serve};

/// The CRI v1 messages, clients and servers (generated from the upstream proto by `k8s-cri`).
pub use k8s_cri::v1 as api;
/// The tonic version the API is generated for (status codes, channels), for clients.
pub use tonic;
