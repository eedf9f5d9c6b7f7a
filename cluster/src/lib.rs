//! keel-cluster: the store trait with its redb and etcd backends, the Kubernetes-compatible API
//! server, the scheduler and the controllers.
//!
//! Filled by the control plane and standalone cluster issues.
