//! ReplicaSet -> Pods: keeps `spec.replicas` active pods from the template, each with the
//! ReplicaSet as its controller owner; deletes the surplus, least useful first (unscheduled,
//! then pending, then not ready, then the newest), and writes the status (replicas, ready,
//! available, fully labeled, observedGeneration).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use super::{ControllerError, api_err, controlled_by, controller_ref, on_error, selector_query};

/// What one reconcile does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub create: usize,
    pub delete: Vec<String>,
    pub status: ReplicaSetStatus,
}

/// A pod that counts towards the replicas: not finished and not being deleted.
pub fn active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded") | Some("Failed"))
}

pub fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Ready for at least `min_ready_seconds` at `now`.
pub fn available(p: &Pod, min_ready_seconds: i32, now: k8s_openapi::jiff::Timestamp) -> bool {
    if !ready(p) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    let since = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    since.is_some_and(|t| now.duration_since(t).as_secs() >= i64::from(min_ready_seconds))
}

/// Decides what to create and delete for `rs` given the pods it controls.
pub fn plan(rs: &ReplicaSet, owned: &[Pod], now: k8s_openapi::jiff::Timestamp) -> Plan {
    let want = rs.spec.replicas.unwrap_or(1).max(0) as usize;
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    let mut live: Vec<&Pod> = owned.iter().filter(|p| active(p)).collect();
    let mut plan = Plan {
        create: want.saturating_sub(live.len()),
        delete: Vec::new(),
        status: ReplicaSetStatus::default(),
    };
    if live.len() > want {
        // kube-controller-manager's order: unassigned, pending, not ready, newest first.
        let rank = |p: &Pod| {
            let unassigned = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none();
            let pending = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            (
                !unassigned,
                !pending,
                ready(p),
                std::cmp::Reverse(created),
                p.metadata.name.clone(),
            )
        };
        live.sort_by_key(|p| rank(p));
        let surplus = live.len() - want;
        plan.delete = live
            .drain(..surplus)
            .filter_map(|p| p.metadata.name.clone())
            .collect();
    }
    let counted = || owned.iter().filter(|p| active(p));
    plan.status = ReplicaSetStatus {
        replicas: counted().count() as i32,
        fully_labeled_replicas: Some(counted().count() as i32),
        ready_replicas: Some(counted().filter(|p| ready(p)).count() as i32),
        available_replicas: Some(counted().filter(|p| available(p, min_ready, now)).count() as i32),
        observed_generation: rs.metadata.generation,
        conditions: None,
        terminating_replicas: None,
    };
    plan
}

/// A pod from `rs`'s template.
pub fn pod_from_template(rs: &ReplicaSet) -> Result<Pod, ControllerError> {
    let name = rs.metadata.name.clone().unwrap_or_default();
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let template = rs
        .spec
        .template
        .clone()
        .ok_or_else(|| ControllerError::Invalid(format!("replicaset {name}: no template")))?;
    let meta = template.metadata.unwrap_or_default();
    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: rs.metadata.namespace.clone(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![controller_ref("apps/v1", "ReplicaSet", &name, &uid)]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    })
}

async fn reconcile(
    rs: Arc<ReplicaSet>,
    client: Arc<kube::Client>,
) -> Result<Action, ControllerError> {
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rs.metadata.namespace.clone().unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let selector = selector_query(&rs.spec.selector)
        .ok_or_else(|| ControllerError::Invalid(format!("replicaset {ns}/{name}: bad selector")))?;
    let pods: Api<Pod> = Api::namespaced((*client).clone(), &ns);
    let owned: Vec<Pod> = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list pods of replicaset {ns}/{name}")))?
        .items
        .into_iter()
        .filter(|p| controlled_by(p.metadata.owner_references.as_ref(), &uid))
        .collect();
    let plan = plan(&rs, &owned, k8s_openapi::jiff::Timestamp::now());
    if plan.create > 0 {
        let pod = pod_from_template(&rs)?;
        let pp = PostParams::default();
        let results: Vec<Result<Pod, kube::Error>> =
            futures::stream::iter((0..plan.create).map(|_| pods.create(&pp, &pod)))
                .buffer_unordered(16)
                .collect()
                .await;
        for r in results {
            r.map_err(api_err(format!("create pod for replicaset {ns}/{name}")))?;
        }
    }
    for victim in &plan.delete {
        match pods.delete(victim, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api_err(format!("delete pod {ns}/{victim}"))(e)),
        }
    }
    if rs.status.as_ref() != Some(&plan.status) {
        let rss: Api<ReplicaSet> = Api::namespaced((*client).clone(), &ns);
        let patch = serde_json::json!({"status": plan.status});
        match rss
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api_err(format!("status of replicaset {ns}/{name}"))(e)),
        }
    }
    // Pods that turn available after minReadySeconds change nothing the watch sees.
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    Ok(if min_ready > 0 {
        Action::requeue(Duration::from_secs(min_ready as u64))
    } else {
        Action::requeue(Duration::from_secs(300))
    })
}

/// Runs the ReplicaSet controller.
pub async fn run(client: Arc<kube::Client>) {
    let rss: Api<ReplicaSet> = Api::all((*client).clone());
    let pods: Api<Pod> = Api::all((*client).clone());
    Controller::new(rss, watcher::Config::default())
        .owns(pods, watcher::Config::default())
        .run(reconcile, on_error, client)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rs(replicas: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "default", "uid": "rs-1", "generation": 3},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .unwrap()
    }

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: &str) -> Pod {
        let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": spec,
            "status": {"phase": phase, "conditions": [{"type": "Ready",
                "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn scales_up_counting_only_live_pods() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let pods = [
            pod("a", Some("n1"), "Running", true, "2026-01-01T00:00:00Z"),
            pod(
                "done",
                Some("n1"),
                "Succeeded",
                false,
                "2026-01-01T00:00:00Z",
            ),
        ];
        let p = plan(&rs(3), &pods, now);
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty());
        assert_eq!(p.status.replicas, 1);
        assert_eq!(p.status.ready_replicas, Some(1));
        assert_eq!(p.status.observed_generation, Some(3));
    }

    #[test]
    fn scales_down_least_useful_first() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let pods = [
            pod(
                "old-ready",
                Some("n1"),
                "Running",
                true,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "new-ready",
                Some("n1"),
                "Running",
                true,
                "2026-01-02T00:00:00Z",
            ),
            pod(
                "not-ready",
                Some("n1"),
                "Running",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "pending",
                Some("n1"),
                "Pending",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod("unbound", None, "Pending", false, "2026-01-01T00:00:00Z"),
        ];
        let p = plan(&rs(1), &pods, now);
        assert_eq!(p.create, 0);
        assert_eq!(p.delete, ["unbound", "pending", "not-ready", "new-ready"]);
    }

    #[test]
    fn the_template_makes_owned_pods() {
        let p = pod_from_template(&rs(1)).unwrap();
        assert_eq!(p.metadata.generate_name.as_deref(), Some("web-abc-"));
        assert!(controlled_by(p.metadata.owner_references.as_ref(), "rs-1"));
        assert_eq!(p.metadata.labels.unwrap()["app"], "web");
    }
}
