//! Service ClusterIP allocation from the service CIDR and NodePort allocation from the node port
//! range.
//!
//! Each allocated IP or port is a key in the store (`/registry/ranges/serviceips/<ip>`,
//! `/registry/ranges/servicenodeports/<port>`), taken with the store's create, so two API servers
//! sharing an etcd never hand out the same one. Allocation happens before the Service is written
//! and is released when that write fails, when the Service is deleted, or when an update stops
//! using it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use super::status::{ApiError, Cause};
use crate::store::{ListOptions, Store, StoreError};

const IP_PREFIX: &str = "/registry/ranges/serviceips/";
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";
/// Random probes before scanning for a free slot.
const PROBES: usize = 32;

/// A service CIDR like `10.96.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected an IPv4 CIDR like 10.96.0.0/12"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|e| format!("{s:?}: prefix length: {e}"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{s:?}: prefix length must be between 8 and 30"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Cidr {
            base: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }
}

impl Cidr {
    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let off = u32::from(ip).wrapping_sub(u32::from(self.base));
        off < self.size()
    }

    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + n)
    }

    /// The first host address: the `kubernetes` Service's ClusterIP.
    pub fn first(&self) -> Ipv4Addr {
        self.nth(1)
    }
}

/// Hands out ClusterIPs and NodePorts.
pub struct Allocator {
    store: Arc<dyn Store>,
    pub cidr: Cidr,
    pub node_ports: RangeInclusive<u16>,
}

impl Allocator {
    pub fn new(store: Arc<dyn Store>, cidr: Cidr, node_ports: RangeInclusive<u16>) -> Allocator {
        Allocator {
            store,
            cidr,
            node_ports,
        }
    }

    async fn take(&self, key: String) -> Result<bool, ApiError> {
        match self.store.create(key.as_bytes(), Bytes::new()).await {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn used(&self, prefix: &str) -> Result<BTreeSet<String>, ApiError> {
        let mut used = BTreeSet::new();
        let mut opts = ListOptions::default();
        loop {
            let page = self.store.list(prefix.as_bytes(), opts.clone()).await?;
            for kv in &page.items {
                used.insert(String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned());
            }
            match page.next {
                Some(next) => {
                    opts = ListOptions {
                        revision: Some(page.revision),
                        limit: 0,
                        start: Some(next),
                    }
                }
                None => return Ok(used),
            }
        }
    }

    /// Takes `requested`, or a free address; 422 when the requested one is taken or outside.
    pub async fn allocate_ip(&self, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, ApiError> {
        if let Some(ip) = requested {
            if !self.cidr.contains(ip) {
                return Err(invalid_field(
                    "spec.clusterIP",
                    format!(
                        "Invalid value: {ip:?}: provided IP is not in the valid range ({}/{})",
                        self.cidr.base, self.cidr.prefix
                    ),
                ));
            }
            if !self.take(format!("{IP_PREFIX}{ip}")).await? {
                return Err(invalid_field(
                    "spec.clusterIP",
                    format!("Invalid value: {ip:?}: provided IP is already allocated"),
                ));
            }
            return Ok(ip);
        }
        // .0 is the network, .1 the kubernetes Service, the last the broadcast address.
        let last = self.cidr.size() - 2;
        for _ in 0..PROBES {
            let ip = self.cidr.nth(rand::random_range(2..=last));
            if self.take(format!("{IP_PREFIX}{ip}")).await? {
                return Ok(ip);
            }
        }
        let used = self.used(IP_PREFIX).await?;
        for n in 2..=last {
            let ip = self.cidr.nth(n);
            if !used.contains(&ip.to_string()) && self.take(format!("{IP_PREFIX}{ip}")).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::internal(
            "the service CIDR is full: no ClusterIP left to allocate",
        ))
    }

    pub async fn release_ip(&self, ip: &str) {
        let _ = self
            .store
            .delete(format!("{IP_PREFIX}{ip}").as_bytes(), None)
            .await;
    }

    /// Takes `requested`, or a free port of the range.
    pub async fn allocate_port(
        &self,
        requested: Option<u16>,
        field: &str,
    ) -> Result<u16, ApiError> {
        if let Some(p) = requested {
            if !self.node_ports.contains(&p) {
                return Err(invalid_field(
                    field,
                    format!(
                        "Invalid value: {p}: provided port is not in the valid range. The range of valid ports is {}-{}",
                        self.node_ports.start(),
                        self.node_ports.end()
                    ),
                ));
            }
            if !self.take(format!("{PORT_PREFIX}{p}")).await? {
                return Err(invalid_field(
                    field,
                    format!("Invalid value: {p}: provided port is already allocated"),
                ));
            }
            return Ok(p);
        }
        for _ in 0..PROBES {
            let p = rand::random_range(self.node_ports.clone());
            if self.take(format!("{PORT_PREFIX}{p}")).await? {
                return Ok(p);
            }
        }
        let used = self.used(PORT_PREFIX).await?;
        for p in self.node_ports.clone() {
            if !used.contains(&p.to_string()) && self.take(format!("{PORT_PREFIX}{p}")).await? {
                return Ok(p);
            }
        }
        Err(ApiError::internal("the node port range is full"))
    }

    pub async fn release_port(&self, port: u16) {
        let _ = self
            .store
            .delete(format!("{PORT_PREFIX}{port}").as_bytes(), None)
            .await;
    }

    /// Allocates what a new or updated Service needs, copying what `old` already holds. Returns
    /// what was newly taken, to release if the write fails.
    pub async fn prepare_service(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Taken, ApiError> {
        let mut taken = Taken::default();
        let result = self.prepare_inner(svc, old, &mut taken).await;
        if let Err(e) = result {
            self.release(&taken).await;
            return Err(e);
        }
        Ok(taken)
    }

    async fn prepare_inner(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        taken: &mut Taken,
    ) -> Result<(), ApiError> {
        let ty = svc["spec"]["type"]
            .as_str()
            .unwrap_or("ClusterIP")
            .to_string();
        let old_ip = old
            .and_then(|o| o["spec"]["clusterIP"].as_str())
            .filter(|s| !s.is_empty());
        let want_ip = svc["spec"]["clusterIP"].as_str().unwrap_or("").to_string();
        if ty == "ExternalName" {
            // No ClusterIP; the old one (if any) is released after the write.
        } else if let Some(old_ip) = old_ip {
            if !want_ip.is_empty() && want_ip != old_ip {
                return Err(invalid_field(
                    "spec.clusterIP",
                    format!("Invalid value: {want_ip:?}: field is immutable"),
                ));
            }
            svc["spec"]["clusterIP"] = json!(old_ip);
            svc["spec"]["clusterIPs"] = json!([old_ip]);
        } else if want_ip == "None" {
            svc["spec"]["clusterIPs"] = json!(["None"]);
        } else {
            let requested = if want_ip.is_empty() {
                None
            } else {
                Some(want_ip.parse::<Ipv4Addr>().map_err(|_| {
                    invalid_field(
                        "spec.clusterIP",
                        format!("Invalid value: {want_ip:?}: must be a valid IPv4 address"),
                    )
                })?)
            };
            let ip = self.allocate_ip(requested).await?;
            taken.ips.push(ip.to_string());
            svc["spec"]["clusterIP"] = json!(ip.to_string());
            svc["spec"]["clusterIPs"] = json!([ip.to_string()]);
        }
        if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
            let old_ports: Vec<(i64, i64)> = old
                .and_then(|o| o["spec"]["ports"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p["port"].as_i64()?, p["nodePort"].as_i64()?)))
                .collect();
            let n = svc["spec"]["ports"].as_array().map_or(0, Vec::len);
            for i in 0..n {
                let p = &svc["spec"]["ports"][i];
                let port = p["port"].as_i64().unwrap_or(0);
                let field = format!("spec.ports[{i}].nodePort");
                let np = match p["nodePort"].as_i64() {
                    Some(np) if old_ports.iter().any(|&(_, o)| o == np) => np as u16,
                    Some(np) => {
                        let np = u16::try_from(np)
                            .map_err(|_| invalid_field(&field, format!("Invalid value: {np}")))?;
                        let got = self.allocate_port(Some(np), &field).await?;
                        taken.ports.push(got);
                        got
                    }
                    None => match old_ports.iter().find(|&&(op, _)| op == port) {
                        Some(&(_, np)) => np as u16,
                        None => {
                            let got = self.allocate_port(None, &field).await?;
                            taken.ports.push(got);
                            got
                        }
                    },
                };
                svc["spec"]["ports"][i]["nodePort"] = json!(np);
            }
        }
        Ok(())
    }

    /// Releases what `old` held and `new` (if any) no longer does.
    pub async fn release_unused(&self, old: &Value, new: Option<&Value>) {
        let held = Taken::of(old);
        let keep = new.map(Taken::of).unwrap_or_default();
        for ip in held.ips.iter().filter(|ip| !keep.ips.contains(ip)) {
            self.release_ip(ip).await;
        }
        for p in held.ports.iter().filter(|p| !keep.ports.contains(p)) {
            self.release_port(*p).await;
        }
    }

    pub async fn release(&self, taken: &Taken) {
        for ip in &taken.ips {
            self.release_ip(ip).await;
        }
        for p in &taken.ports {
            self.release_port(*p).await;
        }
    }
}

/// IPs and ports a Service holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Taken {
    pub ips: Vec<String>,
    pub ports: Vec<u16>,
}

impl Taken {
    fn of(svc: &Value) -> Taken {
        let ips = svc["spec"]["clusterIP"]
            .as_str()
            .filter(|s| !s.is_empty() && *s != "None")
            .map(|s| vec![s.to_string()])
            .unwrap_or_default();
        let ports = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()))
            .collect();
        Taken { ips, ports }
    }
}

fn invalid_field(field: &str, message: String) -> ApiError {
    ApiError::invalid("", "Service", "", vec![Cause::new(field, message)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.96.0.7/12".parse().unwrap();
        assert_eq!(c.base, Ipv4Addr::new(10, 96, 0, 0));
        assert_eq!(c.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(c.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 112, 0, 0)));
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/31".parse::<Cidr>().is_err());
    }
}
