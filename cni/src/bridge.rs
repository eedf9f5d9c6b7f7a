//! The per-network bridge: created on first use, brought up, given the gateway addresses when
//! the network is a gateway, put in promiscuous mode on request, and IP forwarding turned on in
//! the node's namespace when pods route through it. Never deleted by the plugin: it is shared.

use ipnet::IpNet;
use netlink_packet_route::link::LinkFlags;

use crate::config::Network;
use crate::netlink::{Link, Netlink, NetlinkError};

/// Bridge failures.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Netlink refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A link with the bridge's name exists and is something else.
    #[error("link {name} exists but is a {kind}, not a bridge")]
    NotABridge {
        /// The name.
        name: String,
        /// What it is.
        kind: String,
    },
    /// The link vanished right after creation.
    #[error("bridge {0} disappeared while being set up")]
    Vanished(String),
    /// A sysctl could not be written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl BridgeError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        use crate::protocol::code;
        match self {
            Self::Netlink(e) => e.code(),
            Self::NotABridge { .. } => code::INVALID_CONFIG,
            Self::Vanished(_) => code::TRY_AGAIN,
            Self::Sysctl { .. } => code::IO_FAILURE,
        }
    }
}

/// The gateway addresses the bridge carries: one per range set (first range), with the
/// subnet's prefix length.
pub fn gateway_addresses(net: &Network) -> Vec<IpNet> {
    if !net.is_gateway {
        return Vec::new();
    }
    net.range_sets
        .iter()
        .filter_map(|set| set.first())
        .filter_map(|r| IpNet::new(r.gateway, r.subnet.prefix_len()).ok())
        .collect()
}

/// Makes sure the bridge exists and is configured; returns it.
pub fn ensure(nl: &mut Netlink, net: &Network) -> Result<Link, BridgeError> {
    let link = match nl.link_by_name(&net.bridge)? {
        Some(l) => l,
        None => {
            nl.create_bridge(&net.bridge, net.mtu, bridge_mac(&net.bridge))?;
            nl.link_by_name(&net.bridge)?
                .ok_or_else(|| BridgeError::Vanished(net.bridge.clone()))?
        }
    };
    if let Some(kind) = &link.kind
        && kind != "bridge"
    {
        return Err(BridgeError::NotABridge {
            name: net.bridge.clone(),
            kind: kind.clone(),
        });
    }
    let mut flags = LinkFlags::empty();
    if !link.up {
        flags |= LinkFlags::Up;
    }
    if net.promisc_mode && !link.promisc {
        flags |= LinkFlags::Promisc;
    }
    if !flags.is_empty() {
        nl.set_flags(link.index, flags)?;
    }
    let gateways = gateway_addresses(net);
    if !gateways.is_empty() {
        let have = nl.addresses(link.index)?;
        for gw in gateways.iter().filter(|g| !have.contains(g)) {
            nl.add_address(link.index, *gw)?;
        }
        enable_forwarding(
            gateways.iter().any(|g| g.addr().is_ipv4()),
            gateways.iter().any(|g| g.addr().is_ipv6()),
        )?;
    }
    Ok(link)
}

/// A locally administered unicast MAC, unique enough per node: bridges never leave the node.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain(nanos.to_le_bytes())
        .chain(std::process::id().to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

fn set_sysctl(path: &str) -> Result<(), BridgeError> {
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| BridgeError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// Pods route through the gateway, so the node must forward (as the reference plugin does).
/// `/proc/sys/net` resolves to the namespace of the calling process: the node's.
fn enable_forwarding(v4: bool, v6: bool) -> Result<(), BridgeError> {
    if v4 {
        set_sysctl("/proc/sys/net/ipv4/ip_forward")?;
    }
    if v6 {
        set_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")?;
    }
    Ok(())
}
