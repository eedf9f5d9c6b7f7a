//! STATUS (spec 1.1): ready when the allocation directory is usable and every range set still
//! has a free address. The bridge need not exist yet: ADD creates it.

use crate::config::Network;
use crate::{Error, ipam_store, pending};

/// Why the plugin cannot serve ADD.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A range set is full.
    #[error("range set {set} of network {network} is full ({used} of {capacity} addresses in use)")]
    Exhausted {
        /// Network.
        network: String,
        /// Range set index.
        set: usize,
        /// In use.
        used: u64,
        /// Allocatable.
        capacity: u64,
    },
}

impl StatusError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        crate::protocol::code::NOT_AVAILABLE
    }
}

/// Reports readiness.
pub fn status(net: &Network) -> Result<(), Error> {
    // Locking creates the directory and lock file: proves the store is writable.
    drop(ipam_store::Store::lock(&net.data_dir).map_err(not_available)?);
    // Addresses of deletions still finishing are as good as free.
    pending::wait_all(net)?;
    let usage = ipam_store::usage(net).map_err(not_available)?;
    let mut sets: Vec<_> = usage.into_iter().collect();
    sets.sort();
    for (set, (used, capacity)) in sets {
        if used >= capacity {
            return Err(StatusError::Exhausted {
                network: net.name.clone(),
                set,
                used,
                capacity,
            }
            .into());
        }
    }
    Ok(())
}

fn not_available(e: ipam_store::StoreError) -> Error {
    Error::Unavailable(e.to_string())
}
