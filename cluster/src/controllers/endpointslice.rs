//! Service -> EndpointSlice: every pod the Service's selector matches that has an IP becomes an
//! endpoint, with `ready` (pod Ready and not terminating), `serving` (pod Ready) and
//! `terminating` (being deleted) conditions, its node and a targetRef; named target ports are
//! resolved through the pods' container ports. One IPv4 slice per Service, named
//! `<service>-keel`, labelled `kubernetes.io/service-name` and owned by the Service (the garbage
//! collector removes it with the Service). Services without a selector are left to their users.
//!
//! Not here yet: IPv6 slices, more than one slice for services over 1,000 endpoints, pods whose
//! named port resolves to different numbers (the first resolution wins).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::replicaset::ready;
use super::{ControllerError, api_err, controller_ref, labels_match, on_error};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.keel.dev";

/// The slice's name for a Service.
pub fn slice_name(service: &str) -> String {
    format!("{service}-keel")
}

/// The EndpointSlice `svc` should have given the pods of its namespace; `None` for a Service
/// without a selector.
pub fn desired(svc: &Service, pods: &[Pod]) -> Option<EndpointSlice> {
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let selected: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            labels_match(
                selector,
                p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            ) && p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty() && !ip.contains(':'))
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded") | Some("Failed")
                )
        })
        .collect();
    let container_port = |p: &Pod, port_name: &str| -> Option<i32> {
        p.spec.as_ref()?.containers.iter().find_map(|c| {
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(port_name))
                .map(|cp| cp.container_port)
        })
    };
    let mut ports = Vec::new();
    let mut named: Vec<String> = Vec::new();
    for sp in spec.ports.iter().flatten() {
        let port = match &sp.target_port {
            None => Some(sp.port),
            Some(IntOrString::Int(i)) => Some(*i),
            Some(IntOrString::String(n)) => {
                named.push(n.clone());
                selected.iter().find_map(|p| container_port(p, n))
            }
        };
        ports.push(EndpointPort {
            name: Some(sp.name.clone().unwrap_or_default()),
            port,
            protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
            app_protocol: sp.app_protocol.clone(),
        });
    }
    let mut endpoints: Vec<Endpoint> = selected
        .iter()
        .filter(|p| named.iter().all(|n| container_port(p, n).is_some()))
        .map(|p| {
            let terminating = p.metadata.deletion_timestamp.is_some();
            let is_ready = ready(p);
            Endpoint {
                addresses: vec![
                    p.status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .unwrap_or_default(),
                ],
                conditions: Some(EndpointConditions {
                    ready: Some(is_ready && !terminating),
                    serving: Some(is_ready),
                    terminating: Some(terminating),
                }),
                node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                hostname: None,
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: p.metadata.name.clone(),
                    namespace: p.metadata.namespace.clone(),
                    uid: p.metadata.uid.clone(),
                    ..ObjectReference::default()
                }),
                deprecated_topology: None,
                hints: None,
                zone: None,
            }
        })
        .collect();
    endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&name)),
            namespace: Some(ns),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.into(), name.clone()),
                (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
            ])),
            owner_references: Some(vec![controller_ref(
                "v1",
                "Service",
                &name,
                svc.metadata.uid.as_deref().unwrap_or(""),
            )]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(ports),
    })
}

async fn reconcile(
    svc: Arc<Service>,
    client: Arc<kube::Client>,
) -> Result<Action, ControllerError> {
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced((*client).clone(), &ns);
    let all = pods
        .list(&ListParams::default())
        .await
        .map_err(api_err(format!("list pods in {ns}")))?
        .items;
    let Some(slice) = desired(&svc, &all) else {
        return Ok(Action::await_change());
    };
    let slices: Api<EndpointSlice> = Api::namespaced((*client).clone(), &ns);
    let name = slice.metadata.name.clone().unwrap_or_default();
    let current = slices
        .get_opt(&name)
        .await
        .map_err(api_err(format!("get endpointslice {ns}/{name}")))?;
    let same = current.as_ref().is_some_and(|c| {
        c.endpoints == slice.endpoints
            && c.ports == slice.ports
            && c.address_type == slice.address_type
    });
    if !same {
        let mut body = serde_json::to_value(&slice).unwrap_or_default();
        body["apiVersion"] = "discovery.k8s.io/v1".into();
        body["kind"] = "EndpointSlice".into();
        let result = match current {
            // Replace endpoints and ports whole (a merge patch replaces lists).
            Some(_) => slices
                .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .map(|_| ()),
            None => slices.create(&Default::default(), &slice).await.map(|_| ()),
        };
        result.map_err(api_err(format!("write endpointslice {ns}/{name}")))?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Runs the EndpointSlice controller.
pub async fn run(client: Arc<kube::Client>) {
    let services: Api<Service> = Api::all((*client).clone());
    let pods: Api<Pod> = Api::all((*client).clone());
    let slices: Api<EndpointSlice> = Api::all((*client).clone());
    let controller = Controller::new(services, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(slices, watcher::Config::default())
        .watches(pods, watcher::Config::default(), move |pod: Pod| {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            store
                .state()
                .into_iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|s| {
                    s.spec
                        .as_ref()
                        .and_then(|sp| sp.selector.as_ref())
                        .is_some_and(|sel| !sel.is_empty() && labels_match(sel, &labels))
                })
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .run(reconcile, on_error, client)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(target: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "s-1"},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": target}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, ip: &str, ready: bool, deleting: bool, labels: serde_json::Value) -> Pod {
        let mut meta = json!({"name": name, "namespace": "default", "uid": format!("u-{name}"),
            "labels": labels});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                "ports": [{"name": "web", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    #[test]
    fn endpoints_with_conditions_and_resolved_ports() {
        let pods = [
            pod("a", "10.1.0.2", true, false, json!({"app": "web"})),
            pod("b", "10.1.0.3", false, false, json!({"app": "web"})),
            pod("c", "10.1.0.4", true, true, json!({"app": "web"})),
            pod("other", "10.1.0.5", true, false, json!({"app": "db"})),
            pod("no-ip", "", true, false, json!({"app": "web"})),
        ];
        let s = desired(&svc(json!("web")), &pods).unwrap();
        let endpoints = s.endpoints.clone().unwrap_or_default();
        assert_eq!(s.metadata.name.as_deref(), Some("web-keel"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        assert_eq!(
            s.ports.as_ref().unwrap()[0].port,
            Some(8080),
            "named targetPort"
        );
        let cond: Vec<(String, bool, bool, bool)> = endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (
                    e.addresses[0].clone(),
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            cond,
            [
                ("10.1.0.2".to_string(), true, true, false),
                ("10.1.0.3".to_string(), false, false, false),
                ("10.1.0.4".to_string(), false, true, true),
            ]
        );
        let s = desired(&svc(json!(9090)), &pods).unwrap();
        assert_eq!(s.ports.as_ref().unwrap()[0].port, Some(9090));
    }

    #[test]
    fn services_without_selector_are_not_ours() {
        let mut s = svc(json!(80));
        s.spec.as_mut().unwrap().selector = None;
        assert!(desired(&s, &[]).is_none());
    }
}
