//! The only door to the kernel's routing netlink: a blocking `NETLINK_ROUTE` socket bound to the
//! network namespace it was opened in, and the handful of requests the datapath makes (links,
//! addresses, routes). Messages come from `netlink-packet-route`; nothing here decides policy.
//!
//! Blocking on purpose: a CNI invocation is one short-lived process doing ~10 requests, where an
//! async runtime would cost more than it saves.

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
    RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::config::RouteConf;

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened or used.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request.
    #[error("netlink {op} {target}: {source}")]
    Kernel {
        /// The request.
        op: &'static str,
        /// What it was about (link name, address).
        target: String,
        /// errno from the kernel.
        source: std::io::Error,
    },
    /// A reply could not be decoded.
    #[error("netlink {op}: undecodable reply: {reason}")]
    Decode {
        /// The request.
        op: &'static str,
        /// Decoder message.
        reason: String,
    },
}

impl NetlinkError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        crate::protocol::code::NETLINK_FAILURE
    }

    /// The kernel errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What the datapath needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC as `aa:bb:..`.
    pub mac: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Master (bridge) ifindex.
    pub master: Option<u32>,
    /// IFF_UP set.
    pub up: bool,
    /// IFF_PROMISC set.
    pub promisc: bool,
    /// `IFLA_INFO_KIND`, e.g. "bridge", "veth".
    pub kind: Option<String>,
}

/// A NETLINK_ROUTE socket in one network namespace.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_from(msg: &LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        promisc: msg.header.flags.contains(LinkFlags::Promisc),
        kind: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(m) => l.mac = Some(mac_string(m)),
            LinkAttribute::Mtu(m) => l.mtu = Some(*m),
            LinkAttribute::Controller(m) => l.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        sock.bind_auto().map_err(NetlinkError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // Extended acks make kernel refusals carry a reason; best effort.
        let _ = sock.set_ext_ack(true);
        Ok(Self { sock, seq: 1 })
    }

    /// Sends one request and collects the replies until the ACK (or DONE for dumps).
    fn request(
        &mut self,
        op: &'static str,
        target: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        self.seq = self.seq.wrapping_add(1);
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(NetlinkError::Socket)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(NetlinkError::Socket)?;
            let mut off = 0;
            while off < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| NetlinkError::Decode {
                        op,
                        reason: e.to_string(),
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode {
                        op,
                        reason: "zero-length message".into(),
                    });
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NetlinkError::Kernel {
                                op,
                                target: target.to_string(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Looks a link up by name.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request("get link", name, RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc_enodev()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.request(
            "dump links",
            "",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a bridge; an existing link of that name is left alone (`Ok(false)`). The MAC is
    /// set explicitly: a bridge with a kernel-chosen MAC takes on its lowest port's MAC, so the
    /// gateway's MAC would change under the pods' neighbour caches as pods come and go.
    pub fn create_bridge(
        &mut self,
        name: &str,
        mtu: Option<u32>,
        mac: [u8; 6],
    ) -> Result<bool, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(m) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(m));
        }
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match self.request(
            "create bridge",
            name,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc_eexist()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair: `host` in this namespace attached to `master`, `peer` moved straight
    /// into the namespace behind `peer_netns`. One request, so there is never a half pair.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: Option<u32>,
        master: u32,
    ) -> Result<(), NetlinkError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(host.to_string()));
        if let Some(m) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(m));
            peer_msg.attributes.push(LinkAttribute::Mtu(m));
        }
        msg.attributes.push(LinkAttribute::Controller(master));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            "create veth",
            host,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Sets link flags (`Up`, `Promisc`) on.
    pub fn set_flags(&mut self, index: u32, flags: LinkFlags) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = flags;
        msg.header.change_mask = flags;
        self.request(
            "set link flags",
            &index.to_string(),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )?;
        Ok(())
    }

    /// Takes a link down.
    pub fn set_down(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        self.request(
            "set link down",
            &index.to_string(),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )?;
        Ok(())
    }

    /// Turns hairpin mode on for a bridge port.
    pub fn set_hairpin(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )])),
        ]));
        self.request(
            "set hairpin",
            &index.to_string(),
            RouteNetlinkMessage::NewLink(msg),
            0,
        )?;
        Ok(())
    }

    /// Deletes a link by name; `Ok(false)` when there is none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request("delete link", name, RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc_enodev()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds (or replaces) an address. IPv6 addresses skip duplicate address detection so they
    /// are usable as soon as ADD returns: the allocator already guarantees uniqueness.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr());
        msg.header.prefix_len = addr.prefix_len();
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if let IpNet::V4(v4) = addr {
            msg.attributes
                .push(AddressAttribute::Broadcast(v4.broadcast()));
        } else {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            "add address",
            &addr.to_string(),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// The addresses on a link (global and link scope).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let replies = self.request(
            "dump addresses",
            &index.to_string(),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => IpNet::new(*ip, a.header.prefix_len).ok(),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a route out of `oif`.
    pub fn add_route(&mut self, oif: u32, route: &RouteConf) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        let dst = route.dst.trunc();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        let table = route.table.unwrap_or(u32::from(RouteHeader::RT_TABLE_MAIN));
        msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        if table > 255 {
            msg.attributes.push(RouteAttribute::Table(table));
        }
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = match route.scope {
            Some(s) => RouteScope::from(s),
            None if route.gw.is_none() => RouteScope::Link,
            None => RouteScope::Universe,
        };
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
        }
        if let Some(gw) = route.gw {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        if let Some(p) = route.priority {
            msg.attributes.push(RouteAttribute::Priority(p));
        }
        let mut metrics = Vec::new();
        if let Some(m) = route.mtu {
            metrics.push(RouteMetric::Mtu(m));
        }
        if let Some(m) = route.advmss {
            metrics.push(RouteMetric::Advmss(m));
        }
        if !metrics.is_empty() {
            msg.attributes.push(RouteAttribute::Metrics(metrics));
        }
        self.request(
            "add route",
            &route.dst.to_string(),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// Routes out of `oif` in the main table: (destination, gateway).
    pub fn routes(
        &mut self,
        oif: u32,
        v4: bool,
    ) -> Result<Vec<(IpNet, Option<IpAddr>)>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self.request(
            "dump routes",
            &oif.to_string(),
            RouteNetlinkMessage::GetRoute(req),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut dst = None;
            let mut gw = None;
            let mut out_if = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::Oif(o) => out_if = Some(*o),
                    _ => {}
                }
            }
            if out_if != Some(oif) {
                continue;
            }
            let any: IpAddr = if v4 {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            };
            if let Ok(net) = IpNet::new(dst.unwrap_or(any), r.header.destination_prefix_length) {
                out.push((net, gw));
            }
        }
        Ok(out)
    }
}

/// A route of one owner (its routing protocol number), as [`Netlink::owned_routes`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRoute {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

impl Netlink {
    /// Adds or replaces `dst via gw dev oif` in the main table, tagged with routing protocol
    /// `protocol` (so that its owner can find and remove exactly its own routes later).
    pub fn replace_owned_route(
        &mut self,
        dst: IpNet,
        gw: IpAddr,
        oif: u32,
        protocol: u8,
    ) -> Result<(), NetlinkError> {
        let dst = dst.trunc();
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::from(protocol);
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = RouteScope::Universe;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        msg.attributes.push(RouteAttribute::Oif(oif));
        self.request(
            "replace route",
            &dst.to_string(),
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// The main table's routes of routing protocol `protocol`.
    pub fn owned_routes(
        &mut self,
        v4: bool,
        protocol: u8,
    ) -> Result<Vec<OwnedRoute>, NetlinkError> {
        let mut req = RouteMessage::default();
        req.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self.request(
            "dump routes",
            "",
            RouteNetlinkMessage::GetRoute(req),
            NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if u8::from(r.header.protocol) != protocol
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let (mut dst, mut gw, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::Oif(o) => oif = Some(*o),
                    _ => {}
                }
            }
            let any: IpAddr = if v4 {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            };
            if let Ok(dst) = IpNet::new(dst.unwrap_or(any), r.header.destination_prefix_length) {
                out.push(OwnedRoute { dst, gw, oif });
            }
        }
        Ok(out)
    }

    /// Deletes the main table's route to `dst` of routing protocol `protocol`; `Ok(false)` if
    /// there is none.
    pub fn delete_owned_route(&mut self, dst: IpNet, protocol: u8) -> Result<bool, NetlinkError> {
        let dst = dst.trunc();
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::from(protocol);
        msg.header.scope = RouteScope::NoWhere;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
        match self.request(
            "delete route",
            &dst.to_string(),
            RouteNetlinkMessage::DelRoute(msg),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(rustix::io::Errno::SRCH.raw_os_error()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The link with an address whose subnet holds `ip` (the way to a directly connected
    /// next hop).
    pub fn link_towards(&mut self, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
        for link in self.links()? {
            if self.addresses(link.index)?.iter().any(|a| a.contains(&ip)) {
                return Ok(Some(link.index));
            }
        }
        Ok(None)
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn libc_enodev() -> i32 {
    rustix::io::Errno::NODEV.raw_os_error()
}

fn libc_eexist() -> i32 {
    rustix::io::Errno::EXIST.raw_os_error()
}
