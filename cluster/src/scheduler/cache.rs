//! What the scheduler knows of the cluster: every node with what its assigned pods already
//! request, built from watch events and from its own decisions ("assumed" pods, counted at once
//! so that the next decision does not pick a node the last one filled before the watch says so).
//!
//! Pure data: no client, no clock. Pods are keyed by uid, so a watch event for a pod the
//! scheduler already assumed changes nothing, and a delete frees exactly what was counted.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};

use super::quantity;

/// What a pod asks of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Needs {
    pub cpu_milli: i64,
    pub memory: i64,
    /// (protocol, hostIP or "", hostPort) of every container port with a hostPort.
    pub host_ports: Vec<(String, String, i32)>,
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: any term must match; within a term every expression.
    pub affinity_terms: Vec<Vec<Expr>>,
    pub tolerations: Vec<Toleration>,
    /// The controller owner's uid: replicas of one owner are spread.
    pub owner: Option<String>,
}

/// One node selector requirement (`matchExpressions` or `matchFields` on metadata.name).
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// A label key, or `metadata.name` for a field requirement.
    pub key: String,
    pub field: bool,
    pub op: String,
    pub values: Vec<String>,
}

/// A node as the filters and scores see it.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub ready: bool,
    pub unschedulable: bool,
    pub alloc_cpu_milli: i64,
    pub alloc_memory: i64,
    pub alloc_pods: i64,
    pub used_cpu_milli: i64,
    pub used_memory: i64,
    pub pods: i64,
    pub host_ports: HashSet<(String, String, i32)>,
    /// Pods per controller owner uid.
    pub owners: HashMap<String, u32>,
}

impl Needs {
    /// Reads a pod's requests: the sum over containers (limits where a request is missing, as
    /// the API server defaults it), at least the largest init container.
    pub fn of(pod: &Pod) -> Needs {
        let mut n = Needs::default();
        let Some(spec) = &pod.spec else { return n };
        let req = |c: &k8s_openapi::api::core::v1::Container, name: &str, cpu: bool| -> i64 {
            let r = c.resources.as_ref();
            let q = r
                .and_then(|r| r.requests.as_ref())
                .and_then(|m| m.get(name))
                .or_else(|| r.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(name)));
            q.and_then(|q| {
                if cpu {
                    quantity::milli(&q.0).ok()
                } else {
                    quantity::units(&q.0).ok()
                }
            })
            .unwrap_or(0)
            .max(0)
        };
        for c in &spec.containers {
            n.cpu_milli += req(c, "cpu", true);
            n.memory += req(c, "memory", false);
            for p in c.ports.iter().flatten() {
                if let Some(hp) = p.host_port.filter(|hp| *hp > 0) {
                    n.host_ports.push((
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        p.host_ip.clone().unwrap_or_default(),
                        hp,
                    ));
                }
            }
        }
        for c in spec.init_containers.iter().flatten() {
            n.cpu_milli = n.cpu_milli.max(req(c, "cpu", true));
            n.memory = n.memory.max(req(c, "memory", false));
        }
        if let Some(overhead) = &spec.overhead {
            n.cpu_milli += overhead
                .get("cpu")
                .and_then(|q| quantity::milli(&q.0).ok())
                .unwrap_or(0);
            n.memory += overhead
                .get("memory")
                .and_then(|q| quantity::units(&q.0).ok())
                .unwrap_or(0);
        }
        n.node_selector = spec.node_selector.clone().unwrap_or_default();
        n.tolerations = spec.tolerations.clone().unwrap_or_default();
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        for term in required
            .map(|r| r.node_selector_terms.as_slice())
            .unwrap_or(&[])
        {
            let mut exprs = Vec::new();
            for (field, reqs) in [(false, &term.match_expressions), (true, &term.match_fields)] {
                for r in reqs.iter().flatten() {
                    exprs.push(Expr {
                        key: r.key.clone(),
                        field,
                        op: r.operator.clone(),
                        values: r.values.clone().unwrap_or_default(),
                    });
                }
            }
            n.affinity_terms.push(exprs);
        }
        n.owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone());
        n
    }
}

impl NodeInfo {
    /// A node's schedulable view: allocatable (capacity where allocatable is missing), the
    /// Ready condition, `spec.unschedulable`, labels and taints. Usage starts at zero.
    pub fn of(node: &Node) -> NodeInfo {
        let status = node.status.as_ref();
        let amount = |name: &str| {
            status
                .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
                .and_then(|m| m.get(name))
                .map(|q| q.0.as_str())
        };
        let spec = node.spec.as_ref();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec.and_then(|s| s.taints.clone()).unwrap_or_default(),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True"),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            alloc_cpu_milli: amount("cpu")
                .and_then(|q| quantity::milli(q).ok())
                .unwrap_or(0),
            alloc_memory: amount("memory")
                .and_then(|q| quantity::units(q).ok())
                .unwrap_or(0),
            // kubelet's default when a node does not say.
            alloc_pods: amount("pods")
                .and_then(|q| quantity::units(q).ok())
                .unwrap_or(110),
            ..NodeInfo::default()
        }
    }

    /// Whether filters and scores see the two as the same node.
    fn same_schedulability(&self, other: &NodeInfo) -> bool {
        self.labels == other.labels
            && self.taints == other.taints
            && self.ready == other.ready
            && self.unschedulable == other.unschedulable
            && self.alloc_cpu_milli == other.alloc_cpu_milli
            && self.alloc_memory == other.alloc_memory
            && self.alloc_pods == other.alloc_pods
    }

    fn add(&mut self, n: &Needs, sign: i64) {
        self.used_cpu_milli += sign * n.cpu_milli;
        self.used_memory += sign * n.memory;
        self.pods += sign;
        for hp in &n.host_ports {
            if sign > 0 {
                self.host_ports.insert(hp.clone());
            } else {
                self.host_ports.remove(hp);
            }
        }
        if let Some(o) = &n.owner {
            let c = self.owners.entry(o.clone()).or_default();
            if sign > 0 {
                *c += 1;
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.owners.remove(o);
                }
            }
        }
    }
}

/// Nodes and the pods counted on them.
#[derive(Debug, Default)]
pub struct Cache {
    nodes: BTreeMap<String, NodeInfo>,
    /// uid -> (node, what was counted there).
    assigned: HashMap<String, (String, Needs)>,
}

impl Cache {
    /// Adds or refreshes a node, keeping what its pods use. Returns whether the update can
    /// make a pod fit that did not before (a new node, or new labels, taints, readiness,
    /// cordon or allocatable): a kubelet heartbeat changes none of them, so it retries nothing.
    pub fn upsert_node(&mut self, node: &Node) -> bool {
        let mut info = NodeInfo::of(node);
        let changed = self
            .nodes
            .get(&info.name)
            .is_none_or(|old| !old.same_schedulability(&info));
        if let Some(old) = self.nodes.remove(&info.name) {
            info.used_cpu_milli = old.used_cpu_milli;
            info.used_memory = old.used_memory;
            info.pods = old.pods;
            info.host_ports = old.host_ports;
            info.owners = old.owners;
        } else {
            // Pods bound to it may have been seen first (watch order across resources).
            for (node, needs) in self.assigned.values() {
                if *node == info.name {
                    info.add(needs, 1);
                }
            }
        }
        self.nodes.insert(info.name.clone(), info);
        changed
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// Counts `uid` on `node` (once: a second call for the same uid and node is a no-op; a
    /// different node moves it).
    pub fn assign(&mut self, uid: &str, node: &str, needs: Needs) {
        if let Some((old, _)) = self.assigned.get(uid) {
            if old == node {
                return;
            }
            self.unassign(uid);
        }
        if let Some(info) = self.nodes.get_mut(node) {
            info.add(&needs, 1);
        }
        self.assigned
            .insert(uid.to_string(), (node.to_string(), needs));
    }

    /// Frees what `uid` was counted for (finished, deleted, or a binding that failed).
    pub fn unassign(&mut self, uid: &str) {
        if let Some((node, needs)) = self.assigned.remove(uid)
            && let Some(info) = self.nodes.get_mut(&node)
        {
            info.add(&needs, -1);
        }
    }

    /// Frees every counted pod whose uid `keep` rejects (pods that vanished while a watch was
    /// down: a relist does not send their deletes).
    pub fn retain_assigned(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .assigned
            .keys()
            .filter(|uid| !keep(uid))
            .cloned()
            .collect();
        for uid in gone {
            self.unassign(&uid);
        }
    }

    pub fn clear_nodes(&mut self) {
        self.nodes.clear();
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": "2", "memory": "1Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    fn used(c: &Cache, name: &str) -> (i64, i64) {
        let n = c.nodes().find(|n| n.name == name).unwrap();
        (n.used_cpu_milli, n.pods)
    }

    #[test]
    fn pods_are_counted_once_by_uid_and_freed_exactly() {
        let mut c = Cache::default();
        let needs = Needs {
            cpu_milli: 500,
            ..Needs::default()
        };
        // Bound before its node is known: counted when the node arrives.
        c.assign("u1", "a", needs.clone());
        c.upsert_node(&node("a"));
        assert_eq!(used(&c, "a"), (500, 1));
        c.assign("u1", "a", needs.clone());
        assert_eq!(
            used(&c, "a"),
            (500, 1),
            "the watch confirming an assumed pod"
        );
        c.upsert_node(&node("a"));
        assert_eq!(used(&c, "a"), (500, 1), "a node update keeps usage");
        c.assign("u2", "a", needs.clone());
        c.retain_assigned(|uid| uid == "u2");
        assert_eq!(used(&c, "a"), (500, 1), "u1 vanished during a relist");
        c.unassign("u2");
        assert_eq!(used(&c, "a"), (0, 0));
    }

    #[test]
    fn only_schedulability_changes_report_a_change() {
        let mut c = Cache::default();
        assert!(c.upsert_node(&node("a")), "a new node");
        let mut beat = node("a");
        beat.metadata.resource_version = Some("7".into());
        beat.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_heartbeat_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(!c.upsert_node(&beat), "a heartbeat changes nothing");
        let mut labelled = beat.clone();
        labelled.metadata.labels = Some([("zone".to_string(), "z1".to_string())].into());
        assert!(c.upsert_node(&labelled), "a new label");
        let mut cordoned = labelled.clone();
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert!(c.upsert_node(&cordoned), "a cordon");
        let mut not_ready = cordoned.clone();
        not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(c.upsert_node(&not_ready), "readiness");
    }
}
