//! The controllers of the standalone cluster, each kube-rs's shape: watcher -> reflector store
//! -> `reconcile(object) -> Action`, with kube-runtime's de-duplicating requeue
//! (`kube::runtime::Controller`). Each decides with a pure `plan` function on plain objects
//! (unit-tested without a server) and applies the plan through the API as any client would.
//!
//! | file | owns |
//! | --- | --- |
//! | `replicaset.rs` | ReplicaSet -> Pods (owner references, scale up/down, status) |
//! | `deployment.rs` | Deployment -> ReplicaSets (pod-template-hash, rolling update with maxSurge/maxUnavailable, Recreate, revisions, history limit, status and conditions) |
//! | `endpointslice.rs` | Service -> EndpointSlice (ready/serving/terminating from pods, named target ports) |
//! | `nodeipam.rs` | Node -> spec.podCIDR from the cluster CIDR (host-gw ranges for the agents) |
//! | `nodelifecycle.rs` | heartbeats -> Ready=Unknown and the unreachable taint; eviction after the toleration |
//!
//! Reconcilers read the children through the API (a list with the owner's selector): simple
//! and always current, at the cost of one list per reconcile. Namespace deletion and
//! ownerReference garbage collection live in the API server's `gc.rs`.

pub mod deployment;
pub mod endpointslice;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod replicaset;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::runtime::controller::Action;

/// What a reconcile can fail with (retried with back-off by the controller).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ControllerError {
    let what = what.into();
    move |source| ControllerError::Api { what, source }
}

/// Requeue after a failed reconcile.
pub(crate) fn on_error<K>(_: Arc<K>, e: &ControllerError, _: Arc<kube::Client>) -> Action {
    tracing::warn!(error = %e, "reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

/// A label selector as a list query (`a=b,c in (d,e)`); `None` when it selects nothing
/// representable (an empty selector selects everything).
pub fn selector_query(s: &LabelSelector) -> Option<String> {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None,
        });
    }
    Some(parts.join(","))
}

/// Whether `labels` match a map selector (Service selectors).
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The controller owner reference of an object of `kind` to put on its children.
pub fn controller_ref(api_version: &str, kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Whether `owners` name `uid` as the controller.
pub fn controlled_by(owners: Option<&Vec<OwnerReference>>, uid: &str) -> bool {
    owners
        .into_iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Runs every controller until one stops.
pub async fn run(
    client: kube::Client,
    nodes: nodelifecycle::NodeLifecycleConfig,
    ipam: nodeipam::NodeIpamConfig,
) {
    let ctx = Arc::new(client);
    tokio::select! {
        _ = replicaset::run(ctx.clone()) => tracing::error!("replicaset controller stopped"),
        _ = deployment::run(ctx.clone()) => tracing::error!("deployment controller stopped"),
        _ = endpointslice::run(ctx.clone()) => tracing::error!("endpointslice controller stopped"),
        _ = nodelifecycle::run(ctx.clone(), nodes) => tracing::error!("node lifecycle stopped"),
        _ = nodeipam::run(ctx.clone(), ipam) => tracing::error!("node IPAM stopped"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    #[test]
    fn selectors_become_queries() {
        let s = LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert_eq!(
            selector_query(&s).as_deref(),
            Some("app=web,tier in (a,b),!canary")
        );
    }
}
