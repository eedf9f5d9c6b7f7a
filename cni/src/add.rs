//! ADD: bridge, address allocation, veth, routes, masquerade, result, in that order. Anything
//! made for this attachment is undone when a later step fails, so a failed ADD leaves no veth
//! and no allocation (the shared bridge stays).

use std::os::fd::AsFd;

use crate::config::Network;
use crate::netlink::Netlink;
use crate::protocol::Invocation;
use crate::result::{CniResult, Interface, IpConfig};
use crate::{Error, bridge, ipam_store, masquerade, netns, pending, veth};

/// Attaches the container; returns the result to print (merged with any `prevResult`).
pub fn add(inv: &Invocation, net: &Network) -> Result<CniResult, Error> {
    let netns_path = inv
        .netns
        .as_deref()
        .ok_or(crate::protocol::ProtocolError::MissingEnv("CNI_NETNS"))?;
    let pod_ns = netns::open(netns_path)?;
    let requested = net.requested_with_args(&inv.args)?;
    let prev = match &net.prev_result {
        Some(v) => Some(CniResult::from_value(v)?),
        None => None,
    };
    // A DEL of this attachment still finishing in the background must end before we start.
    pending::wait(net, &inv.container_id, &inv.ifname)?;
    let mut host = Netlink::open()?;
    let mut pod = netns::netlink_in(pod_ns.as_fd())?;
    // The name may still be held by an earlier container's interface that is being deleted
    // (a runtime that re-uses one namespace): wait for those deletions rather than refuse.
    if pod.link_by_name(&inv.ifname)?.is_some() {
        pending::wait_all(net)?;
    }
    let bridge_link = bridge::ensure(&mut host, net)?;
    let allocate = || ipam_store::allocate(net, &inv.container_id, &inv.ifname, &requested);
    let allocated = match allocate() {
        // Addresses of deletions still finishing come free in a few milliseconds.
        Err(ipam_store::StoreError::Ipam(crate::ipam::IpamError::Exhausted(_)))
            if pending::wait_all(net)? =>
        {
            allocate()?
        }
        other => other?,
    };
    stall_point("allocated");
    let made = (|| -> Result<_, Error> {
        let links = veth::setup(
            &mut host,
            &mut pod,
            pod_ns.as_fd(),
            net,
            &bridge_link,
            &inv.container_id,
            &inv.ifname,
            &allocated,
        )?;
        stall_point("veth");
        if net.ip_masq && !allocated.is_empty() {
            masquerade::ensure(net)?;
        }
        Ok(links)
    })();
    let (host_link, pod_link) = match made {
        Ok(l) => l,
        Err(e) => {
            let _ = host.delete_link(&veth::host_name(&inv.container_id, &inv.ifname));
            let _ = ipam_store::release(net, &inv.container_id, &inv.ifname);
            return Err(e);
        }
    };
    let ours = CniResult {
        cni_version: net.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: bridge_link.name.clone(),
                mac: bridge_link.mac.clone(),
                ..Default::default()
            },
            Interface {
                name: host_link.name.clone(),
                mac: host_link.mac.clone(),
                ..Default::default()
            },
            Interface {
                name: pod_link.name.clone(),
                mac: pod_link.mac.clone(),
                sandbox: Some(netns_path.display().to_string()),
                mtu: pod_link.mtu,
                ..Default::default()
            },
        ],
        ips: veth::pod_addresses(&allocated)
            .into_iter()
            .zip(&allocated)
            .map(|(address, a)| IpConfig {
                address,
                gateway: net.is_gateway.then_some(a.range.gateway),
                interface: Some(2),
                version: None,
            })
            .collect(),
        routes: veth::pod_routes(net, &allocated),
        dns: net.dns.clone().unwrap_or_default(),
    };
    let merged = match prev {
        Some(p) => p.merge(ours),
        None => ours,
    };
    Ok(merged.for_version(&net.cni_version))
}

/// Crash-test hook: when `KEEL_CNI_STALL_AT` names this step, block here so a test can
/// `kill -9` the plugin at a known point of ADD and prove GC reclaims what it left. Costs one
/// environment lookup otherwise.
fn stall_point(step: &str) {
    if std::env::var_os("KEEL_CNI_STALL_AT").is_some_and(|v| v == step) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
