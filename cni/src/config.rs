//! Network configuration: the JSON a runtime hands on stdin, parsed and validated into a
//! [`Network`] the datapath and IPAM can act on without further checks.
//!
//! Keys are spelled as the reference `bridge` and `host-local` plugins spell them, so an existing
//! conflist only needs `"type": "keel-cni"`. Pure: no I/O.

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::protocol::{ProtocolError, validate_ifname};

/// The plugin's `type` values this binary answers to.
pub const PLUGIN_TYPES: &[&str] = &["keel-cni", "keel"];
/// IPAM `type` values served by the built-in allocator (host-local's config format).
pub const IPAM_TYPES: &[&str] = &["keel-cni", "keel", "host-local"];
/// Where allocations live when `ipam.dataDir` is not set (host-local's default).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
/// The bridge used when the config names none.
pub const DEFAULT_BRIDGE: &str = "keel0";

/// Errors found in a network configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// stdin is not JSON of the expected shape.
    #[error("network config is not valid JSON: {0}")]
    Decode(#[from] serde_json::Error),
    /// `type` is not this plugin.
    #[error("plugin type {0:?} is not handled by keel-cni (expected \"keel-cni\")")]
    UnknownType(String),
    /// `ipam.type` names another IPAM plugin.
    #[error(
        "ipam type {0:?} is not supported (built-in IPAM answers to keel-cni, keel, host-local)"
    )]
    UnknownIpamType(String),
    /// A required key is missing or empty.
    #[error("network config field {0} is required")]
    Missing(&'static str),
    /// The network name cannot be used as a directory name.
    #[error("network name {0:?} may not contain '/' or be '.' or '..'")]
    BadName(String),
    /// A value is out of range or inconsistent.
    #[error("network config field {field}: {reason}")]
    Invalid {
        /// The key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Two IPAM ranges share addresses.
    #[error("ipam ranges {0} and {1} overlap")]
    OverlappingRanges(IpNet, IpNet),
    /// A requested address matches no range.
    #[error("requested address {0} is in none of the ipam ranges")]
    RequestedOutsideRanges(IpAddr),
    /// The version fields are unusable.
    #[error(transparent)]
    Version(#[from] ProtocolError),
}

impl ConfigError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        use crate::protocol::code;
        match self {
            Self::Decode(_) => code::DECODE_FAILURE,
            Self::Version(e) => e.code(),
            Self::RequestedOutsideRanges(_) => code::ADDRESS_UNAVAILABLE,
            _ => code::INVALID_CONFIG,
        }
    }
}

/// The raw config, as the runtime sends it (one plugin entry of a conflist, with `name` and
/// `cniVersion` copied in, `prevResult` and runtime config injected).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The version to speak.
    pub cni_version: Option<String>,
    /// Versions offered by a 1.1 conflist.
    #[serde(default)]
    pub cni_versions: Vec<String>,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Plugin type.
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// Bridge name.
    pub bridge: Option<String>,
    /// Put the gateway address on the bridge.
    #[serde(default)]
    pub is_gateway: bool,
    /// Also give pods a default route through the gateway (implies isGateway).
    #[serde(default)]
    pub is_default_gateway: bool,
    /// Masquerade pod traffic leaving the pod CIDRs.
    #[serde(default)]
    pub ip_masq: bool,
    /// `nftables` or `iptables`; nftables when unset and `nft` exists.
    pub ip_masq_backend: Option<String>,
    /// MTU of the bridge and the veths.
    pub mtu: Option<u32>,
    /// Let a pod reach itself through a service that hairpins (bridge port hairpin mode).
    #[serde(default)]
    pub hairpin_mode: bool,
    /// Put the bridge in promiscuous mode.
    #[serde(default)]
    pub promisc_mode: bool,
    /// keel-cni only: DEL deletes the veth before it answers (~20 ms of kernel time) instead of
    /// cutting the pod off and finishing in the background.
    #[serde(default)]
    pub sync_delete: bool,
    /// IPAM section (host-local shape).
    pub ipam: Option<IpamConf>,
    /// DNS settings passed through to the result.
    pub dns: Option<Value>,
    /// Capability arguments injected by the runtime.
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Conventional `args.cni` arguments.
    #[serde(default)]
    pub args: Option<ArgsConf>,
    /// The result of the previous plugin in a chain.
    pub prev_result: Option<Value>,
    /// GC: the attachments the runtime still uses.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// `runtimeConfig` capabilities this plugin understands.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// `ips` capability: addresses requested for this attachment.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The `args` object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ArgsConf {
    /// `args.cni`.
    #[serde(default)]
    pub cni: CniArgsConf,
}

/// `args.cni`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CniArgsConf {
    /// Requested addresses.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// One attachment named in GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the container.
    pub ifname: String,
}

/// The `ipam` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// IPAM type; empty means built-in.
    #[serde(default, rename = "type")]
    pub ipam_type: String,
    /// Range sets: one address is allocated from each set.
    #[serde(default)]
    pub ranges: Vec<Vec<RangeConf>>,
    /// Legacy single range: subnet.
    pub subnet: Option<IpNet>,
    /// Legacy single range: first address.
    pub range_start: Option<IpAddr>,
    /// Legacy single range: last address.
    pub range_end: Option<IpAddr>,
    /// Legacy single range: gateway.
    pub gateway: Option<IpAddr>,
    /// Routes for the pod.
    #[serde(default)]
    pub routes: Vec<RouteConf>,
    /// Directory holding allocations.
    pub data_dir: Option<PathBuf>,
    /// Addresses never handed out.
    #[serde(default)]
    pub reserved: Vec<IpAddr>,
}

/// One range of a range set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    /// The subnet addresses come from.
    pub subnet: IpNet,
    /// First allocatable address (default: network + 1).
    pub range_start: Option<IpAddr>,
    /// Last allocatable address (default: broadcast - 1 for IPv4, last for IPv6).
    pub range_end: Option<IpAddr>,
    /// Gateway (default: network + 1).
    pub gateway: Option<IpAddr>,
}

/// A route for the pod (1.1 fields included).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteConf {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; the range set's gateway of the same family when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Scope (RT_SCOPE_* number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

/// A validated range: every address in `start..=end` lies in `subnet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Subnet (host bits cleared).
    pub subnet: IpNet,
    /// First allocatable.
    pub start: IpAddr,
    /// Last allocatable.
    pub end: IpAddr,
    /// Gateway, never allocated.
    pub gateway: IpAddr,
}

/// A validated network: what ADD/DEL/CHECK/GC act on.
#[derive(Debug, Clone)]
pub struct Network {
    /// The negotiated version.
    pub cni_version: String,
    /// Name (also the IPAM directory name).
    pub name: String,
    /// Bridge name.
    pub bridge: String,
    /// Gateway addresses on the bridge.
    pub is_gateway: bool,
    /// Default routes in pods.
    pub is_default_gateway: bool,
    /// Masquerade egress.
    pub ip_masq: bool,
    /// Forced masquerade backend.
    pub ip_masq_backend: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Hairpin on the host veth.
    pub hairpin_mode: bool,
    /// Bridge promiscuous.
    pub promisc_mode: bool,
    /// DEL waits for the kernel to delete the veth.
    pub sync_delete: bool,
    /// Range sets; empty for an L2-only network.
    pub range_sets: Vec<Vec<Range>>,
    /// Routes for pods.
    pub routes: Vec<RouteConf>,
    /// IPAM directory for this network (`<dataDir>/<name>`).
    pub data_dir: PathBuf,
    /// Never allocated.
    pub reserved: Vec<IpAddr>,
    /// Passed to the result.
    pub dns: Option<Value>,
    /// Passed through a chain.
    pub prev_result: Option<Value>,
    /// GC input.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Addresses requested through runtimeConfig / args (not yet CNI_ARGS).
    pub requested: Vec<IpAddr>,
}

/// Parses stdin into the raw config.
pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
    Ok(serde_json::from_slice(stdin)?)
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Validates a raw config into a [`Network`].
pub fn validate(conf: NetConf) -> Result<Network, ConfigError> {
    let cni_version = crate::protocol::negotiate(conf.cni_version.as_deref(), &conf.cni_versions)?;
    if conf.plugin_type.is_empty() {
        return Err(ConfigError::Missing("type"));
    }
    if !PLUGIN_TYPES.contains(&conf.plugin_type.as_str()) {
        return Err(ConfigError::UnknownType(conf.plugin_type));
    }
    if conf.name.is_empty() {
        return Err(ConfigError::Missing("name"));
    }
    if conf.name.contains('/') || conf.name == "." || conf.name == ".." {
        return Err(ConfigError::BadName(conf.name));
    }
    let bridge = conf.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
    validate_ifname(&bridge).map_err(|e| invalid("bridge", e.to_string()))?;
    if let Some(mtu) = conf.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(invalid("mtu", format!("{mtu} is not between 68 and 65535")));
    }
    if let Some(b) = &conf.ip_masq_backend
        && b != "nftables"
        && b != "iptables"
    {
        return Err(invalid(
            "ipMasqBackend",
            format!("{b:?} is neither nftables nor iptables"),
        ));
    }
    let ipam = conf.ipam.unwrap_or_default();
    if !ipam.ipam_type.is_empty() && !IPAM_TYPES.contains(&ipam.ipam_type.as_str()) {
        return Err(ConfigError::UnknownIpamType(ipam.ipam_type));
    }
    let mut raw_sets = ipam.ranges.clone();
    if let Some(subnet) = ipam.subnet {
        raw_sets.push(vec![RangeConf {
            subnet,
            range_start: ipam.range_start,
            range_end: ipam.range_end,
            gateway: ipam.gateway,
        }]);
    }
    let range_sets = raw_sets
        .iter()
        .map(|set| validate_range_set(set))
        .collect::<Result<Vec<_>, _>>()?;
    check_overlaps(&range_sets)?;
    let mut requested = Vec::new();
    let raw_requested = conf
        .runtime_config
        .ips
        .iter()
        .chain(conf.args.iter().flat_map(|a| a.cni.ips.iter()));
    for raw in raw_requested {
        requested.push(parse_requested(raw)?);
    }
    let data_dir = ipam
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
        .join(&conf.name);
    Ok(Network {
        cni_version,
        name: conf.name,
        bridge,
        is_gateway: conf.is_gateway || conf.is_default_gateway,
        is_default_gateway: conf.is_default_gateway,
        ip_masq: conf.ip_masq,
        ip_masq_backend: conf.ip_masq_backend,
        mtu: conf.mtu,
        hairpin_mode: conf.hairpin_mode,
        promisc_mode: conf.promisc_mode,
        sync_delete: conf.sync_delete,
        range_sets,
        routes: ipam.routes,
        data_dir,
        reserved: ipam.reserved,
        dns: conf.dns,
        prev_result: conf.prev_result,
        valid_attachments: conf.valid_attachments,
        requested,
    })
}

/// Parses a requested address, accepting `10.1.0.5` and `10.1.0.5/24`.
pub fn parse_requested(raw: &str) -> Result<IpAddr, ConfigError> {
    let addr = raw.split('/').next().unwrap_or(raw);
    addr.parse()
        .map_err(|_| invalid("ips", format!("{raw:?} is not an IP address")))
}

fn validate_range_set(set: &[RangeConf]) -> Result<Vec<Range>, ConfigError> {
    if set.is_empty() {
        return Err(invalid("ipam.ranges", "a range set is empty"));
    }
    let ranges = set
        .iter()
        .map(validate_range)
        .collect::<Result<Vec<_>, _>>()?;
    let v4 = ranges[0].subnet.addr().is_ipv4();
    if ranges.iter().any(|r| r.subnet.addr().is_ipv4() != v4) {
        return Err(invalid("ipam.ranges", "a range set mixes IPv4 and IPv6"));
    }
    Ok(ranges)
}

fn validate_range(r: &RangeConf) -> Result<Range, ConfigError> {
    let subnet = r.subnet.trunc();
    let host_bits = subnet.max_prefix_len() - subnet.prefix_len();
    if host_bits < 2 {
        return Err(invalid(
            "ipam.ranges.subnet",
            format!("{subnet} is too small to allocate from"),
        ));
    }
    let first = crate::ipam::offset(subnet.network(), 1);
    let last = if subnet.addr().is_ipv4() {
        crate::ipam::offset(subnet.broadcast(), -1)
    } else {
        subnet.broadcast()
    };
    let start = r.range_start.unwrap_or(first);
    let end = r.range_end.unwrap_or(last);
    let gateway = r.gateway.unwrap_or(first);
    for (field, ip) in [
        ("rangeStart", start),
        ("rangeEnd", end),
        ("gateway", gateway),
    ] {
        if !subnet.contains(&ip) {
            return Err(invalid(
                "ipam.ranges",
                format!("{field} {ip} is outside {subnet}"),
            ));
        }
    }
    if start > end {
        return Err(invalid(
            "ipam.ranges",
            format!("rangeStart {start} is after rangeEnd {end}"),
        ));
    }
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

fn check_overlaps(sets: &[Vec<Range>]) -> Result<(), ConfigError> {
    let all: Vec<&Range> = sets.iter().flatten().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let same_family = a.start.is_ipv4() == b.start.is_ipv4();
            if same_family && a.start <= b.end && b.start <= a.end {
                return Err(ConfigError::OverlappingRanges(a.subnet, b.subnet));
            }
        }
    }
    Ok(())
}

impl Network {
    /// The gateway of the first range of the given family, if any.
    pub fn gateway_for(&self, v4: bool) -> Option<IpAddr> {
        self.range_sets
            .iter()
            .flatten()
            .find(|r| r.gateway.is_ipv4() == v4)
            .map(|r| r.gateway)
    }

    /// Requested addresses from config plus `CNI_ARGS` `IP=a,b`.
    pub fn requested_with_args(
        &self,
        args: &HashMap<String, String>,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        let mut out = self.requested.clone();
        if let Some(ips) = args.get("IP") {
            for raw in ips.split(',').filter(|s| !s.is_empty()) {
                out.push(parse_requested(raw)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(json: &str) -> Result<Network, ConfigError> {
        validate(parse(json.as_bytes())?)
    }

    const DUAL: &str = r#"{
        "cniVersion": "1.1.0", "name": "pods", "type": "keel-cni", "bridge": "kb0",
        "isGateway": true, "ipMasq": true, "mtu": 1400, "hairpinMode": true,
        "ipam": { "type": "host-local",
          "ranges": [[{"subnet": "10.22.0.0/24", "rangeStart": "10.22.0.10", "rangeEnd": "10.22.0.20"}],
                     [{"subnet": "fd00:22::/64"}]],
          "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
          "dataDir": "/tmp/x" }
    }"#;

    #[test]
    fn dual_stack_defaults() {
        let n = net(DUAL).unwrap();
        assert_eq!(n.bridge, "kb0");
        assert_eq!(n.range_sets.len(), 2);
        let v4 = &n.range_sets[0][0];
        assert_eq!(v4.gateway.to_string(), "10.22.0.1");
        assert_eq!(v4.start.to_string(), "10.22.0.10");
        let v6 = &n.range_sets[1][0];
        assert_eq!(v6.gateway.to_string(), "fd00:22::1");
        assert_eq!(v6.end.to_string(), "fd00:22::ffff:ffff:ffff:ffff");
        assert_eq!(n.data_dir, PathBuf::from("/tmp/x/pods"));
        assert_eq!(n.gateway_for(false).unwrap().to_string(), "fd00:22::1");
    }

    #[test]
    fn legacy_subnet_and_default_range() {
        let n = net(r#"{"cniVersion":"0.4.0","name":"n","type":"keel-cni","ipam":{"subnet":"10.1.2.3/24"}}"#)
            .unwrap();
        let r = &n.range_sets[0][0];
        assert_eq!(r.subnet.to_string(), "10.1.2.0/24");
        assert_eq!(r.end.to_string(), "10.1.2.254");
        assert_eq!(n.bridge, DEFAULT_BRIDGE);
    }

    #[test]
    fn errors_have_codes() {
        assert_eq!(net("{nope").unwrap_err().code(), 6);
        let e = net(r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownType(_)));
        assert_eq!(e.code(), 7);
        let e =
            net(r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni","ipam":{"type":"dhcp"}}"#)
                .unwrap_err();
        assert!(matches!(e, ConfigError::UnknownIpamType(_)));
        let e = net(r#"{"cniVersion":"9.0.0","name":"n","type":"keel-cni"}"#).unwrap_err();
        assert_eq!(e.code(), 1);
        let e = net(r#"{"cniVersion":"1.0.0","type":"keel-cni"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Missing("name")));
    }

    #[test]
    fn overlapping_ranges_rejected() {
        let e = net(
            r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni","ipam":{"ranges":[
            [{"subnet":"10.0.0.0/16"}], [{"subnet":"10.0.5.0/24"}]]}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::OverlappingRanges(..)), "{e}");
        // Same subnet split into disjoint ranges is fine.
        net(r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni","ipam":{"ranges":[
            [{"subnet":"10.0.0.0/24","rangeEnd":"10.0.0.100"},{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.101"}]]}}"#)
        .unwrap();
    }

    #[test]
    fn bad_ranges_rejected() {
        for ipam in [
            r#"{"ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.5"}]]}"#,
            r#"{"ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.5"}]]}"#,
            r#"{"ranges":[[{"subnet":"10.0.0.0/31"}]]}"#,
            r#"{"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"fd00::/64"}]]}"#,
            r#"{"ranges":[[]]}"#,
        ] {
            let j =
                format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"keel-cni","ipam":{ipam}}}"#);
            assert_eq!(net(&j).unwrap_err().code(), 7, "{ipam}");
        }
        let e = net(r#"{"cniVersion":"1.0.0","name":"n","type":"keel-cni","mtu":20}"#).unwrap_err();
        assert_eq!(e.code(), 7);
    }

    #[test]
    fn requested_addresses_from_all_sources() {
        let n = net(r#"{"cniVersion":"1.1.0","name":"n","type":"keel-cni",
            "runtimeConfig":{"ips":["10.0.0.7/24"]}, "args":{"cni":{"ips":["10.0.0.8"]}},
            "ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}"#)
        .unwrap();
        let mut args = HashMap::new();
        args.insert("IP".to_string(), "10.0.0.9".to_string());
        let all: Vec<String> = n
            .requested_with_args(&args)
            .unwrap()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(all, ["10.0.0.7", "10.0.0.8", "10.0.0.9"]);
    }

    #[test]
    fn gc_attachments_and_cni_versions() {
        let n = net(
            r#"{"cniVersions":["1.0.0","1.1.0"],"name":"n","type":"keel-cni",
            "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(n.cni_version, "1.1.0");
        assert_eq!(n.valid_attachments.unwrap()[0].container_id, "abc");
    }
}
