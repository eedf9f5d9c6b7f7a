//! Deletions that finish after DEL has answered.
//!
//! Unregistering a network device costs the kernel ~20 ms of RCU grace periods whatever the
//! caller does, and almost all of it is waiting, not work. DEL therefore cuts the pod off at once
//! (the host end goes down, so no packet leaves or enters the pod) and hands the device deletion
//! and the address release to a detached child of the plugin (see the `keel-cni` binary). The
//! runtime gets its answer in a few milliseconds; the kernel finishes in the background.
//!
//! Each such deletion holds an exclusive `flock` on a marker file named after its host veth
//! under `<dataDir>/<network>/deleting/`, from before DEL answers until the link is gone and the
//! addresses are released. Whoever must see the deletion finished waits on that lock:
//! - ADD or DEL of the same attachment (a re-ADD must not race the old deletion);
//! - ADD whose interface name is still taken in the pod namespace (a runtime that re-uses one
//!   namespace for a new container);
//! - GC, which must not count a half-deleted attachment as a leak.
//!
//! A child that dies midway leaves its marker unlocked and its leftovers to GC, as a plugin
//! killed midway through ADD does.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::config::Network;
use crate::netlink::Netlink;
use crate::{Error, ipam_store, veth};

/// Directory of the markers, inside the network's IPAM directory.
const DIR: &str = "deleting";

/// Failures around the markers.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    /// A marker could not be made, locked or removed.
    #[error("pending deletion marker {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PendingError {
    let path = path.to_path_buf();
    move |source| PendingError::Io { op, path, source }
}

fn marker_dir(net: &Network) -> PathBuf {
    net.data_dir.join(DIR)
}

fn lock(file: &File, path: &Path) -> Result<(), PendingError> {
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io("flock", path)(e.into()))
}

/// Waits until the marker at `path` (if any) is released by its deleter.
fn wait_marker(path: &Path) -> Result<(), PendingError> {
    match File::open(path) {
        Ok(f) => lock(&f, path),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("open", path)(e)),
    }
}

/// Waits for a pending deletion of this attachment, if one is running.
pub fn wait(net: &Network, container_id: &str, ifname: &str) -> Result<(), PendingError> {
    wait_marker(&marker_dir(net).join(veth::host_name(container_id, ifname)))
}

/// Waits for every pending deletion on this network. Returns whether there was any.
pub fn wait_all(net: &Network) -> Result<bool, PendingError> {
    let dir = marker_dir(net);
    let entries = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("read dir", &dir)(e)),
    };
    let mut any = false;
    for entry in entries {
        let entry = entry.map_err(io("read dir", &dir))?;
        wait_marker(&entry.path())?;
        any = true;
    }
    Ok(any)
}

/// A deletion that DEL has started and someone must finish with [`PendingDelete::finish`]:
/// the `keel-cni` binary in a detached child, any other caller right away.
#[derive(Debug)]
pub struct PendingDelete {
    net: Network,
    container_id: String,
    ifname: String,
    host_if: String,
    marker: PathBuf,
    /// Holds the flock; inherited across fork, so the child keeps the lock after the parent exits.
    _lock: File,
}

impl PendingDelete {
    /// Takes the attachment's marker lock and takes the host end down so the pod is cut off now.
    pub fn begin(
        host: &mut Netlink,
        net: &Network,
        container_id: &str,
        ifname: &str,
        link_index: u32,
    ) -> Result<Self, Error> {
        let host_if = veth::host_name(container_id, ifname);
        let dir = marker_dir(net);
        fs::create_dir_all(&dir).map_err(io("create dir", &dir))?;
        let marker = dir.join(&host_if);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&marker)
            .map_err(io("create", &marker))?;
        lock(&file, &marker)?;
        host.set_down(link_index)?;
        Ok(Self {
            net: net.clone(),
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            host_if,
            marker,
            _lock: file,
        })
    }

    /// Deletes the link (the pod end goes with it), then releases the addresses, then drops the
    /// marker. An address is never released while its interface exists.
    pub fn finish(self) -> Result<(), Error> {
        let result = (|| -> Result<(), Error> {
            Netlink::open()?.delete_link(&self.host_if)?;
            ipam_store::release(&self.net, &self.container_id, &self.ifname)?;
            Ok(())
        })();
        // Removed while still locked: a waiter that opened it before wakes when we exit.
        let _ = fs::remove_file(&self.marker);
        result
    }
}
