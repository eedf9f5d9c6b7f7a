//! keel-proxy: loads and attaches keel-ebpf's programs with aya, pins them in bpffs, and syncs
//! Services and EndpointSlices into the BPF maps (a kube-proxy replacement).
//!
//! Pure logic (`model`: objects -> desired map content; `sync`: minimal ordered map writes;
//! `manifests`: the file source) is tested without root. Kernel access goes through `loader`
//! (checks, load, attach, pin, uninstall) and `maps` (the pinned maps) only.
//!
//! Not here yet: SNAT for remote backends and XDP on the NodePort path, and the Kubernetes API
//! source (see docs/crates/proxy.md).

pub mod loader;
pub mod ls;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod proxy;
pub mod server;
pub mod sync;

pub use loader::{DEFAULT_BPFFS_DIR, LoaderError, default_cgroup};
pub use proxy::{Proxy, ProxyConfig, ProxyError, uninstall};
