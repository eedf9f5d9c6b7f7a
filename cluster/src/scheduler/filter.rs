//! The filters: can this pod run on this node? Each answers `Ok` or the reason it cannot, in
//! the words kube-scheduler uses, so that a FailedScheduling event reads the same
//! ("0/3 nodes are available: 2 Insufficient cpu, 1 node(s) were unschedulable.").

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Taint, Toleration};

use super::cache::{Expr, Needs, NodeInfo};

/// Why a node was filtered out; the text is what the event counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    NotReady,
    Unschedulable,
    Taint(String),
    NodeSelector,
    TooManyPods,
    InsufficientCpu,
    InsufficientMemory,
    HostPort,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NotReady => write!(f, "node(s) were not ready"),
            Reason::Unschedulable => write!(f, "node(s) were unschedulable"),
            Reason::Taint(t) => write!(f, "node(s) had untolerated taint {{{t}}}"),
            Reason::NodeSelector => write!(f, "node(s) didn't match Pod's node affinity/selector"),
            Reason::TooManyPods => write!(f, "Too many pods"),
            Reason::InsufficientCpu => write!(f, "Insufficient cpu"),
            Reason::InsufficientMemory => write!(f, "Insufficient memory"),
            Reason::HostPort => write!(
                f,
                "node(s) didn't have free ports for the requested pod ports"
            ),
        }
    }
}

/// Every filter in kube-scheduler's order; the first that fails names the reason.
pub fn fits(pod: &Needs, node: &NodeInfo) -> Result<(), Reason> {
    if !node.ready {
        return Err(Reason::NotReady);
    }
    if node.unschedulable
        && !tolerated(
            &pod.tolerations,
            "node.kubernetes.io/unschedulable",
            "",
            "NoSchedule",
        )
    {
        return Err(Reason::Unschedulable);
    }
    for t in &node.taints {
        if (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerates(&pod.tolerations, t)
        {
            let v = t.value.as_deref().unwrap_or("");
            return Err(Reason::Taint(format!("{}: {v}", t.key)));
        }
    }
    if !selector_matches(&pod.node_selector, &node.labels)
        || !affinity_matches(&pod.affinity_terms, node)
    {
        return Err(Reason::NodeSelector);
    }
    if node.pods + 1 > node.alloc_pods {
        return Err(Reason::TooManyPods);
    }
    if pod.cpu_milli > 0 && node.used_cpu_milli + pod.cpu_milli > node.alloc_cpu_milli {
        return Err(Reason::InsufficientCpu);
    }
    if pod.memory > 0 && node.used_memory + pod.memory > node.alloc_memory {
        return Err(Reason::InsufficientMemory);
    }
    if pod.host_ports.iter().any(|hp| port_taken(hp, node)) {
        return Err(Reason::HostPort);
    }
    Ok(())
}

/// The event message for a pod no node fits: reasons counted, most frequent first.
pub fn unschedulable_message(total: usize, reasons: &BTreeMap<Reason, usize>) -> String {
    let mut counted: Vec<(&Reason, &usize)> = reasons.iter().collect();
    counted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = counted.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        format!("0/{total} nodes are available.")
    } else {
        format!("0/{total} nodes are available: {}.", parts.join(", "))
    }
}

fn port_taken((proto, ip, port): &(String, String, i32), node: &NodeInfo) -> bool {
    node.host_ports.iter().any(|(p, i, n)| {
        n == port
            && p == proto
            && (i == ip || i.is_empty() || ip.is_empty() || i == "0.0.0.0" || ip == "0.0.0.0")
    })
}

fn tolerated(tolerations: &[Toleration], key: &str, value: &str, effect: &str) -> bool {
    let taint = Taint {
        key: key.to_string(),
        value: (!value.is_empty()).then(|| value.to_string()),
        effect: effect.to_string(),
        time_added: None,
    };
    tolerates(tolerations, &taint)
}

/// Whether any toleration tolerates `taint` (the core/v1 Toleration rules).
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key = t.key.as_deref().unwrap_or("");
        let op = t.operator.as_deref().unwrap_or("Equal");
        let key_ok = key.is_empty() && op == "Exists" || key == taint.key;
        let value_ok = match op {
            "Exists" => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn affinity_matches(terms: &[Vec<Expr>], node: &NodeInfo) -> bool {
    // No terms: no requirement. A term without expressions matches nothing (core/v1).
    terms.is_empty()
        || terms
            .iter()
            .any(|exprs| !exprs.is_empty() && exprs.iter().all(|e| expr_matches(e, node)))
}

fn expr_matches(e: &Expr, node: &NodeInfo) -> bool {
    let value = if e.field {
        (e.key == "metadata.name").then_some(node.name.as_str())
    } else {
        node.labels.get(&e.key).map(String::as_str)
    };
    match e.op.as_str() {
        "In" => value.is_some_and(|v| e.values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !e.values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(x)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                e.values.first().and_then(|x| x.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if e.op == "Gt" { v > x } else { v < x }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            ready: true,
            alloc_cpu_milli: 2000,
            alloc_memory: 4 << 30,
            alloc_pods: 3,
            labels: BTreeMap::from([("disk".into(), "ssd".into()), ("gen".into(), "5".into())]),
            ..NodeInfo::default()
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        Toleration {
            key: (!key.is_empty()).then(|| key.into()),
            operator: Some(op.into()),
            value: (!value.is_empty()).then(|| value.into()),
            effect: (!effect.is_empty()).then(|| effect.into()),
            toleration_seconds: None,
        }
    }

    #[test]
    fn resources_pods_and_ports() {
        let mut n = node();
        let pod = Needs {
            cpu_milli: 1500,
            memory: 1 << 30,
            host_ports: vec![("TCP".into(), "".into(), 8080)],
            ..Needs::default()
        };
        assert_eq!(fits(&pod, &n), Ok(()));
        n.used_cpu_milli = 600;
        assert_eq!(fits(&pod, &n), Err(Reason::InsufficientCpu));
        n.used_cpu_milli = 0;
        n.used_memory = (4 << 30) - 10;
        assert_eq!(fits(&pod, &n), Err(Reason::InsufficientMemory));
        n.used_memory = 0;
        n.pods = 3;
        assert_eq!(fits(&pod, &n), Err(Reason::TooManyPods));
        n.pods = 0;
        n.host_ports.insert(("TCP".into(), "10.0.0.1".into(), 8080));
        assert_eq!(fits(&pod, &n), Err(Reason::HostPort));
        n.host_ports.clear();
        n.host_ports.insert(("UDP".into(), "".into(), 8080));
        assert_eq!(fits(&pod, &n), Ok(()), "another protocol");
    }

    #[test]
    fn readiness_cordon_and_taints() {
        let mut n = node();
        let mut pod = Needs::default();
        n.ready = false;
        assert_eq!(fits(&pod, &n), Err(Reason::NotReady));
        n.ready = true;
        n.unschedulable = true;
        assert_eq!(fits(&pod, &n), Err(Reason::Unschedulable));
        pod.tolerations = vec![toleration(
            "node.kubernetes.io/unschedulable",
            "Exists",
            "",
            "NoSchedule",
        )];
        assert_eq!(fits(&pod, &n), Ok(()));
        n.unschedulable = false;
        n.taints = vec![taint("dedicated", "db", "NoSchedule")];
        pod.tolerations.clear();
        assert_eq!(fits(&pod, &n), Err(Reason::Taint("dedicated: db".into())));
        pod.tolerations = vec![toleration("dedicated", "Equal", "web", "")];
        assert!(fits(&pod, &n).is_err(), "wrong value");
        pod.tolerations = vec![toleration("dedicated", "Equal", "db", "NoExecute")];
        assert!(fits(&pod, &n).is_err(), "wrong effect");
        pod.tolerations = vec![toleration("dedicated", "Equal", "db", "NoSchedule")];
        assert_eq!(fits(&pod, &n), Ok(()));
        pod.tolerations = vec![toleration("", "Exists", "", "")];
        assert_eq!(fits(&pod, &n), Ok(()), "tolerate everything");
        n.taints = vec![taint("soft", "x", "PreferNoSchedule")];
        pod.tolerations.clear();
        assert_eq!(fits(&pod, &n), Ok(()), "PreferNoSchedule only scores");
    }

    #[test]
    fn selector_and_required_affinity() {
        let n = node();
        let mut pod = Needs {
            node_selector: BTreeMap::from([("disk".into(), "hdd".into())]),
            ..Needs::default()
        };
        assert_eq!(fits(&pod, &n), Err(Reason::NodeSelector));
        pod.node_selector = BTreeMap::from([("disk".into(), "ssd".into())]);
        assert_eq!(fits(&pod, &n), Ok(()));
        let e = |key: &str, op: &str, values: &[&str]| Expr {
            key: key.into(),
            field: false,
            op: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        pod.affinity_terms = vec![
            vec![e("disk", "In", &["nvme"])],
            vec![e("gen", "Gt", &["4"])],
        ];
        assert_eq!(fits(&pod, &n), Ok(()), "second term matches");
        pod.affinity_terms = vec![vec![e("gen", "Gt", &["4"]), e("zone", "Exists", &[])]];
        assert_eq!(fits(&pod, &n), Err(Reason::NodeSelector), "all of a term");
        pod.affinity_terms = vec![vec![
            e("zone", "DoesNotExist", &[]),
            e("disk", "NotIn", &["hdd"]),
        ]];
        assert_eq!(fits(&pod, &n), Ok(()));
        pod.affinity_terms = vec![vec![Expr {
            key: "metadata.name".into(),
            field: true,
            op: "In".into(),
            values: vec!["n2".into()],
        }]];
        assert_eq!(fits(&pod, &n), Err(Reason::NodeSelector), "matchFields");
        pod.affinity_terms = vec![vec![]];
        assert_eq!(
            fits(&pod, &n),
            Err(Reason::NodeSelector),
            "empty term matches nothing"
        );
    }

    #[test]
    fn the_message_counts_reasons() {
        let reasons = BTreeMap::from([(Reason::InsufficientCpu, 2), (Reason::Unschedulable, 1)]);
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) were unschedulable."
        );
        assert_eq!(
            unschedulable_message(0, &BTreeMap::new()),
            "0/0 nodes are available."
        );
    }
}
