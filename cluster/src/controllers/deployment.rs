//! Deployment -> ReplicaSets. The pod template's hash names the ReplicaSet that runs it
//! (`<deployment>-<hash>`, label `pod-template-hash`, annotation
//! `deployment.kubernetes.io/revision`). A rolling update scales the new ReplicaSet up within
//! `replicas + maxSurge` and the old ones down while at least `replicas - maxUnavailable` pods
//! stay available (unhealthy old pods go first), one step per reconcile, each ReplicaSet status
//! change triggering the next (kube-controller-manager's algorithm); Recreate scales the old ones
//! to zero and starts the new one once their pods are gone. Old ReplicaSets at zero beyond
//! `revisionHistoryLimit` are deleted. The status is what `kubectl rollout status` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use super::{ControllerError, api_err, controlled_by, controller_ref, on_error, selector_query};

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";

/// One change to a ReplicaSet.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Create(Box<ReplicaSet>),
    Scale { name: String, replicas: i32 },
    Delete(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub status: DeploymentStatus,
}

/// A stable hash of the pod template (FNV-1a of its JSON), in the alphabet Kubernetes uses for
/// generated names.
pub fn template_hash(d: &Deployment) -> String {
    let template = &d.spec.template;
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::new();
    for _ in 0..10 {
        out.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
    }
    out
}

/// An int-or-percent of `total`, rounded up or down.
pub fn resolve(v: Option<&IntOrString>, default_percent: i32, total: i32, up: bool) -> i32 {
    let pct = |p: i32| {
        let x = i64::from(total) * i64::from(p);
        (if up { (x + 99) / 100 } else { x / 100 }) as i32
    };
    match v {
        None => pct(default_percent),
        Some(IntOrString::Int(i)) => (*i).max(0),
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<i32>()
            .map(pct)
            .unwrap_or_else(|_| pct(default_percent)),
    }
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.as_ref();
    (
        s.map(|s| s.replicas).unwrap_or(0),
        s.and_then(|s| s.ready_replicas).unwrap_or(0),
        s.and_then(|s| s.available_replicas).unwrap_or(0),
    )
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// The ReplicaSet that runs `d`'s current template.
pub fn new_replica_set(d: &Deployment, hash: &str, revision: i64, replicas: i32) -> ReplicaSet {
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone();
    let mut template = spec.template.clone();
    let mut meta = template.metadata.take().unwrap_or_default();
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let labels = meta.labels.clone();
    template.metadata = Some(meta);
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels,
            annotations: Some(BTreeMap::from([(REVISION.into(), revision.to_string())])),
            owner_references: Some(vec![controller_ref(
                "apps/v1",
                "Deployment",
                &name,
                d.metadata.uid.as_deref().unwrap_or(""),
            )]),
            ..ObjectMeta::default()
        },
        spec: k8s_openapi::api::apps::v1::ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    }
}

/// Decides the next step of `d` given the ReplicaSets it controls.
pub fn plan(d: &Deployment, owned: &[ReplicaSet]) -> Plan {
    let spec = d.spec.clone();
    let want = spec.replicas.unwrap_or(1).max(0);
    let hash = template_hash(d);
    let is_new = |rs: &ReplicaSet| {
        rs.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(HASH_LABEL))
            .is_some_and(|h| *h == hash)
    };
    let new = owned.iter().find(|rs| is_new(rs));
    // Oldest revision first.
    let mut old: Vec<&ReplicaSet> = owned.iter().filter(|rs| !is_new(rs)).collect();
    old.sort_by_key(|rs| revision(rs));
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let mut surge = resolve(rolling.and_then(|r| r.max_surge.as_ref()), 25, want, true);
    let mut unavailable = resolve(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        25,
        want,
        false,
    );
    if recreate {
        surge = 0;
    }
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    let mut changes = Vec::new();
    let old_spec: i32 = old.iter().map(|rs| spec_replicas(rs)).sum();
    let old_pods: i32 = old.iter().map(|rs| status_of(rs).0).sum();
    let new_spec = new.map(spec_replicas).unwrap_or(0);
    let paused = spec.paused.unwrap_or(false);

    // The new ReplicaSet's size.
    let target = if recreate {
        if old_spec > 0 || old_pods > 0 {
            0
        } else {
            want
        }
    } else if new_spec < want {
        let allowed = want + surge - (old_spec + new_spec);
        (new_spec + allowed.max(0)).min(want)
    } else {
        want
    };
    match new {
        None if !paused => {
            let next = owned.iter().map(revision).max().unwrap_or(0) + 1;
            changes.push(Change::Create(Box::new(new_replica_set(
                d, &hash, next, target,
            ))));
        }
        Some(rs) if target != new_spec => changes.push(Change::Scale {
            name: rs.metadata.name.clone().unwrap_or_default(),
            replicas: target,
        }),
        _ => {}
    }

    // The old ones, down.
    if old_spec > 0 {
        let mut downs: Vec<(String, i32)> = old
            .iter()
            .map(|rs| {
                (
                    rs.metadata.name.clone().unwrap_or_default(),
                    spec_replicas(rs),
                )
            })
            .collect();
        if recreate {
            for (_, r) in downs.iter_mut() {
                *r = 0;
            }
        } else {
            let min_available = want - unavailable;
            let new_unavailable =
                new_spec - new.map(|rs| status_of(rs).2).unwrap_or(0).min(new_spec);
            let mut budget = (old_spec + new_spec) - min_available - new_unavailable;
            // Unhealthy old pods first: they are not available anyway.
            for (rs, (_, r)) in old.iter().zip(downs.iter_mut()) {
                let unhealthy = (*r - status_of(rs).2).max(0).min(budget.max(0));
                *r -= unhealthy;
                budget -= unhealthy;
            }
            let available: i32 = owned.iter().map(|rs| status_of(rs).2).sum();
            let mut can = (available - min_available).min(budget).max(0);
            for (_, r) in downs.iter_mut() {
                let d = (*r).min(can);
                *r -= d;
                can -= d;
            }
        }
        for ((name, r), rs) in downs.into_iter().zip(&old) {
            if r != spec_replicas(rs) {
                changes.push(Change::Scale { name, replicas: r });
            }
        }
    }

    // History beyond the limit: old ReplicaSets at zero, oldest first.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let idle: Vec<&&ReplicaSet> = old
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
        .collect();
    if idle.len() > limit {
        for rs in &idle[..idle.len() - limit] {
            changes.push(Change::Delete(rs.metadata.name.clone().unwrap_or_default()));
        }
    }

    // Status from what the ReplicaSets report now.
    let (mut replicas, mut ready, mut available) = (0, 0, 0);
    for rs in owned {
        let (r, rd, a) = status_of(rs);
        replicas += r;
        ready += rd;
        available += a;
    }
    let updated = new.map(|rs| status_of(rs).0).unwrap_or(0);
    let now = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let complete = updated == want && replicas == want && available >= want && old_pods == 0;
    let is_available = available >= want - unavailable;
    let old_conditions = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let prev = old_conditions
            .iter()
            .find(|c| c.type_.as_deref() == Some(type_));
        let unchanged = prev.is_some_and(|c| {
            c.status.as_deref() == Some(status) && c.reason.as_deref() == Some(reason)
        });
        DeploymentCondition {
            type_: Some(type_.into()),
            status: Some(status.into()),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: if unchanged {
                prev.and_then(|c| c.last_update_time.clone())
            } else {
                now.clone()
            },
            last_transition_time: if prev.is_some_and(|c| c.status.as_deref() == Some(status)) {
                prev.and_then(|c| c.last_transition_time.clone())
            } else {
                now.clone()
            },
        }
    };
    let name = d.metadata.name.clone().unwrap_or_default();
    let rs_name = format!("{name}-{hash}");
    let conditions = vec![
        condition(
            "Available",
            is_available,
            if is_available {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            },
            if is_available {
                "Deployment has minimum availability.".into()
            } else {
                "Deployment does not have minimum availability.".into()
            },
        ),
        condition(
            "Progressing",
            true,
            if complete {
                "NewReplicaSetAvailable"
            } else {
                "ReplicaSetUpdated"
            },
            if complete {
                format!("ReplicaSet \"{rs_name}\" has successfully progressed.")
            } else {
                format!("ReplicaSet \"{rs_name}\" is progressing.")
            },
        ),
    ];
    Plan {
        changes,
        status: DeploymentStatus {
            observed_generation: d.metadata.generation,
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            unavailable_replicas: Some((want - available).max(0)),
            conditions: Some(conditions),
            collision_count: None,
            terminating_replicas: None,
        },
    }
}

/// The status without timestamps, to see whether a write is needed.
fn comparable(s: Option<&DeploymentStatus>) -> Option<DeploymentStatus> {
    let mut s = s?.clone();
    for c in s.conditions.iter_mut().flatten() {
        c.last_update_time = None;
        c.last_transition_time = None;
    }
    Some(s)
}

async fn reconcile(
    d: Arc<Deployment>,
    client: Arc<kube::Client>,
) -> Result<Action, ControllerError> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let selector = selector_query(&d.spec.selector)
        .ok_or_else(|| ControllerError::Invalid(format!("deployment {ns}/{name}: bad selector")))?;
    let rss: Api<ReplicaSet> = Api::namespaced((*client).clone(), &ns);
    let owned: Vec<ReplicaSet> = rss
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!(
            "list replicasets of deployment {ns}/{name}"
        )))?
        .items
        .into_iter()
        .filter(|rs| controlled_by(rs.metadata.owner_references.as_ref(), &uid))
        .collect();
    let plan = plan(&d, &owned);
    for change in &plan.changes {
        let result = match change {
            Change::Create(rs) => match rss.create(&PostParams::default(), rs).await {
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                r => r.map(|_| ()),
            },
            Change::Scale { name, replicas } => rss
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
                )
                .await
                .map(|_| ()),
            Change::Delete(name) => rss.delete(name, &DeleteParams::default()).await.map(|_| ()),
        };
        result.map_err(api_err(format!("deployment {ns}/{name}: {change:?}")))?;
    }
    if comparable(d.status.as_ref()) != comparable(Some(&plan.status)) {
        let deployments: Api<Deployment> = Api::namespaced((*client).clone(), &ns);
        let patch = serde_json::json!({"status": plan.status});
        match deployments
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api_err(format!("status of deployment {ns}/{name}"))(e)),
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Runs the Deployment controller.
pub async fn run(client: Arc<kube::Client>) {
    let deployments: Api<Deployment> = Api::all((*client).clone());
    let rss: Api<ReplicaSet> = Api::all((*client).clone());
    Controller::new(deployments, watcher::Config::default())
        .owns(rss, watcher::Config::default())
        .run(reconcile, on_error, client)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(replicas: i32, image: &str, strategy: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d-1", "generation": 2},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "strategy": strategy,
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}},
        }))
        .unwrap()
    }

    fn with_status(mut rs: ReplicaSet, spec: i32, pods: i32, available: i32) -> ReplicaSet {
        rs.spec.replicas = Some(spec);
        rs.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: pods,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        rs
    }

    fn rs_of(d: &Deployment, rev: i64) -> ReplicaSet {
        new_replica_set(d, &template_hash(d), rev, 0)
    }

    #[test]
    fn first_rollout_creates_the_full_replica_set() {
        let d = deployment(3, "busybox:1", json!({}));
        let p = plan(&d, &[]);
        let [Change::Create(rs)] = p.changes.as_slice() else {
            panic!("{:?}", p.changes);
        };
        assert_eq!(rs.spec.replicas, Some(3));
        let name = rs.metadata.name.clone().unwrap();
        assert_eq!(name, format!("web-{}", template_hash(&d)));
        assert_eq!(rs.metadata.annotations.as_ref().unwrap()[REVISION], "1");
        let sel = &rs.spec.selector;
        assert_eq!(
            sel.match_labels.as_ref().unwrap()[HASH_LABEL],
            template_hash(&d)
        );
    }

    #[test]
    fn a_template_change_rolls_within_surge_and_unavailability() {
        let v1 = deployment(4, "busybox:1", json!({}));
        let v2 = deployment(4, "busybox:2", json!({}));
        assert_ne!(template_hash(&v1), template_hash(&v2));
        let old = with_status(rs_of(&v1, 1), 4, 4, 4);
        // 25% of 4: surge 1, unavailable 1. Step 1: new RS with 1 replica, old to 3.
        let p = plan(&v2, std::slice::from_ref(&old));
        let create = p.changes.iter().find_map(|c| match c {
            Change::Create(rs) => Some(rs.spec.replicas),
            _ => None,
        });
        assert_eq!(create, Some(Some(1)));
        assert!(
            p.changes.contains(&Change::Scale {
                name: old.metadata.name.clone().unwrap(),
                replicas: 3
            }),
            "{:?}",
            p.changes
        );
        // New pods not yet available: nothing more goes down.
        let new = with_status(rs_of(&v2, 2), 1, 1, 0);
        let old = with_status(old, 3, 3, 3);
        let p = plan(&v2, &[old.clone(), new.clone()]);
        assert!(p.changes.iter().all(|c| !matches!(c, Change::Scale { name, .. } if Some(name) == old.metadata.name.as_ref())), "{:?}", p.changes);
        // Once the new pod is available, the next step.
        let new = with_status(new, 1, 1, 1);
        let p = plan(&v2, &[old.clone(), new.clone()]);
        assert!(
            p.changes.contains(&Change::Scale {
                name: new.metadata.name.clone().unwrap(),
                replicas: 2
            }),
            "{:?}",
            p.changes
        );
        assert!(
            p.changes.contains(&Change::Scale {
                name: old.metadata.name.clone().unwrap(),
                replicas: 2
            }),
            "{:?}",
            p.changes
        );
        // Done: status says so.
        let done = plan(&v2, &[with_status(old, 0, 0, 0), with_status(new, 4, 4, 4)]);
        assert!(done.changes.is_empty(), "{:?}", done.changes);
        assert_eq!(done.status.updated_replicas, Some(4));
        assert_eq!(done.status.available_replicas, Some(4));
        let progressing = done
            .status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_.as_deref() == Some("Progressing"))
            .unwrap();
        assert_eq!(
            progressing.reason.as_deref(),
            Some("NewReplicaSetAvailable")
        );
    }

    #[test]
    fn recreate_waits_for_old_pods() {
        let v1 = deployment(2, "busybox:1", json!({"type": "Recreate"}));
        let v2 = deployment(2, "busybox:2", json!({"type": "Recreate"}));
        let old = with_status(rs_of(&v1, 1), 2, 2, 2);
        let p = plan(&v2, std::slice::from_ref(&old));
        assert!(p.changes.contains(&Change::Scale {
            name: old.metadata.name.clone().unwrap(),
            replicas: 0
        }));
        let new = with_status(rs_of(&v2, 2), 0, 0, 0);
        let p = plan(&v2, &[with_status(old.clone(), 0, 1, 0), new.clone()]);
        assert!(
            p.changes.is_empty(),
            "an old pod is still there: {:?}",
            p.changes
        );
        let p = plan(&v2, &[with_status(old, 0, 0, 0), new.clone()]);
        assert_eq!(
            p.changes,
            [Change::Scale {
                name: new.metadata.name.clone().unwrap(),
                replicas: 2
            }]
        );
    }

    #[test]
    fn scale_and_history_limit() {
        let d = deployment(5, "busybox:3", json!({}));
        let mut d_limited = d.clone();
        d_limited.spec.revision_history_limit = Some(1);
        let cur = with_status(rs_of(&d, 3), 2, 2, 2);
        let mut olds = Vec::new();
        for (rev, img) in [(1, "busybox:1"), (2, "busybox:2")] {
            olds.push(with_status(
                rs_of(&deployment(5, img, json!({})), rev),
                0,
                0,
                0,
            ));
        }
        let mut all = olds.clone();
        all.push(cur.clone());
        let p = plan(&d_limited, &all);
        assert!(
            p.changes.contains(&Change::Scale {
                name: cur.metadata.name.clone().unwrap(),
                replicas: 5
            }),
            "{:?}",
            p.changes
        );
        assert!(
            p.changes
                .contains(&Change::Delete(olds[0].metadata.name.clone().unwrap())),
            "{:?}",
            p.changes
        );
        assert!(
            !p.changes
                .contains(&Change::Delete(olds[1].metadata.name.clone().unwrap()))
        );
    }

    #[test]
    fn percentages_round_as_kubernetes_does() {
        let p = |s: &str| Some(IntOrString::String(s.into()));
        assert_eq!(resolve(p("25%").as_ref(), 25, 10, true), 3);
        assert_eq!(resolve(p("25%").as_ref(), 25, 10, false), 2);
        assert_eq!(resolve(Some(&IntOrString::Int(2)), 25, 10, false), 2);
        assert_eq!(resolve(None, 25, 1, true), 1);
        assert_eq!(resolve(None, 25, 1, false), 0);
    }
}
