//! Node lifecycle: a node whose heartbeat (its Lease in `kube-node-lease`, or its Ready
//! condition's heartbeat) is older than the grace period turns `Ready=Unknown` and gets the
//! `node.kubernetes.io/unreachable:NoExecute` taint; once the node heartbeats and reports Ready
//! again the taint goes. Pods on a tainted node are evicted (deleted, gracefully) when their
//! toleration of the taint runs out: `tolerationSeconds` of a matching toleration, or the
//! default eviction timeout for pods without one (kube-apiserver's admission gives every pod a
//! 300 s toleration; keel applies the same default here). The scheduler already skips such
//! nodes, and the ReplicaSet controller replaces evicted pods elsewhere.
//!
//! A periodic pass (not a watch-driven Controller): heartbeats age without any event.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

use super::{ControllerError, api_err};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// The periods of node lifecycle.
#[derive(Debug, Clone)]
pub struct NodeLifecycleConfig {
    /// A node without a heartbeat for this long is unreachable (kube-controller-manager: 40 s).
    pub grace: Duration,
    /// How long pods without their own toleration stay on an unreachable node (300 s).
    pub eviction: Duration,
    /// How often nodes are checked.
    pub interval: Duration,
}

impl Default for NodeLifecycleConfig {
    fn default() -> Self {
        NodeLifecycleConfig {
            grace: Duration::from_secs(40),
            eviction: Duration::from_secs(300),
            interval: Duration::from_secs(5),
        }
    }
}

/// What to do to a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Heartbeat too old: Ready=Unknown and the taint (added when missing).
    Unreachable {
        add_taint: bool,
        mark_unknown: bool,
    },
    /// Heartbeating and Ready, still tainted: the taint goes.
    Recovered,
    Fine,
}

fn ready_condition(node: &Node) -> Option<&k8s_openapi::api::core::v1::NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// The newest heartbeat of `node`: its Lease's renewTime or its Ready condition's heartbeat.
pub fn last_heartbeat(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let from_lease = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let from_status =
        ready_condition(node).and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0));
    from_lease
        .max(from_status)
        .or_else(|| node.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn tainted(node: &Node) -> Option<&Taint> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
}

pub fn verdict(node: &Node, lease: Option<&Lease>, now: Timestamp, grace: Duration) -> Verdict {
    let stale = last_heartbeat(node, lease)
        .is_none_or(|t| now.duration_since(t).as_secs_f64() > grace.as_secs_f64());
    if stale {
        let unknown = ready_condition(node).is_some_and(|c| c.status == "Unknown");
        let add_taint = tainted(node).is_none();
        if !unknown || add_taint {
            return Verdict::Unreachable {
                add_taint,
                mark_unknown: !unknown,
            };
        }
        return Verdict::Fine;
    }
    let ready = ready_condition(node).is_some_and(|c| c.status == "True");
    if ready && tainted(node).is_some() {
        return Verdict::Recovered;
    }
    Verdict::Fine
}

/// Whether `pod` must leave a node tainted at `since`, at `now`.
pub fn evict(pod: &Pod, since: Timestamp, now: Timestamp, default: Duration) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_ref());
    let matching = tolerations.into_iter().flatten().find(|t| {
        let key_ok = match t.operator.as_deref() {
            Some("Exists") => t
                .key
                .as_deref()
                .is_none_or(|k| k.is_empty() || k == UNREACHABLE),
            _ => t.key.as_deref() == Some(UNREACHABLE),
        };
        key_ok
            && t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == "NoExecute")
    });
    let allowed = match matching {
        // Tolerated without a limit: stays.
        Some(t) if t.toleration_seconds.is_none() => return false,
        Some(t) => Duration::from_secs(t.toleration_seconds.unwrap_or(0).max(0) as u64),
        None => default,
    };
    now.duration_since(since).as_secs_f64() >= allowed.as_secs_f64()
}

/// One pass over the nodes. A controller that started less than a grace period ago (`started`)
/// judges no node unreachable yet: heartbeats that could not reach a server that was down are
/// not missed heartbeats (kube-controller-manager likewise ages heartbeats from its own
/// observation).
async fn pass(
    client: &kube::Client,
    config: &NodeLifecycleConfig,
    started: Timestamp,
) -> Result<(), ControllerError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease_list = leases
        .list(&ListParams::default())
        .await
        .map_err(api_err("list node leases"))?
        .items;
    let now = Timestamp::now();
    for node in nodes
        .list(&ListParams::default())
        .await
        .map_err(api_err("list nodes"))?
        .items
    {
        let name = node.metadata.name.clone().unwrap_or_default();
        let lease = lease_list
            .iter()
            .find(|l| l.metadata.name.as_deref() == Some(name.as_str()));
        let mut taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let settled = now.duration_since(started).as_secs_f64() >= config.grace.as_secs_f64();
        match verdict(&node, lease, now, config.grace) {
            Verdict::Unreachable { .. } if !settled => {}
            Verdict::Unreachable {
                add_taint,
                mark_unknown,
            } => {
                tracing::warn!(node = %name, "no heartbeat within the grace period: unreachable");
                if mark_unknown {
                    let conditions: Vec<serde_json::Value> = node
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|mut c| {
                            if c.type_ == "Ready" {
                                c.status = "Unknown".into();
                                c.reason = Some("NodeStatusUnknown".into());
                                c.message = Some("Kubelet stopped posting node status.".into());
                                c.last_transition_time = Some(Time(now));
                            }
                            serde_json::to_value(c).unwrap_or_default()
                        })
                        .collect();
                    nodes
                        .patch_status(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(
                                serde_json::json!({"status": {"conditions": conditions}}),
                            ),
                        )
                        .await
                        .map_err(api_err(format!("mark node {name} Unknown")))?;
                }
                if add_taint {
                    taints.push(Taint {
                        key: UNREACHABLE.into(),
                        value: None,
                        effect: "NoExecute".into(),
                        time_added: Some(Time(now)),
                    });
                    set_taints(&nodes, &name, &taints).await?;
                }
            }
            Verdict::Recovered => {
                taints.retain(|t| !(t.key == UNREACHABLE && t.effect == "NoExecute"));
                set_taints(&nodes, &name, &taints).await?;
            }
            Verdict::Fine => {}
        }
        let Some(since) = tainted(&node).map(|t| t.time_added.as_ref().map(|t| t.0).unwrap_or(now))
        else {
            continue;
        };
        let pods: Api<Pod> = Api::all(client.clone());
        let on_node = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await
            .map_err(api_err(format!("list pods on {name}")))?
            .items;
        for p in on_node
            .iter()
            .filter(|p| evict(p, since, now, config.eviction))
        {
            let (ns, pod) = (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            );
            tracing::warn!(node = %name, pod = %format!("{ns}/{pod}"), "evicting from an unreachable node");
            match Api::<Pod>::namespaced(client.clone(), &ns)
                .delete(&pod, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(api_err(format!("evict pod {ns}/{pod}"))(e)),
            }
        }
    }
    Ok(())
}

async fn set_taints(
    nodes: &Api<Node>,
    name: &str,
    taints: &[Taint],
) -> Result<(), ControllerError> {
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"taints": taints}})),
        )
        .await
        .map(|_| ())
        .map_err(api_err(format!("set the taints of node {name}")))
}

/// Runs node lifecycle passes forever.
pub async fn run(client: Arc<kube::Client>, config: NodeLifecycleConfig) {
    let started = Timestamp::now();
    loop {
        if let Err(e) = pass(&client, &config, started).await {
            tracing::warn!(error = %e, "node lifecycle pass");
        }
        tokio::time::sleep(config.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(ready: &str, heartbeat: &str, tainted: bool) -> Node {
        let mut spec = json!({});
        if tainted {
            spec["taints"] = json!([{"key": UNREACHABLE, "effect": "NoExecute",
                "timeAdded": "2026-01-01T00:00:00Z"}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": spec,
            "status": {"conditions": [{"type": "Ready", "status": ready,
                "lastHeartbeatTime": heartbeat}]},
        }))
        .unwrap()
    }

    fn lease(renew: &str) -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "n1"}, "spec": {"renewTime": renew}}))
            .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn stale_heartbeats_make_a_node_unreachable_once() {
        let grace = Duration::from_secs(40);
        let now = at("2026-01-01T00:01:00Z");
        let n = node("True", "2026-01-01T00:00:00Z", false);
        assert_eq!(
            verdict(&n, None, now, grace),
            Verdict::Unreachable {
                add_taint: true,
                mark_unknown: true
            }
        );
        assert_eq!(
            verdict(&n, Some(&lease("2026-01-01T00:00:50Z")), now, grace),
            Verdict::Fine,
            "the lease is fresh"
        );
        let done = node("Unknown", "2026-01-01T00:00:00Z", true);
        assert_eq!(
            verdict(&done, None, now, grace),
            Verdict::Fine,
            "already handled"
        );
        let back = node("True", "2026-01-01T00:00:59Z", true);
        assert_eq!(verdict(&back, None, now, grace), Verdict::Recovered);
    }

    #[test]
    fn pods_leave_when_their_toleration_runs_out() {
        let since = at("2026-01-01T00:00:00Z");
        let pod = |tolerations: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"},
                "spec": {"containers": [], "tolerations": tolerations}}))
            .unwrap()
        };
        let default = Duration::from_secs(300);
        let plain = pod(json!([]));
        assert!(!evict(&plain, since, at("2026-01-01T00:04:00Z"), default));
        assert!(evict(&plain, since, at("2026-01-01T00:05:00Z"), default));
        let short = pod(
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": 10}]),
        );
        assert!(evict(&short, since, at("2026-01-01T00:00:10Z"), default));
        let forever = pod(json!([{"operator": "Exists"}]));
        assert!(!evict(&forever, since, at("2027-01-01T00:00:00Z"), default));
    }
}
