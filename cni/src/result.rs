//! The CNI result object: built by ADD, merged with a chain's `prevResult`, and written in the
//! version the runtime asked for (0.3.x/0.4.0 carry `ips[].version`; 1.1 adds interface `mtu`
//! and the extra route fields). Pure.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;

use crate::config::RouteConf;
use crate::protocol::version_at_least;

/// Result decoding failures (a malformed `prevResult`).
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// prevResult is not a CNI result.
    #[error("prevResult is not a CNI result: {0}")]
    Decode(#[from] serde_json::Error),
}

impl ResultError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        crate::protocol::code::DECODE_FAILURE
    }
}

/// One interface of the result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Netns path when the interface is inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// MTU (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Socket path (1.1), passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI id (1.1), passed through.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address of the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: IpNet,
    /// Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// "4" or "6": only before 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// Version this result is written in.
    #[serde(default)]
    pub cni_version: String,
    /// Interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConf>,
    /// DNS, passed through.
    #[serde(default, skip_serializing_if = "is_empty_dns")]
    pub dns: Value,
}

fn is_empty_dns(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(|o| o.is_empty())
}

impl CniResult {
    /// Decodes a `prevResult` of any supported version.
    pub fn from_value(v: &Value) -> Result<Self, ResultError> {
        Ok(serde_json::from_value(v.clone())?)
    }

    /// Appends `ours` to this (previous) result: interface indexes of `ours` shift past the
    /// existing interfaces; DNS is kept unless `ours` sets one.
    pub fn merge(mut self, ours: CniResult) -> CniResult {
        let base = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        for r in ours.routes {
            if !self.routes.contains(&r) {
                self.routes.push(r);
            }
        }
        if !is_empty_dns(&ours.dns) {
            self.dns = ours.dns;
        }
        self
    }

    /// Converts to the wire shape of `version`.
    pub fn for_version(mut self, version: &str) -> CniResult {
        let pre_1_0 = !version_at_least(version, "1.0.0");
        let pre_1_1 = !version_at_least(version, "1.1.0");
        for ip in &mut self.ips {
            ip.version = pre_1_0.then(|| {
                if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                }
                .to_string()
            });
        }
        if pre_1_1 {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for r in &mut self.routes {
                r.mtu = None;
                r.advmss = None;
                r.priority = None;
                r.table = None;
                r.scope = None;
            }
        }
        self.cni_version = version.to_string();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "kb0".into(),
                    mac: Some("aa:bb:cc:dd:ee:ff".into()),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/run/netns/p".into()),
                    mtu: Some(1400),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.0.0.2/24".parse().unwrap(),
                    gateway: Some("10.0.0.1".parse().unwrap()),
                    interface: Some(1),
                    version: None,
                },
                IpConfig {
                    address: "fd00::2/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                    version: None,
                },
            ],
            routes: vec![RouteConf {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.0.0.1".parse().unwrap()),
                mtu: Some(1400),
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn versions_shape_the_output() {
        let v = serde_json::to_value(sample().for_version("0.4.0")).unwrap();
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        assert!(v["interfaces"][1].get("mtu").is_none());
        assert!(v["routes"][0].get("mtu").is_none());
        assert!(v.get("dns").is_none());
        let v = serde_json::to_value(sample().for_version("1.0.0")).unwrap();
        assert!(v["ips"][0].get("version").is_none());
        let v = serde_json::to_value(sample().for_version("1.1.0")).unwrap();
        assert_eq!(v["interfaces"][1]["mtu"], 1400);
        assert_eq!(v["routes"][0]["mtu"], 1400);
        assert_eq!(v["ips"][0]["address"], "10.0.0.2/24");
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn round_trip_and_merge() {
        let prev_json = serde_json::json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "lo", "sandbox": "/x"}],
            "ips": [{"version": "4", "address": "192.168.0.5/24", "interface": 0}],
            "dns": {"nameservers": ["1.1.1.1"]}
        });
        let prev = CniResult::from_value(&prev_json).unwrap();
        let merged = prev.merge(sample());
        assert_eq!(merged.interfaces.len(), 3);
        assert_eq!(merged.ips[1].interface, Some(2));
        assert_eq!(merged.dns["nameservers"][0], "1.1.1.1");
        assert!(CniResult::from_value(&serde_json::json!({"ips": 5})).is_err());
    }
}
