//! Node IPAM: every Node without `spec.podCIDR` gets the lowest free subnet of the cluster CIDR
//! (`/node_mask` each, kube-controller-manager's `--allocate-node-cidrs` with the range
//! allocator), written as `spec.podCIDR` and `spec.podCIDRs`. A deleted Node's subnet is free
//! again once the Node is gone. Agents give their range to keel-cni and route every other
//! node's range through that node (host-gw).
//!
//! Driven by a Node watch (reflector store): any Node event while some Node lacks a range
//! triggers a plan over the whole store (so a deleted Node's range goes to a waiting one). Subnets patched but not yet seen back through the watch count as taken, so
//! a burst of joining nodes never gets one subnet twice. IPv4 only; one allocator per cluster
//! (several `keel server`s on one etcd would need leader election first).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::api::alloc::Cidr;

/// What the allocator hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIpamConfig {
    pub cluster_cidr: Cidr,
    /// Prefix length of each node's range.
    pub node_mask: u8,
}

impl Default for NodeIpamConfig {
    /// `keel server`'s defaults: 10.42.0.0/16 in /24s (k3s's cluster CIDR).
    fn default() -> Self {
        NodeIpamConfig {
            cluster_cidr: "10.42.0.0/16".parse().expect("a valid CIDR"),
            node_mask: 24,
        }
    }
}

impl NodeIpamConfig {
    /// Checks that `/node_mask` ranges fit in the cluster CIDR and hold pods.
    pub fn new(cluster_cidr: Cidr, node_mask: u8) -> Result<NodeIpamConfig, String> {
        if node_mask < cluster_cidr.prefix || node_mask > 30 {
            return Err(format!(
                "the node mask size /{node_mask} must be between the cluster CIDR's /{} and /30",
                cluster_cidr.prefix
            ));
        }
        Ok(NodeIpamConfig {
            cluster_cidr,
            node_mask,
        })
    }

    fn ranges(&self) -> u32 {
        1u32 << (self.node_mask - self.cluster_cidr.prefix)
    }

    fn range(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cluster_cidr.base) + (n << (32 - self.node_mask)))
    }

    /// Which range `cidr` is, if it is one of ours.
    fn index_of(&self, cidr: &str) -> Option<u32> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        if len.parse::<u8>().ok()? != self.node_mask {
            return None;
        }
        let off = u32::from(ip).checked_sub(u32::from(self.cluster_cidr.base))?;
        let n = off >> (32 - self.node_mask);
        (n < self.ranges() && self.range(n) == ip).then_some(n)
    }

    fn format(&self, n: u32) -> String {
        format!("{}/{}", self.range(n), self.node_mask)
    }
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.pod_cidr.as_deref()
}

/// The ranges to give: `(node, cidr)` for each node without one, lowest free first, in name
/// order; `pending` ranges (patched, not yet seen) are taken. Nodes left over when the cluster
/// CIDR is exhausted come back in the second list.
pub fn plan(
    nodes: &[&Node],
    pending: &HashMap<String, String>,
    config: &NodeIpamConfig,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut taken: BTreeSet<u32> = nodes
        .iter()
        .filter_map(|n| pod_cidr(n))
        .chain(pending.values().map(String::as_str))
        .filter_map(|c| config.index_of(c))
        .collect();
    let mut wanting: Vec<String> = nodes
        .iter()
        .filter(|n| pod_cidr(n).is_none() && n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| n.metadata.name.clone())
        .filter(|name| !pending.contains_key(name))
        .collect();
    wanting.sort();
    let mut next = 0u32;
    let mut give = Vec::new();
    let mut left = Vec::new();
    for name in wanting {
        while taken.contains(&next) {
            next += 1;
        }
        if next >= config.ranges() {
            left.push(name);
            continue;
        }
        taken.insert(next);
        give.push((name, config.format(next)));
    }
    (give, left)
}

/// Runs the allocator until the Node watch ends.
pub async fn run(client: Arc<kube::Client>, config: NodeIpamConfig) {
    let nodes: Api<Node> = Api::all((*client).clone());
    let (reader, writer) = reflector::store();
    let stream = watcher(nodes.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    while let Some(ev) = stream.next().await {
        // Plans need the whole store: none while a (re)list is still arriving.
        match ev {
            Ok(watcher::Event::Apply(node)) => {
                if pod_cidr(&node).is_some()
                    && let Some(name) = &node.metadata.name
                {
                    pending.remove(name);
                }
            }
            Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => {}
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Err(e) => {
                tracing::warn!("node IPAM watch: {e}");
                continue;
            }
        }
        let state = reader.state();
        let all: Vec<&Node> = state.iter().map(|n| n.as_ref()).collect();
        // Forget pending ranges of nodes that are gone or show theirs.
        pending.retain(|name, _| {
            all.iter()
                .any(|n| n.metadata.name.as_deref() == Some(name.as_str()) && pod_cidr(n).is_none())
        });
        let wanting = all.iter().any(|n| {
            pod_cidr(n).is_none()
                && n.metadata
                    .name
                    .as_ref()
                    .is_some_and(|name| !pending.contains_key(name))
        });
        if !wanting {
            continue;
        }
        let (give, left) = plan(&all, &pending, &config);
        for name in left {
            if warned.insert(name.clone()) {
                tracing::warn!(
                    node = %name,
                    "the cluster CIDR {}/{} has no free /{} range left for this node",
                    config.cluster_cidr.base,
                    config.cluster_cidr.prefix,
                    config.node_mask
                );
            }
        }
        for (name, cidr) in give {
            let patch = serde_json::json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            match nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(node = %name, pod_cidr = %cidr, "node range allocated");
                    pending.insert(name, cidr);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(node = %name, "allocate the node range: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn node(name: &str, cidr: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(str::to_owned),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn config(cidr: &str, mask: u8) -> NodeIpamConfig {
        NodeIpamConfig::new(cidr.parse().unwrap(), mask).unwrap()
    }

    #[test]
    fn ranges_go_lowest_free_first_and_pending_ones_count() {
        let c = config("10.42.0.0/16", 24);
        let nodes = [
            node("c", None),
            node("a", Some("10.42.1.0/24")),
            node("b", None),
            node("d", None),
            // Not ours: ignored, neither taken nor given again.
            node("e", Some("192.168.0.0/24")),
        ];
        let refs: Vec<&Node> = nodes.iter().collect();
        let pending = HashMap::from([("d".to_owned(), "10.42.0.0/24".to_owned())]);
        let (give, left) = plan(&refs, &pending, &c);
        assert_eq!(
            give,
            vec![
                ("b".to_owned(), "10.42.2.0/24".to_owned()),
                ("c".to_owned(), "10.42.3.0/24".to_owned()),
            ]
        );
        assert!(left.is_empty());
    }

    #[test]
    fn an_exhausted_cluster_cidr_leaves_nodes_without_a_range() {
        let c = config("10.42.0.0/23", 24);
        let nodes = [node("a", None), node("b", None), node("c", None)];
        let refs: Vec<&Node> = nodes.iter().collect();
        let (give, left) = plan(&refs, &HashMap::new(), &c);
        assert_eq!(give.len(), 2);
        assert_eq!(give[1].1, "10.42.1.0/24");
        assert_eq!(left, vec!["c".to_owned()]);
    }

    #[test]
    fn mask_sizes_are_checked() {
        let cidr: Cidr = "10.42.0.0/16".parse().unwrap();
        assert!(NodeIpamConfig::new(cidr, 15).is_err());
        assert!(NodeIpamConfig::new(cidr, 31).is_err());
        let c = NodeIpamConfig::new(cidr, 26).unwrap();
        assert_eq!(c.format(5), "10.42.1.64/26");
        assert_eq!(c.index_of("10.42.1.64/26"), Some(5));
        assert_eq!(c.index_of("10.42.1.65/26"), None);
        assert_eq!(c.index_of("10.42.1.64/24"), None);
        assert_eq!(c.index_of("10.43.0.0/26"), None);
    }
}
