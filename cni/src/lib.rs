//! keel-cni: CNI spec 1.1 plugin (bridge + veth datapath, built-in IPAM, masquerade, GC).
//!
//! Layout: the protocol (`protocol`), the config (`config`), the result (`result`) and the
//! allocator (`ipam`) are pure; `ipam_store` owns the allocation files, `netlink` and `netns` are
//! the only doors to the kernel, `masquerade` drives the packet filter; `bridge` and `veth` build
//! the datapath; one file per verb (`add`, `del`, `check`, `gc`, `status`) composes them, and
//! `plugin` turns an invocation (environment + stdin) into stdout and an exit code. `install`
//! serves `keel cni install`.

pub mod add;
pub mod bridge;
pub mod check;
pub mod config;
pub mod del;
pub mod gc;
pub mod install;
pub mod ipam;
pub mod ipam_store;
pub mod masquerade;
pub mod netlink;
pub mod netns;
pub mod pending;
pub mod plugin;
pub mod protocol;
pub mod result;
pub mod status;
pub mod veth;

/// Every failure of the plugin, gathered from the modules; [`Error::code`] is the CNI code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Environment / version.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// Network config.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// prevResult.
    #[error(transparent)]
    Result(#[from] result::ResultError),
    /// Allocation store.
    #[error(transparent)]
    Store(#[from] ipam_store::StoreError),
    /// Netlink.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// Pod namespace.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// Bridge.
    #[error(transparent)]
    Bridge(#[from] bridge::BridgeError),
    /// Veth.
    #[error(transparent)]
    Veth(#[from] veth::VethError),
    /// Masquerade.
    #[error(transparent)]
    Masquerade(#[from] masquerade::MasqueradeError),
    /// A background deletion's marker.
    #[error(transparent)]
    Pending(#[from] pending::PendingError),
    /// CHECK found a difference.
    #[error(transparent)]
    Check(#[from] check::CheckError),
    /// STATUS: not ready.
    #[error(transparent)]
    Status(#[from] status::StatusError),
    /// STATUS: the store is unusable.
    #[error("plugin not available: {0}")]
    Unavailable(String),
    /// Reading stdin failed.
    #[error("reading network config from stdin: {0}")]
    Stdin(#[source] std::io::Error),
}

impl Error {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::Protocol(e) => e.code(),
            Self::Config(e) => e.code(),
            Self::Result(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Netlink(e) => e.code(),
            Self::Netns(e) => e.code(),
            Self::Bridge(e) => e.code(),
            Self::Veth(e) => e.code(),
            Self::Masquerade(e) => e.code(),
            Self::Check(e) => e.code(),
            Self::Pending(_) => protocol::code::IO_FAILURE,
            Self::Status(e) => e.code(),
            Self::Unavailable(_) => protocol::code::NOT_AVAILABLE,
            Self::Stdin(_) => protocol::code::IO_FAILURE,
        }
    }
}
