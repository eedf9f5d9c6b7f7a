//! Entering a pod's network namespace for the work that is bound to the namespace at creation
//! time (opening a netlink socket, touching `/proc/sys/net`).
//!
//! [`run_in`] runs a closure on a short-lived thread that joins the namespace, so the caller never
//! changes namespace. [`netlink_in`], on the hot path of every ADD, instead switches the calling
//! thread in and straight back (two `setns` calls): a thread spawn and exit cost more than the
//! rest of the namespace work together. `setns(CLONE_NEWNET)` only affects the calling thread,
//! and a failed switch back aborts the process rather than let it act in the wrong namespace.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::netlink::{Netlink, NetlinkError};

/// Namespace failures.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path names no namespace (the container is gone).
    #[error("network namespace {0} does not exist")]
    Missing(PathBuf),
    /// The path exists but is not a network namespace, or cannot be opened.
    #[error("network namespace {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `setns` refused.
    #[error("entering network namespace: {0}")]
    Enter(#[source] std::io::Error),
    /// The helper thread died.
    #[error("network namespace helper thread panicked")]
    Thread,
    /// Netlink inside the namespace failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl NetnsError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        use crate::protocol::code;
        match self {
            Self::Missing(_) => code::UNKNOWN_CONTAINER,
            Self::Open { .. } | Self::Enter(_) | Self::Thread => code::IO_FAILURE,
            Self::Netlink(e) => e.code(),
        }
    }
}

/// Opens a namespace file (`/run/netns/x`, `/proc/<pid>/ns/net`).
pub fn open(path: &Path) -> Result<OwnedFd, NetnsError> {
    match File::open(path) {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(NetnsError::Missing(path.to_path_buf()))
        }
        Err(source) => Err(NetnsError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Runs `f` on a thread that has joined the namespace behind `ns`.
pub fn run_in<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| NetnsError::Enter(e.into()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Thread)?
    })
}

/// A netlink socket bound to the namespace behind `ns` (usable from any thread afterwards).
pub fn netlink_in(ns: BorrowedFd<'_>) -> Result<Netlink, NetnsError> {
    let own_path = Path::new("/proc/thread-self/ns/net");
    let own = File::open(own_path).map_err(|source| NetnsError::Open {
        path: own_path.to_path_buf(),
        source,
    })?;
    move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))
        .map_err(|e| NetnsError::Enter(e.into()))?;
    let nl = Netlink::open();
    if let Err(e) = move_into_link_name_space(own.as_fd(), Some(LinkNameSpaceType::Network)) {
        // Every later request would land in the pod's namespace: stopping is the only safe move.
        eprintln!("keel-cni: cannot return to the node's network namespace: {e}");
        std::process::abort();
    }
    Ok(nl?)
}
