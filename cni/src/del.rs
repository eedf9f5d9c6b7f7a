//! DEL: remove the host veth (its pod end goes with it) and release the attachment's addresses.
//! Succeeds when either is already gone, and does not need the pod's namespace to exist.

use crate::config::Network;
use crate::netlink::Netlink;
use crate::protocol::Invocation;
use crate::{Error, ipam_store, veth};

/// Detaches the container. Idempotent.
pub fn del(inv: &Invocation, net: &Network) -> Result<(), Error> {
    let mut host = Netlink::open()?;
    // Interface first, address second: an address is never handed out while still in use.
    host.delete_link(&veth::host_name(&inv.container_id, &inv.ifname))?;
    ipam_store::release(net, &inv.container_id, &inv.ifname)?;
    Ok(())
}
