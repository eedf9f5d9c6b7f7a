//! Pods' hostPorts -> frontends of the service maps: what the CNI `portmap` plugin does with
//! iptables DNAT rules, done by the programs and maps that serve NodePorts, so pods need no
//! portmap plugin and no netfilter rule.
//!
//! A pod counts when it is on this node (`spec.nodeName` is `NodeContext::node_name`; with no
//! node name, as with `--manifests` and no `--node-name`, every pod of the source counts, and so
//! does a pod without `spec.nodeName` in a manifests file), has not terminated (phase not
//! `Succeeded`/`Failed`; a pod being deleted keeps its ports until it stops, as portmap's rules
//! stay until CNI DEL) and has an address (`status.podIPs`, else `status.podIP`). Every port of
//! `spec.containers[].ports[]` with a `hostPort` becomes one frontend per address:
//! `hostIP` when it is a specific address, else every node IP (`0.0.0.0`: the IPv4 ones, `::`
//! the IPv6 ones, as portmap reads them), each with the pod address of its family as the one
//! ready backend (`containerPort`). The flags are a NodePort's with externalTrafficPolicy=Local:
//! the backend is on this node, so the client's address is kept (no masquerade), as with portmap.
//!
//! Bad values (ports out of range, an address that does not parse, an unknown protocol, a
//! specific `hostIP` of a family the pod has no address of, a frontend named twice) skip the whole
//! pod with a reason naming the field. Collisions with Services are decided by the callers
//! (`model::desired_with_pods`, `kube_source::Index`): the Service keeps the frontend.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use keel_ebpf::{L4Addr, SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SvcKey};

use super::{Desired, DesiredService, NodeContext, parse_ip, proto_number};

/// The map flags of every hostPort frontend.
pub const HOSTPORT_FLAGS: u32 = SVC_F_NODEPORT | SVC_F_LOCAL_ONLY;

/// Whether `pod` declares any hostPort (the API source keeps only those pods: a pod's ports
/// cannot change after creation).
pub fn has_host_ports(pod: &Pod) -> bool {
    pod.spec.iter().flat_map(|s| &s.containers).any(|c| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.host_port.is_some_and(|h| h != 0))
    })
}

/// Whether this node serves `pod`'s hostPorts (see the module doc).
pub fn on_node(pod: &Pod, node: &NodeContext) -> bool {
    let Some(want) = node.node_name.as_deref() else {
        return true;
    };
    match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        None | Some("") => true,
        Some(n) => n == want,
    }
}

/// `namespace/name` of a pod.
pub fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The frontends `pod` contributes (empty when it does not count), or why it contributes none.
pub fn pod_frontends(pod: &Pod, node: &NodeContext) -> Result<Desired, String> {
    let mut out = Desired::new();
    if !has_host_ports(pod) || !on_node(pod, node) {
        return Ok(out);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(out);
    }
    let mut pod_ips = Vec::new();
    if let Some(s) = status {
        let listed: Vec<&str> = s.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
        let (field, ips) = if listed.is_empty() {
            ("status.podIP", s.pod_ip.as_deref().into_iter().collect())
        } else {
            ("status.podIPs", listed)
        };
        for ip in ips.into_iter().filter(|s| !s.is_empty()) {
            pod_ips.push(parse_ip(ip, field)?);
        }
    }
    if pod_ips.is_empty() {
        return Ok(out); // not started yet: nothing to forward to
    }
    let name = pod_name(pod);
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().enumerate());
    for (ci, c) in containers {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let Some(hp) = p.host_port.filter(|h| *h != 0) else {
                continue;
            };
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let port = |v: i32, what: &str| {
                u16::try_from(v)
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("{field}.{what} {v} out of range (1-65535)"))
            };
            let host_port = port(hp, "hostPort")?;
            let container_port = port(p.container_port, "containerPort")?;
            let proto = proto_number(p.protocol.as_deref())
                .map_err(|e| format!("{field}.protocol: {e}"))?;
            let host_ip = match p.host_ip.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => Some(parse_ip(s, &format!("{field}.hostIP"))?),
                None => None,
            };
            let frontends: Vec<IpAddr> = match host_ip {
                Some(ip) if !ip.is_unspecified() => {
                    if !pod_ips.iter().any(|p| p.is_ipv4() == ip.is_ipv4()) {
                        return Err(format!(
                            "{field}.hostIP {ip}: the pod has no {} address",
                            family_name(&ip)
                        ));
                    }
                    vec![ip]
                }
                Some(any) => node
                    .node_ips
                    .iter()
                    .filter(|n| n.is_ipv4() == any.is_ipv4())
                    .copied()
                    .collect(),
                None => node.node_ips.clone(),
            };
            let display = format!(
                "{name}:{host_port}/{}",
                p.protocol.as_deref().unwrap_or("TCP")
            );
            for ip in frontends {
                // A dual-stack node and a single-stack pod: only the pod's family answers.
                let Some(backend) = pod_ips.iter().find(|b| b.is_ipv4() == ip.is_ipv4()) else {
                    continue;
                };
                let key = SvcKey::new(ip, host_port, proto);
                let want = DesiredService {
                    name: display.clone(),
                    affinity_timeout: 0,
                    flags: HOSTPORT_FLAGS,
                    ready: vec![L4Addr::new(*backend, container_port, 0)],
                    terminating: Vec::new(),
                };
                if out.insert(key, want).is_some() {
                    return Err(format!(
                        "{field}.hostPort {host_port}/{} on {ip} is declared twice",
                        p.protocol.as_deref().unwrap_or("TCP")
                    ));
                }
            }
        }
    }
    Ok(out)
}
