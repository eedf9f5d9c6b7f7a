//! DEL: cut the pod off, remove the host veth (its pod end goes with it) and release the
//! attachment's addresses. Succeeds when either is already gone, and does not need the pod's
//! namespace to exist.
//!
//! Unless the network sets `syncDelete`, the veth deletion and the release are returned as a
//! [`PendingDelete`] for the caller to finish (the binary does it in a detached child, see
//! `pending`), after the host end has been taken down.

use crate::config::Network;
use crate::netlink::Netlink;
use crate::pending::{self, PendingDelete};
use crate::protocol::Invocation;
use crate::{Error, ipam_store, veth};

/// Detaches the container. Idempotent. `Some` is work left to finish.
pub fn del(inv: &Invocation, net: &Network) -> Result<Option<PendingDelete>, Error> {
    // A DEL repeated while the first one's deletion runs answers once that one is done.
    pending::wait(net, &inv.container_id, &inv.ifname)?;
    let mut host = Netlink::open()?;
    let host_if = veth::host_name(&inv.container_id, &inv.ifname);
    if !net.sync_delete
        && let Some(link) = host.link_by_name(&host_if)?
    {
        let pending =
            PendingDelete::begin(&mut host, net, &inv.container_id, &inv.ifname, link.index)?;
        return Ok(Some(pending));
    }
    // Interface first, address second: an address is never handed out while still in use.
    host.delete_link(&host_if)?;
    ipam_store::release(net, &inv.container_id, &inv.ifname)?;
    Ok(None)
}
