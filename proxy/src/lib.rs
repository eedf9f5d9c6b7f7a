//! keel-proxy: loads and attaches keel-ebpf's programs with aya, pins them in bpffs, and syncs
//! Services and EndpointSlices into the BPF maps (a kube-proxy replacement).
//!
//! Pure logic (`model`: objects -> desired map content; `sync`: minimal ordered map writes;
//! `manifests`: the file source; `kube_source::Index`: API watch events -> changed frontends)
//! is tested without root. Kernel access goes through `loader` (checks, load, attach, pin,
//! uninstall) and `maps` (the pinned maps) only; the API server through kube-rs in
//! `kube_source`.
//!
//! The XDP NodePort program is attached apart from `Proxy::start` (`loader::install_xdp`, after
//! it): `ProxyConfig` is built in other crates too, which a new field would break.

pub mod kube_source;
pub mod loader;
pub mod ls;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod proxy;
pub mod server;
mod snat;
pub mod sync;

pub use kube_source::{ApiSource, Source, choose_source};
pub use loader::{
    DEFAULT_BPFFS_DIR, LoaderError, XdpAttach, XdpModeChoice, default_cgroup, install_xdp,
};
pub use proxy::{Proxy, ProxyConfig, ProxyError, uninstall};
