//! GC (spec 1.1): release every allocation, and delete every host veth on this network's bridge,
//! whose attachment is not in `cni.dev/valid-attachments`. This is also how the leftovers of a
//! plugin killed midway through ADD are reclaimed: its records and veth belong to no valid
//! attachment.

use std::collections::HashSet;

use crate::config::{Attachment, ConfigError, Network};
use crate::netlink::Netlink;
use crate::{Error, ipam_store, pending, veth};

/// What GC removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Released allocations (address, container, ifname).
    pub released: Vec<ipam_store::Record>,
    /// Deleted host interfaces.
    pub links: Vec<String>,
}

/// Collects garbage for one network.
pub fn gc(net: &Network) -> Result<GcReport, Error> {
    let valid: HashSet<Attachment> = net
        .valid_attachments
        .clone()
        .ok_or(ConfigError::Missing("cni.dev/valid-attachments"))?
        .into_iter()
        .collect();
    // A deletion still finishing is not a leak; let it finish first.
    pending::wait_all(net)?;
    let released = ipam_store::gc(net, &valid)?;
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| veth::host_name(&a.container_id, &a.ifname))
        .collect();
    let mut host = Netlink::open()?;
    let mut links = Vec::new();
    if let Some(bridge) = host.link_by_name(&net.bridge)? {
        for l in host.links()? {
            if l.master == Some(bridge.index)
                && l.name.starts_with(veth::HOST_PREFIX)
                && !keep.contains(&l.name)
            {
                host.delete_link(&l.name)?;
                links.push(l.name);
            }
        }
    }
    Ok(GcReport { released, links })
}
