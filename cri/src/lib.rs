//! keel-cri: the Kubernetes Container Runtime Interface v1 server (RuntimeService, ImageService)
//! over a unix socket, and the streaming server for exec/attach/port-forward.
//!
//! Owns RPC translation only: every decision about images, pods and containers lives in keel-runtime.
//! Filled by the CRI endpoint issue.
