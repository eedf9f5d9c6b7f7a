//! CHECK: the attachment still looks as ADD left it: addresses recorded, host veth on the
//! bridge and up, the pod interface present and up with its addresses and routes.

use ipnet::IpNet;
use std::os::fd::AsFd;

use crate::config::Network;
use crate::netlink::Netlink;
use crate::protocol::Invocation;
use crate::result::CniResult;
use crate::{Error, ipam_store, netns, veth};

/// What CHECK found wrong.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// CHECK needs the ADD result.
    #[error("CHECK needs prevResult in the network config")]
    NoPrevResult,
    /// No allocation recorded for the attachment.
    #[error("no address allocated to {0}")]
    NotAllocated(String),
    /// The host veth is missing or not plugged into the bridge.
    #[error("host interface {0} is missing or not attached to bridge {1}")]
    HostVeth(String, String),
    /// The pod interface is missing or down.
    #[error("interface {0} is missing or down in the container")]
    PodInterface(String),
    /// An address is missing from the pod interface.
    #[error("address {0} is missing from the container interface")]
    Address(IpNet),
    /// A route is missing in the pod.
    #[error("route to {0} is missing in the container")]
    Route(IpNet),
}

impl CheckError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::NoPrevResult => crate::protocol::code::INVALID_CONFIG,
            _ => crate::protocol::code::CHECK_FAILED,
        }
    }
}

/// Verifies the attachment.
pub fn check(inv: &Invocation, net: &Network) -> Result<(), Error> {
    let prev = CniResult::from_value(net.prev_result.as_ref().ok_or(CheckError::NoPrevResult)?)?;
    let key = format!("{}/{}", inv.container_id, inv.ifname);
    let recorded = ipam_store::lookup(net, &inv.container_id, &inv.ifname)?;
    if !net.range_sets.is_empty() && recorded.is_empty() {
        return Err(CheckError::NotAllocated(key).into());
    }
    let mut host = Netlink::open()?;
    let host_if = veth::host_name(&inv.container_id, &inv.ifname);
    let bridge = host.link_by_name(&net.bridge)?;
    let host_link = host.link_by_name(&host_if)?;
    let plugged =
        matches!((&bridge, &host_link), (Some(b), Some(h)) if h.master == Some(b.index) && h.up);
    if !plugged {
        return Err(CheckError::HostVeth(host_if, net.bridge.clone()).into());
    }
    let netns_path = inv
        .netns
        .as_deref()
        .ok_or(crate::protocol::ProtocolError::MissingEnv("CNI_NETNS"))?;
    let pod_ns = netns::open(netns_path)?;
    let mut pod = netns::netlink_in(pod_ns.as_fd())?;
    let pod_link = match pod.link_by_name(&inv.ifname)? {
        Some(l) if l.up => l,
        _ => return Err(CheckError::PodInterface(inv.ifname.clone()).into()),
    };
    let have = pod.addresses(pod_link.index)?;
    let our_index = prev
        .interfaces
        .iter()
        .position(|i| i.name == inv.ifname && i.sandbox.is_some());
    for ip in prev
        .ips
        .iter()
        .filter(|ip| our_index.is_none() || ip.interface == our_index)
    {
        if !have.contains(&ip.address) {
            return Err(CheckError::Address(ip.address).into());
        }
    }
    for ip in &recorded {
        if !have.iter().any(|a| a.addr() == *ip) {
            return Err(CheckError::Address(IpNet::from(*ip)).into());
        }
    }
    for v4 in [true, false] {
        let wanted: Vec<_> = prev
            .routes
            .iter()
            .filter(|r| r.dst.addr().is_ipv4() == v4)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let routes = pod.routes(pod_link.index, v4)?;
        for r in wanted {
            if !routes.iter().any(|(dst, _)| *dst == r.dst.trunc()) {
                return Err(CheckError::Route(r.dst).into());
            }
        }
    }
    Ok(())
}
