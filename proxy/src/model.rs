//! Services + EndpointSlices -> the desired content of the service maps, as plain data.
//!
//! This is kube-proxy's translation, kept free of any kernel access: one frontend per
//! (clusterIP | externalIP | LoadBalancer IP | node IP for NodePort) x port x protocol; the
//! endpoints of the Service's slices whose port name matches; ready endpoints preferred and
//! serving+terminating ones used only when no endpoint is ready; internalTrafficPolicy=Local keeps
//! only this node's endpoints; ClientIP affinity with its timeout. This node's Pods add their
//! hostPorts (`hostport`) as NodePort-like frontends with the pod as the one backend; a Service
//! keeps a frontend a hostPort also names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use keel_ebpf::{
    BE_F_TERMINATING, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, L4Addr, SVC_F_EXTERNAL_IP,
    SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SvcKey,
};

pub mod hostport;

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What this node contributes to the translation.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    /// This node's name, for internalTrafficPolicy=Local (endpoint.nodeName).
    pub node_name: Option<String>,
    /// Addresses of this node on which NodePorts answer.
    pub node_ips: Vec<IpAddr>,
}

/// One frontend's wanted state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `namespace/name:port-name` for logs, metrics and `ls`.
    pub name: String,
    pub affinity_timeout: u32,
    pub flags: u32,
    /// Ready backends (sorted, unique). Empty means the service refuses connections.
    pub ready: Vec<L4Addr>,
    /// Serving but terminating backends, used only when `ready` is empty.
    pub terminating: Vec<L4Addr>,
}

pub type Desired = BTreeMap<SvcKey, DesiredService>;

/// Why an object was skipped (reported, never fatal: one bad Service must not stop the rest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub object: String,
    pub reason: String,
}

/// Translates the full set of Services and EndpointSlices.
pub fn desired(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> (Desired, Vec<Skipped>) {
    let mut out = Desired::new();
    let mut skipped = Vec::new();
    // (namespace, service name) -> slices
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        match s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            Some(svc) => by_service.entry((ns, svc.clone())).or_default().push(s),
            None => skipped.push(Skipped {
                object: format!(
                    "EndpointSlice {ns}/{}",
                    s.metadata.name.as_deref().unwrap_or("?")
                ),
                reason: format!("no {SERVICE_NAME_LABEL} label"),
            }),
        }
    }
    // By namespace/name, as the API source's Index orders its claimants: a frontend two
    // Services name (the same externalIP, say) is the first's, whichever source or order the
    // objects came in. A Service given twice is its last version.
    let mut by_name: BTreeMap<(String, String), &Service> = BTreeMap::new();
    for svc in services {
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        by_name.insert((ns, svc.metadata.name.clone().unwrap_or_default()), svc);
    }
    for ((ns, name), svc) in by_name {
        let no_slices = Vec::new();
        let svc_slices = by_service
            .get(&(ns.clone(), name.clone()))
            .unwrap_or(&no_slices);
        // A Service that fails halfway contributes nothing, as on the API source's path.
        let mut one = Desired::new();
        match translate_service(svc, &ns, &name, svc_slices, node, &mut one) {
            Ok(()) => {
                for (k, v) in one {
                    out.entry(k).or_insert(v);
                }
            }
            Err(reason) => skipped.push(Skipped {
                object: format!("Service {ns}/{name}"),
                reason,
            }),
        }
    }
    (out, skipped)
}

/// `desired` plus the hostPorts of this node's `pods`. A frontend a Service produces stays the
/// Service's: the pod naming it too is reported skipped (kube-proxy's Service rules and portmap's
/// DNAT would both match it, and which one wins there depends on chain order; here it is always
/// the Service, whose frontend other nodes and clients rely on). Between two pods the first by
/// namespace/name keeps it. A pod's other hostPorts still work.
pub fn desired_with_pods(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    node: &NodeContext,
) -> (Desired, Vec<Skipped>) {
    let (mut out, mut skipped) = desired(services, slices, node);
    let mut pods: Vec<(String, &Pod)> = pods.iter().map(|p| (hostport::pod_name(p), p)).collect();
    pods.sort_by(|a, b| a.0.cmp(&b.0));
    let mut by_pod: BTreeMap<SvcKey, String> = BTreeMap::new();
    for (name, pod) in pods {
        let object = format!("Pod {name}");
        match hostport::pod_frontends(pod, node) {
            Ok(d) => {
                for (k, want) in d {
                    match (out.get(&k), by_pod.get(&k)) {
                        (Some(_), Some(first)) => skipped.push(Skipped {
                            object: object.clone(),
                            reason: taken_reason(&k, &format!("Pod {first}")),
                        }),
                        (Some(svc), None) => skipped.push(Skipped {
                            object: object.clone(),
                            reason: taken_reason(&k, &format!("Service {}", svc.name)),
                        }),
                        (None, _) => {
                            by_pod.insert(k, name.clone());
                            out.insert(k, want);
                        }
                    }
                }
            }
            Err(reason) => skipped.push(Skipped { object, reason }),
        }
    }
    (out, skipped)
}

/// Why a pod's hostPort frontend `k` is not the pod's: `holder` keeps it.
pub fn taken_reason(k: &SvcKey, holder: &str) -> String {
    let ip = match k.ip() {
        Some(ip) => ip.to_string(),
        None => "?".into(),
    };
    format!(
        "hostPort {}/{} on {ip} is a frontend of {holder}, which keeps it; the pod's other \
         hostPorts are served",
        k.host_port(),
        keel_ebpf::proto_name(k.proto)
    )
}

/// Translates one Service with the slices that name it (the API source's per-event path: the
/// cost is that Service's, whatever the number of others). Same rules as `desired`.
pub fn desired_one(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> (Desired, Option<Skipped>) {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let mut out = Desired::new();
    match translate_service(svc, ns, name, slices, node, &mut out) {
        Ok(()) => (out, None),
        Err(reason) => (
            Desired::new(),
            Some(Skipped {
                object: format!("Service {ns}/{name}"),
                reason,
            }),
        ),
    }
}

fn proto_number(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(IPPROTO_TCP),
        "UDP" => Ok(IPPROTO_UDP),
        "SCTP" => Ok(IPPROTO_SCTP),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IP address"))
}

fn translate_service(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    out: &mut Desired,
) -> Result<(), String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Err("no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(());
    }
    let mut cluster_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        cluster_ips.push(ip.clone());
    }
    if cluster_ips.iter().any(|ip| ip == "None") {
        return Ok(()); // headless: DNS only
    }
    let cluster_ips = cluster_ips
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| parse_ip(s, "clusterIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|s| parse_ip(s, "externalIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let lb_ips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .map(|s| parse_ip(s, "loadBalancer ingress IP"))
        .collect::<Result<Vec<_>, _>>()?;
    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    } else {
        0
    };
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let is_nodeport = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));

    for port in spec.ports.iter().flatten() {
        let proto = proto_number(port.protocol.as_deref())?;
        let sport =
            u16::try_from(port.port).map_err(|_| format!("port {} out of range", port.port))?;
        let pname = port.name.clone().unwrap_or_default();
        let display = format!("{ns}/{name}:{pname}");
        let all = backends(slices, port, proto, None);
        let local = backends(slices, port, proto, node.node_name.as_deref());
        let mut add =
            |ip: IpAddr, p: u16, flags: u32, (ready, terminating): &(Vec<L4Addr>, Vec<L4Addr>)| {
                let family = keel_ebpf::encode_ip(ip).1;
                let keep =
                    |v: &Vec<L4Addr>| v.iter().filter(|b| b.family == family).copied().collect();
                out.insert(
                    SvcKey::new(ip, p, proto),
                    DesiredService {
                        name: display.clone(),
                        affinity_timeout,
                        flags,
                        ready: keep(ready),
                        terminating: keep(terminating),
                    },
                );
            };
        let internal = if internal_local && node.node_name.is_some() {
            &local
        } else {
            &all
        };
        let internal_flags = if internal_local { SVC_F_LOCAL_ONLY } else { 0 };
        for ip in &cluster_ips {
            add(*ip, sport, internal_flags, internal);
        }
        let external = if external_local && node.node_name.is_some() {
            &local
        } else {
            &all
        };
        let ext_flags = if external_local { SVC_F_LOCAL_ONLY } else { 0 };
        for ip in external_ips.iter().chain(&lb_ips) {
            add(*ip, sport, SVC_F_EXTERNAL_IP | ext_flags, external);
        }
        if is_nodeport && let Some(np) = port.node_port {
            let np = u16::try_from(np).map_err(|_| format!("nodePort {np} out of range"))?;
            for ip in &node.node_ips {
                add(*ip, np, SVC_F_NODEPORT | ext_flags, external);
            }
        }
    }
    Ok(())
}

/// (ready, terminating) backends of one service port, optionally only those on `node`.
fn backends(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    proto: u8,
    node: Option<&str>,
) -> (Vec<L4Addr>, Vec<L4Addr>) {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices are not load-balanced
        }
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                && proto_number(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        let Some(tport) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            if let Some(n) = node
                && ep.node_name.as_deref() != Some(n)
            {
                continue;
            }
            let cond = ep.conditions.clone().unwrap_or_default();
            let is_ready = cond.ready.unwrap_or(true);
            let is_terminating = cond.terminating.unwrap_or(false);
            let is_serving = cond.serving.unwrap_or(is_ready);
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if is_ready && !is_terminating {
                    ready.insert(L4Addr::new(ip, tport, 0));
                } else if is_serving && is_terminating {
                    terminating.insert(L4Addr::new(ip, tport, BE_F_TERMINATING));
                }
            }
        }
    }
    (
        ready.into_iter().collect(),
        terminating.into_iter().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_manifests;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  type: NodePort
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.1.2]
  conditions: {ready: true}
  nodeName: n1
- addresses: [10.0.2.2]
  nodeName: n2
- addresses: [10.0.3.2]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.4.2]
  conditions: {ready: false, serving: false, terminating: false}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn translates_cluster_ip_nodeport_affinity_and_conditions() {
        let m = parse_manifests(MANIFESTS).unwrap();
        let node = NodeContext {
            node_name: Some("n1".into()),
            node_ips: vec![ip("192.168.1.5")],
        };
        let (d, skipped) = desired(&m.services, &m.slices, &node);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            d.len(),
            3,
            "http + dns on the clusterIP, http on the node IP"
        );
        let http = &d[&SvcKey::new(ip("10.96.0.10"), 80, IPPROTO_TCP)];
        assert_eq!(http.name, "shop/web:http");
        assert_eq!(http.affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
        assert_eq!(
            http.ready,
            vec![
                L4Addr::new(ip("10.0.1.2"), 8080, 0),
                L4Addr::new(ip("10.0.2.2"), 8080, 0)
            ]
        );
        assert_eq!(
            http.terminating,
            vec![L4Addr::new(ip("10.0.3.2"), 8080, BE_F_TERMINATING)]
        );
        let dns = &d[&SvcKey::new(ip("10.96.0.10"), 53, IPPROTO_UDP)];
        assert_eq!(dns.ready[0].host_port(), 5353);
        let np = &d[&SvcKey::new(ip("192.168.1.5"), 30080, IPPROTO_TCP)];
        assert_eq!(np.flags, SVC_F_NODEPORT);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let text = MANIFESTS.replace("sessionAffinity: ClientIP", "internalTrafficPolicy: Local");
        let m = parse_manifests(&text).unwrap();
        let node = NodeContext {
            node_name: Some("n1".into()),
            node_ips: vec![],
        };
        let (d, _) = desired(&m.services, &m.slices, &node);
        let http = &d[&SvcKey::new(ip("10.96.0.10"), 80, IPPROTO_TCP)];
        assert_eq!(http.ready, vec![L4Addr::new(ip("10.0.1.2"), 8080, 0)]);
        assert_eq!(http.flags, SVC_F_LOCAL_ONLY);
        assert_eq!(http.affinity_timeout, 0);
    }

    #[test]
    fn a_service_failing_halfway_contributes_nothing() {
        let text = MANIFESTS.replace("protocol: UDP}", "protocol: QUIC}");
        let m = parse_manifests(&text).unwrap();
        let (d, skipped) = desired(&m.services, &m.slices, &NodeContext::default());
        assert!(
            d.is_empty(),
            "the http port translated before dns failed: {d:?}"
        );
        assert_eq!(skipped.len(), 1);
        let (one, why) = desired_one(&m.services[0], &[], &NodeContext::default());
        assert!(one.is_empty());
        assert!(why.unwrap().reason.contains("QUIC"));
    }

    #[test]
    fn bad_service_is_skipped_with_a_reason() {
        let text = MANIFESTS.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.999");
        let m = parse_manifests(&text).unwrap();
        let (d, skipped) = desired(&m.services, &m.slices, &NodeContext::default());
        assert!(d.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].reason.contains("10.96.0.999"),
            "{:?}",
            skipped[0]
        );
    }

    /// A pod named `name` on node `node` with `ports` (YAML flow list of container ports) and
    /// `status` (YAML flow mapping).
    fn pod(name: &str, node: &str, ports: &str, status: &str) -> Pod {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  nodeName: {node}\n  containers:\n  - {{name: c, image: x, ports: {ports}}}\nstatus: {status}\n"
        );
        parse_manifests(&text).unwrap().pods.remove(0)
    }

    const RUNNING: &str =
        "{phase: Running, podIP: 10.0.1.7, podIPs: [{ip: 10.0.1.7}, {ip: 'fd10::7'}]}";

    fn dual_stack_n1() -> NodeContext {
        NodeContext {
            node_name: Some("n1".into()),
            node_ips: vec![ip("192.168.1.5"), ip("fd00::5")],
        }
    }

    fn only(l: &[L4Addr]) -> String {
        assert_eq!(l.len(), 1, "exactly one backend: {l:?}");
        let b = l[0];
        match b.ip().unwrap() {
            IpAddr::V6(v6) => format!("[{v6}]:{}", b.host_port()),
            v4 => format!("{v4}:{}", b.host_port()),
        }
    }

    #[test]
    fn host_ports_answer_on_node_ips_or_host_ip_with_the_pod_of_the_same_family() {
        let p = pod(
            "web-0",
            "n1",
            "[{containerPort: 80, hostPort: 8080}, \
              {containerPort: 53, hostPort: 5353, protocol: UDP, hostIP: 192.168.1.5}, \
              {containerPort: 90, hostPort: 9090, hostIP: 0.0.0.0}, \
              {containerPort: 91, hostPort: 9191, hostIP: '::'}, \
              {containerPort: 7000}]",
            RUNNING,
        );
        let (d, skipped) = desired_with_pods(&[], &[], &[p], &dual_stack_n1());
        assert!(skipped.is_empty(), "{skipped:?}");
        let mut got: Vec<(String, u16, u8, String)> = d
            .iter()
            .map(|(k, v)| {
                (
                    k.ip().unwrap().to_string(),
                    k.host_port(),
                    k.proto,
                    only(&v.ready),
                )
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("192.168.1.5", 5353, IPPROTO_UDP, "10.0.1.7:53"),
                ("192.168.1.5", 8080, IPPROTO_TCP, "10.0.1.7:80"),
                ("192.168.1.5", 9090, IPPROTO_TCP, "10.0.1.7:90"),
                ("fd00::5", 8080, IPPROTO_TCP, "[fd10::7]:80"),
                ("fd00::5", 9191, IPPROTO_TCP, "[fd10::7]:91"),
            ]
            .map(|(a, p, pr, b)| (a.to_string(), p, pr, b.to_string()))
        );
        let web = &d[&SvcKey::new(ip("192.168.1.5"), 8080, IPPROTO_TCP)];
        assert_eq!(web.name, "shop/web-0:8080/TCP");
        assert_eq!(
            web.flags,
            SVC_F_NODEPORT | SVC_F_LOCAL_ONLY,
            "local: no SNAT"
        );
        assert_eq!(web.affinity_timeout, 0);
        assert!(web.terminating.is_empty());
        assert_eq!(
            d[&SvcKey::new(ip("192.168.1.5"), 5353, IPPROTO_UDP)].name,
            "shop/web-0:5353/UDP"
        );

        // A single-stack pod on the dual-stack node answers on the IPv4 node IP only.
        let v4 = pod(
            "v4",
            "n1",
            "[{containerPort: 80, hostPort: 8080}]",
            "{podIP: 10.0.1.8}",
        );
        let (d, skipped) = desired_with_pods(&[], &[], &[v4], &dual_stack_n1());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(d.len(), 1);
        assert_eq!(
            only(&d[&SvcKey::new(ip("192.168.1.5"), 8080, IPPROTO_TCP)].ready),
            "10.0.1.8:80"
        );
    }

    #[test]
    fn only_running_pods_of_this_node_with_an_address_count() {
        let ports = "[{containerPort: 80, hostPort: 8080}]";
        let key = SvcKey::new(ip("192.168.1.5"), 8080, IPPROTO_TCP);
        let count = |p: Pod, node: &NodeContext| {
            let (d, skipped) = desired_with_pods(&[], &[], &[p], node);
            assert!(skipped.is_empty(), "{skipped:?}");
            d.contains_key(&key)
        };
        let n1 = dual_stack_n1();
        assert!(count(pod("a", "n1", ports, RUNNING), &n1));
        assert!(
            !count(pod("a", "n2", ports, RUNNING), &n1),
            "another node's pod"
        );
        for phase in ["Succeeded", "Failed"] {
            let status = RUNNING.replace("Running", phase);
            assert!(!count(pod("a", "n1", ports, &status), &n1), "{phase}");
        }
        assert!(
            !count(pod("a", "n1", ports, "{phase: Pending}"), &n1),
            "no address yet"
        );
        let mut deleting = pod("a", "n1", ports, RUNNING);
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_str("\"2026-12-03T10:00:00Z\"").unwrap());
        assert!(
            count(deleting, &n1),
            "a pod being deleted serves until it stops"
        );
        // No node name (a manifests file and no --node-name): the file's pods are this node's.
        let anonymous = NodeContext {
            node_name: None,
            ..dual_stack_n1()
        };
        assert!(count(pod("a", "n2", ports, RUNNING), &anonymous));
        // No node IP and no hostIP: nowhere to answer.
        assert!(!count(
            pod("a", "n1", ports, RUNNING),
            &NodeContext::default()
        ));
    }

    #[test]
    fn a_service_keeps_a_frontend_a_host_port_also_names() {
        let m = parse_manifests(MANIFESTS).unwrap();
        let clash = pod(
            "clash",
            "n1",
            "[{containerPort: 80, hostPort: 30080}, {containerPort: 81, hostPort: 8081}]",
            RUNNING,
        );
        let second = pod(
            "second",
            "n1",
            "[{containerPort: 82, hostPort: 8081}]",
            RUNNING,
        );
        let node = NodeContext {
            node_name: Some("n1".into()),
            node_ips: vec![ip("192.168.1.5")],
        };
        // Given in the wrong order: the first by namespace/name wins, not the first listed.
        let (d, skipped) = desired_with_pods(&m.services, &m.slices, &[second, clash], &node);
        let np = &d[&SvcKey::new(ip("192.168.1.5"), 30080, IPPROTO_TCP)];
        assert_eq!(np.name, "shop/web:http");
        assert_eq!(np.flags, SVC_F_NODEPORT);
        assert_eq!(np.ready.len(), 2, "the Service's endpoints, not the pod");
        let other = &d[&SvcKey::new(ip("192.168.1.5"), 8081, IPPROTO_TCP)];
        assert_eq!(
            other.name, "shop/clash:8081/TCP",
            "the pod's other hostPort is served"
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].object, "Pod shop/clash");
        assert!(
            skipped[0].reason.contains("30080/TCP on 192.168.1.5")
                && skipped[0].reason.contains("Service shop/web:http"),
            "{skipped:?}"
        );
        assert_eq!(skipped[1].object, "Pod shop/second");
        assert!(skipped[1].reason.contains("Pod shop/clash"), "{skipped:?}");
    }

    #[test]
    fn bad_host_port_values_skip_the_pod_naming_the_field() {
        let good = "{containerPort: 80, hostPort: 8080}";
        let cases = [
            (
                format!("[{good}, {{containerPort: 80, hostPort: 70000}}]"),
                RUNNING,
                "spec.containers[0].ports[1].hostPort 70000",
            ),
            (
                format!("[{good}, {{containerPort: 80, hostPort: -1}}]"),
                RUNNING,
                "ports[1].hostPort -1",
            ),
            (
                format!("[{{containerPort: 0, hostPort: 8081}}, {good}]"),
                RUNNING,
                "ports[0].containerPort 0",
            ),
            (
                format!("[{good}, {{containerPort: 80, hostPort: 8081, hostIP: 1.2.3}}]"),
                RUNNING,
                "ports[1].hostIP \"1.2.3\"",
            ),
            (
                format!("[{good}, {{containerPort: 80, hostPort: 8081, protocol: QUIC}}]"),
                RUNNING,
                "ports[1].protocol: unknown protocol \"QUIC\"",
            ),
            (
                format!("[{good}]"),
                "{podIP: 10.0.0.x}",
                "status.podIP \"10.0.0.x\"",
            ),
            (
                format!("[{good}]"),
                "{podIPs: [{ip: nope}]}",
                "status.podIPs \"nope\"",
            ),
            (
                format!("[{good}, {{containerPort: 80, hostPort: 8081, hostIP: 'fd00::5'}}]"),
                "{podIP: 10.0.1.7}",
                "ports[1].hostIP fd00::5: the pod has no IPv6 address",
            ),
            (
                format!("[{good}, {{containerPort: 81, hostPort: 8080}}]"),
                RUNNING,
                "ports[1].hostPort 8080/TCP on 192.168.1.5 is declared twice",
            ),
        ];
        for (ports, status, want) in cases {
            let p = pod("bad", "n1", &ports, status);
            let (d, skipped) = desired_with_pods(&[], &[], &[p], &dual_stack_n1());
            assert!(
                d.is_empty(),
                "{ports}: the good port is not served either: {d:?}"
            );
            assert_eq!(skipped.len(), 1, "{ports}");
            assert_eq!(skipped[0].object, "Pod shop/bad");
            assert!(
                skipped[0].reason.contains(want),
                "{ports}: {:?} lacks {want:?}",
                skipped[0].reason
            );
        }
    }
}
