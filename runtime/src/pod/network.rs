//! The network hook: pods get their network from the caller. keel-cri plugs CNI ADD/DEL in
//! through [`PodNetwork`]; `keel pod run` and tests without a network use [`LoopbackOnly`].
//!
//! The runtime calls `setup` once the pod's network namespace exists (never for a pod on
//! the host network) and `teardown` when the pod stops or is removed, at most once per
//! successful setup; a failed teardown is retried by the next stop or remove.

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::state::PodRecord;

/// Whatever a network hook reports as an error.
pub type NetworkError = Box<dyn std::error::Error + Send + Sync>;

/// What network set-up gave the pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodIps {
    /// The pod's addresses, primary first (CRI `PodSandboxNetworkStatus`).
    pub ips: Vec<IpAddr>,
    /// Anything the hook wants back at teardown (e.g. the CNI ADD result for DEL's
    /// prevResult). Stored with the pod, never interpreted by the runtime.
    pub details: serde_json::Value,
}

/// Sets up and tears down a pod's network. Implementations must be idempotent enough that
/// a teardown after a crash half-way (setup done, not yet recorded) does no harm.
pub trait PodNetwork: Send + Sync {
    /// Connects the network namespace pinned at `netns` (e.g. CNI ADD).
    fn setup(&self, pod: &PodRecord, netns: &Path) -> Result<PodIps, NetworkError>;
    /// Disconnects it (e.g. CNI DEL). `pod.ips` holds what `setup` returned.
    fn teardown(&self, pod: &PodRecord, netns: &Path) -> Result<(), NetworkError>;
}

/// No network beyond the namespace's loopback (which the runtime brings up itself).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopbackOnly;

impl PodNetwork for LoopbackOnly {
    fn setup(&self, _pod: &PodRecord, _netns: &Path) -> Result<PodIps, NetworkError> {
        Ok(PodIps::default())
    }
    fn teardown(&self, _pod: &PodRecord, _netns: &Path) -> Result<(), NetworkError> {
        Ok(())
    }
}
