//! The scores, and the choice of a node among those that fit: least allocated (cpu and memory
//! left after the pod, as a share of allocatable), spreading of one owner's replicas (weight 2,
//! as kube-scheduler weighs topology spreading), and a penalty for untolerated
//! PreferNoSchedule taints. Ties go to a hash of pod and node, so equal nodes share the load
//! instead of the first name taking every pod.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use super::cache::{Needs, NodeInfo};
use super::filter::{Reason, fits, tolerates};

/// What scheduling one pod decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Node(String),
    /// No node fits: how many nodes there are and why each was filtered.
    Unschedulable {
        nodes: usize,
        reasons: BTreeMap<Reason, usize>,
    },
}

fn least_allocated(pod: &Needs, n: &NodeInfo) -> i64 {
    let share = |alloc: i64, used: i64, req: i64| {
        if alloc <= 0 {
            0
        } else {
            ((alloc - used - req).max(0) * 100 / alloc).clamp(0, 100)
        }
    };
    (share(n.alloc_cpu_milli, n.used_cpu_milli, pod.cpu_milli)
        + share(n.alloc_memory, n.used_memory, pod.memory))
        / 2
}

fn tie(uid: &str, node: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    uid.hash(&mut h);
    node.hash(&mut h);
    h.finish()
}

/// Filters every node, scores those that fit and picks the best.
pub fn choose<'a>(uid: &str, pod: &Needs, nodes: impl Iterator<Item = &'a NodeInfo>) -> Decision {
    let mut feasible: Vec<&NodeInfo> = Vec::new();
    let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut total = 0;
    for n in nodes {
        total += 1;
        match fits(pod, n) {
            Ok(()) => feasible.push(n),
            Err(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    if feasible.is_empty() {
        return Decision::Unschedulable {
            nodes: total,
            reasons,
        };
    }
    let owned = |n: &NodeInfo| {
        pod.owner
            .as_ref()
            .and_then(|o| n.owners.get(o))
            .copied()
            .unwrap_or(0) as i64
    };
    let max_owned = feasible.iter().map(|n| owned(n)).max().unwrap_or(0);
    let best = feasible
        .iter()
        .map(|n| {
            let spread = if max_owned == 0 {
                100
            } else {
                (max_owned - owned(n)) * 100 / max_owned
            };
            let prefer_not = n
                .taints
                .iter()
                .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(&pod.tolerations, t))
                .count() as i64;
            let score = least_allocated(pod, n) + 2 * spread - 50 * prefer_not;
            (score, std::cmp::Reverse(tie(uid, &n.name)), n)
        })
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    match best {
        Some((_, _, n)) => Decision::Node(n.name.clone()),
        None => Decision::Unschedulable {
            nodes: total,
            reasons,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn node(name: &str, used_cpu: i64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready: true,
            alloc_cpu_milli: 4000,
            alloc_memory: 8 << 30,
            alloc_pods: 110,
            used_cpu_milli: used_cpu,
            ..NodeInfo::default()
        }
    }

    #[test]
    fn least_allocated_node_wins() {
        let nodes = [node("a", 3000), node("b", 500), node("c", 2000)];
        let pod = Needs {
            cpu_milli: 100,
            ..Needs::default()
        };
        assert_eq!(choose("u1", &pod, nodes.iter()), Decision::Node("b".into()));
    }

    #[test]
    fn replicas_of_one_owner_spread() {
        let mut nodes = [node("a", 0), node("b", 0), node("c", 0)];
        nodes[0].owners = HashMap::from([("rs".into(), 1)]);
        nodes[1].owners = HashMap::from([("rs".into(), 1)]);
        let pod = Needs {
            owner: Some("rs".into()),
            ..Needs::default()
        };
        assert_eq!(choose("u1", &pod, nodes.iter()), Decision::Node("c".into()));
    }

    #[test]
    fn equal_nodes_share_pods() {
        let nodes = [node("a", 0), node("b", 0), node("c", 0), node("d", 0)];
        let mut picked = std::collections::BTreeSet::new();
        for i in 0..40 {
            if let Decision::Node(n) = choose(&format!("uid-{i}"), &Needs::default(), nodes.iter())
            {
                picked.insert(n);
            }
        }
        assert_eq!(picked.len(), 4, "{picked:?}");
    }

    #[test]
    fn unschedulable_counts_reasons() {
        let mut nodes = [node("a", 3950), node("b", 3950), node("c", 0)];
        nodes[2].unschedulable = true;
        let pod = Needs {
            cpu_milli: 100,
            ..Needs::default()
        };
        let Decision::Unschedulable { nodes, reasons } = choose("u", &pod, nodes.iter()) else {
            panic!("no node fits");
        };
        assert_eq!(nodes, 3);
        assert_eq!(reasons[&Reason::InsufficientCpu], 2);
        assert_eq!(reasons[&Reason::Unschedulable], 1);
    }
}
