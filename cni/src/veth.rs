//! The pod's veth pair: the host end (named from a hash of the attachment, so DEL and GC find it
//! without any record) is plugged into the bridge in the same request that creates it; the pod
//! end is created directly inside the pod namespace under `CNI_IFNAME`, then given its
//! addresses and routes.

use ipnet::IpNet;
use netlink_packet_route::link::LinkFlags;
use std::os::fd::BorrowedFd;

use crate::config::{Network, RouteConf};
use crate::ipam_store::Allocated;
use crate::netlink::{Link, Netlink, NetlinkError};

/// Prefix of every host-side veth this plugin makes; GC only ever deletes links with it.
pub const HOST_PREFIX: &str = "kc";

/// Veth failures.
#[derive(Debug, thiserror::Error)]
pub enum VethError {
    /// Netlink refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The pod already has an interface with that name, not made by this plugin.
    #[error("interface {0} already exists in the container's network namespace")]
    IfnameInUse(String),
    /// The link vanished right after creation.
    #[error("veth {0} disappeared while being set up")]
    Vanished(String),
}

impl VethError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        use crate::protocol::code;
        match self {
            Self::Netlink(e) => e.code(),
            Self::IfnameInUse(_) => code::INVALID_ENV,
            Self::Vanished(_) => code::TRY_AGAIN,
        }
    }
}

/// The host-side name for an attachment: `kc` + 12 hex digits of FNV-1a over
/// `containerID/ifname` (14 bytes, under the 15-byte limit).
pub fn host_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{HOST_PREFIX}{:012x}", h & 0xffff_ffff_ffff)
}

/// The routes a pod gets: the configured ones (gateway defaulting to the range gateway of the
/// same family), plus default routes when the network is the default gateway. Only families the
/// pod has an address in.
pub fn pod_routes(net: &Network, allocated: &[Allocated]) -> Vec<RouteConf> {
    let gw_for = |v4: bool| {
        allocated
            .iter()
            .find(|a| a.ip.is_ipv4() == v4)
            .map(|a| a.range.gateway)
    };
    let mut out: Vec<RouteConf> = Vec::new();
    for r in &net.routes {
        let v4 = r.dst.addr().is_ipv4();
        let Some(family_gw) = gw_for(v4) else {
            continue;
        };
        let gw = r.gw.unwrap_or(family_gw);
        out.push(RouteConf {
            gw: Some(gw),
            ..r.clone()
        });
    }
    if net.is_default_gateway {
        for v4 in [true, false] {
            let Some(gw) = gw_for(v4) else { continue };
            let dst: IpNet = if v4 { "0.0.0.0/0" } else { "::/0" }
                .parse()
                .unwrap_or_default();
            if !out.iter().any(|r| r.dst == dst) {
                out.push(RouteConf {
                    dst,
                    gw: Some(gw),
                    mtu: None,
                    advmss: None,
                    priority: None,
                    table: None,
                    scope: None,
                });
            }
        }
    }
    out
}

/// The pod's addresses with their subnet prefix.
pub fn pod_addresses(allocated: &[Allocated]) -> Vec<IpNet> {
    allocated
        .iter()
        .filter_map(|a| IpNet::new(a.ip, a.range.subnet.prefix_len()).ok())
        .collect()
}

/// Creates the pair and configures both ends. Returns (host end, pod end).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the two sockets and the netns are distinct doors"
)]
pub fn setup(
    host: &mut Netlink,
    pod: &mut Netlink,
    pod_ns: BorrowedFd<'_>,
    net: &Network,
    bridge: &Link,
    container_id: &str,
    ifname: &str,
    allocated: &[Allocated],
) -> Result<(Link, Link), VethError> {
    let host_if = host_name(container_id, ifname);
    // A repeated ADD for the same attachment rebuilds the pair from scratch. Looked up first:
    // a lookup, unlike a delete, does not take the kernel's RTNL lock.
    let existed = host.link_by_name(&host_if)?.is_some() && host.delete_link(&host_if)?;
    if !existed && pod.link_by_name(ifname)?.is_some() {
        return Err(VethError::IfnameInUse(ifname.to_string()));
    }
    let mtu = net.mtu.or(bridge.mtu.filter(|m| *m != 1500));
    host.create_veth(&host_if, ifname, pod_ns, mtu, bridge.index)?;
    let host_link = host
        .link_by_name(&host_if)?
        .ok_or_else(|| VethError::Vanished(host_if.clone()))?;
    host.set_flags(host_link.index, LinkFlags::Up)?;
    if net.hairpin_mode {
        host.set_hairpin(host_link.index)?;
    }
    let pod_link = pod
        .link_by_name(ifname)?
        .ok_or_else(|| VethError::Vanished(ifname.to_string()))?;
    // Up first: IPv6 prefix routes only exist on an up link, and gateway routes need them.
    pod.set_flags(pod_link.index, LinkFlags::Up)?;
    for addr in pod_addresses(allocated) {
        pod.add_address(pod_link.index, addr)?;
    }
    for r in pod_routes(net, allocated) {
        pod.add_route(pod_link.index, &r)?;
    }
    Ok((host_link, pod_link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_name("abc", "eth0");
        assert_eq!(a, host_name("abc", "eth0"));
        assert_ne!(a, host_name("abc", "eth1"));
        assert_ne!(a, host_name("abd", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(HOST_PREFIX));
    }

    fn net(extra: &str) -> Network {
        let j = format!(
            r#"{{"cniVersion":"1.1.0","name":"t","type":"keel-cni",{extra}
              "ipam":{{"ranges":[[{{"subnet":"10.0.0.0/24"}}],[{{"subnet":"fd00::/64"}}]],
                       "routes":[{{"dst":"192.168.0.0/16"}},{{"dst":"172.16.0.0/12","gw":"10.0.0.254"}}]}}}}"#
        );
        crate::config::validate(crate::config::parse(j.as_bytes()).unwrap()).unwrap()
    }

    fn alloc(n: &Network) -> Vec<Allocated> {
        vec![
            Allocated {
                ip: "10.0.0.5".parse().unwrap(),
                set: 0,
                range: n.range_sets[0][0].clone(),
            },
            Allocated {
                ip: "fd00::5".parse().unwrap(),
                set: 1,
                range: n.range_sets[1][0].clone(),
            },
        ]
    }

    #[test]
    fn routes_default_gateway_and_families() {
        let n = net(r#""isDefaultGateway":true,"#);
        let r = pod_routes(&n, &alloc(&n));
        let shown: Vec<String> = r
            .iter()
            .map(|r| format!("{} via {}", r.dst, r.gw.unwrap()))
            .collect();
        assert_eq!(
            shown,
            [
                "192.168.0.0/16 via 10.0.0.1",
                "172.16.0.0/12 via 10.0.0.254",
                "0.0.0.0/0 via 10.0.0.1",
                "::/0 via fd00::1"
            ]
        );
        let n = net("");
        let only_v6 = vec![alloc(&n)[1].clone()];
        assert!(
            pod_routes(&n, &only_v6).is_empty(),
            "no IPv4 address, no IPv4 routes"
        );
        let addrs: Vec<String> = pod_addresses(&alloc(&n))
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.5/24", "fd00::5/64"]);
    }
}
