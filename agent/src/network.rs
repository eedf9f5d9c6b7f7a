//! The node's pod network when the cluster hands out node ranges (node IPAM): wait for the
//! Node's `spec.podCIDR`, install the CNI plugin with it (a hook given by whoever runs the
//! agent), then keep a route to every other node's range through that node's InternalIP
//! (host-gw: the nodes share an L2 underlay). Routes are tagged with routing protocol
//! [`ROUTE_PROTOCOL`]: the agent adds, replaces and removes only those.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use keel_cni::netlink::Netlink;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::{AgentError, api_err};

/// The routing protocol number of the agent's routes (`ip route show proto 0x6b`): unassigned
/// in /etc/iproute2/rt_protos, 'k' for keel.
pub const ROUTE_PROTOCOL: u8 = 0x6b;

/// Installs the node's CNI config for its range (a CIDR like `10.42.3.0/24`).
pub type InstallHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the agent does with the node's range.
#[derive(Clone)]
pub struct PodNetwork {
    /// Called once the Node has its range, before any pod is synced.
    pub install: InstallHook,
    /// Route the other nodes' ranges through them (host-gw).
    pub routes: bool,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetwork")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.pod_cidr.as_deref()
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// Waits until the Node `name` has a range (logging while it waits), and returns it.
pub(crate) async fn wait_for_pod_cidr(
    client: &kube::Client,
    name: &str,
) -> Result<String, AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut waited = Duration::ZERO;
    loop {
        let node = nodes
            .get(name)
            .await
            .map_err(api_err(format!("get node {name}")))?;
        if let Some(cidr) = pod_cidr(&node) {
            return Ok(cidr.to_owned());
        }
        if waited.as_millis().is_multiple_of(30_000) {
            tracing::info!(
                node = name,
                "waiting for the node's pod range (spec.podCIDR, from the server's node IPAM)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        waited += Duration::from_millis(200);
    }
}

/// The routes this node wants: every other node's IPv4 range through its InternalIP.
pub fn desired_routes(nodes: &[&Node], own: &str) -> BTreeMap<ipnet::IpNet, IpAddr> {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own))
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| {
            let cidr: ipnet::IpNet = pod_cidr(n)?.parse().ok()?;
            let via = internal_ip(n)?;
            (cidr.addr().is_ipv4() && via.is_ipv4() && !via.is_loopback())
                .then_some((cidr.trunc(), via))
        })
        .collect()
}

/// Makes the main table's agent routes exactly `want`; routes whose next hop no link reaches
/// are skipped with a warning. Returns how many routes changed.
pub fn apply_routes(want: &BTreeMap<ipnet::IpNet, IpAddr>) -> Result<usize, String> {
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    let have = nl
        .owned_routes(true, ROUTE_PROTOCOL)
        .map_err(|e| e.to_string())?;
    let mut changed = 0;
    for r in &have {
        if !want.contains_key(&r.dst) {
            nl.delete_owned_route(r.dst, ROUTE_PROTOCOL)
                .map_err(|e| e.to_string())?;
            tracing::info!(dst = %r.dst, "route to a node's pods removed");
            changed += 1;
        }
    }
    for (dst, via) in want {
        let Some(oif) = nl.link_towards(*via).map_err(|e| e.to_string())? else {
            tracing::warn!(%dst, %via, "no link reaches this node's address: no route to its pods");
            continue;
        };
        let current = have.iter().find(|r| r.dst == *dst);
        if current.is_some_and(|r| r.gw == Some(*via) && r.oif == Some(oif)) {
            continue;
        }
        nl.replace_owned_route(*dst, *via, oif, ROUTE_PROTOCOL)
            .map_err(|e| e.to_string())?;
        tracing::info!(%dst, %via, "route to a node's pods");
        changed += 1;
    }
    Ok(changed)
}

/// Keeps the routes to the other nodes' ranges as the Nodes change; never returns unless the
/// watch ends.
pub(crate) async fn route_loop(client: kube::Client, own: String) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client);
    let (reader, writer) = reflector::store();
    let stream = watcher(nodes, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut applied: Option<BTreeMap<ipnet::IpNet, IpAddr>> = None;
    let mut listed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                None => return Ok(()),
                Some(Err(e)) => { tracing::warn!("node watch (routes): {e}"); continue; }
                // Only whole stores: not while a (re)list is still arriving.
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => listed = true,
            },
            // Now and then even without changes: a route someone removed comes back.
            _ = tick.tick() => applied = None,
        }
        if !listed {
            continue;
        }
        let state = reader.state();
        let all: Vec<&Node> = state.iter().map(|n| n.as_ref()).collect();
        let want = desired_routes(&all, &own);
        if applied.as_ref() == Some(&want) {
            continue;
        }
        let w = want.clone();
        match tokio::task::spawn_blocking(move || apply_routes(&w)).await {
            Ok(Ok(_)) => applied = Some(want),
            Ok(Err(e)) => tracing::warn!("node routes: {e}"),
            Err(e) => tracing::warn!("node routes: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(str::to_owned),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: ip.map(|ip| {
                    vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn routes_go_to_every_other_node_with_a_range_and_an_address() {
        let nodes = [
            node("me", Some("10.42.0.0/24"), Some("192.168.5.1")),
            node("b", Some("10.42.1.0/24"), Some("192.168.5.2")),
            node("no-range", None, Some("192.168.5.3")),
            node("no-ip", Some("10.42.3.0/24"), None),
            node("loopback", Some("10.42.4.0/24"), Some("127.0.0.1")),
            node("v6", Some("fd00:42::/64"), Some("fd00::2")),
        ];
        let refs: Vec<&Node> = nodes.iter().collect();
        let want = desired_routes(&refs, "me");
        assert_eq!(
            want.into_iter().collect::<Vec<_>>(),
            vec![(
                "10.42.1.0/24".parse().unwrap(),
                "192.168.5.2".parse().unwrap()
            )]
        );
    }
}
