//! The controllers against keel's API server (redb): a Deployment makes a ReplicaSet that makes
//! pods; scaling; a rolling update that never drops below replicas - maxUnavailable available
//! pods; a Service's EndpointSlice follows pod readiness and deletion. No node agent exists in
//! these tests, so the test plays kubelet's part: it writes each pod's status (IP, Ready) and
//! finishes graceful deletes; the scheduler binds the pods to one Node object.

mod api_support;

use std::collections::BTreeMap;
use std::time::Duration;

use api_support::TestServer;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Plays kubelet: every live pod of the namespace gets an IP and, when `ready`, Ready=True.
async fn kubelet(pods: &Api<Pod>, ready: impl Fn(&Pod) -> bool) {
    let list = pods.list(&ListParams::default()).await.unwrap();
    for p in list.items {
        let name = p.metadata.name.clone().unwrap();
        let has = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let want = ready(&p);
        if has == want && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some() {
            continue;
        }
        let ip = format!(
            "10.244.0.{}",
            2 + (name.bytes().map(u32::from).sum::<u32>() % 250)
        );
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if want { "True" } else { "False" },
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let _ = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    }
}

fn image_of(p: &Pod) -> String {
    p.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

fn live(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Deletes pods that are being deleted (the node's part of a graceful delete).
async fn finish_deletes(pods: &Api<Pod>) {
    for p in pods.list(&ListParams::default()).await.unwrap().items {
        if p.metadata.deletion_timestamp.is_some() {
            let _ = pods
                .delete(
                    p.metadata.name.as_deref().unwrap(),
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_scales_and_endpoints_follow() {
    let s = TestServer::redb().await;
    let client = s.client().await;
    let controllers = tokio::spawn(keel_cluster::controllers::run(
        client.clone(),
        Default::default(),
        Default::default(),
    ));
    // One node and the scheduler, so pods are bound and deletes are graceful, as in a cluster.
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "n1"},
        "status": {"allocatable": {"cpu": "8", "memory": "8Gi", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let scheduler = tokio::spawn(keel_cluster::scheduler::run(
        client.clone(),
        Default::default(),
    ));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

    let deployment = |image: &str, replicas: i32| -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": image,
                                      "ports": [{"name": "http", "containerPort": 8080}]}]}}}
        }))
        .unwrap()
    };
    deployments
        .create(&PostParams::default(), &deployment("busybox:1", 3))
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();

    // Three pods from one ReplicaSet; once ready, the Deployment is available and the slice
    // holds three ready endpoints on the named port.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        kubelet(&pods, |_| true).await;
        let d = deployments.get("web").await.unwrap();
        let st = d.status.clone().unwrap_or_default();
        let slice = slices.get_opt("web-keel").await.unwrap();
        let ready_eps = slice
            .as_ref()
            .and_then(|s| s.endpoints.clone())
            .unwrap_or_default()
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        if st.available_replicas == Some(3) && st.updated_replicas == Some(3) && ready_eps == 3 {
            let port = slice.unwrap().ports.unwrap()[0].port;
            assert_eq!(port, Some(8080), "named targetPort resolved");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first rollout: {st:?}, {ready_eps} ready endpoints"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rs_list = rss.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(rs_list.len(), 1);
    let first_rs = rs_list[0].metadata.name.clone().unwrap();
    assert!(first_rs.starts_with("web-"), "{first_rs}");

    // Rolling update with maxUnavailable 0: never fewer than 3 ready pods, never more than 4 live.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "c", "image": "busybox:2", "ports": [{"name": "http", "containerPort": 8080}]}]}}}})),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        let l = live(&all);
        let ready_now = l.iter().filter(|p| is_ready(p)).count();
        assert!(l.len() <= 4, "surge exceeded: {} live pods", l.len());
        assert!(ready_now >= 3, "availability dropped to {ready_now}");
        let d = deployments.get("web").await.unwrap();
        let st = d.status.clone().unwrap_or_default();
        let done = l.len() == 3
            && l.iter().all(|p| image_of(p) == "busybox:2")
            && st.updated_replicas == Some(3)
            && st.available_replicas == Some(3)
            && st.replicas == Some(3)
            && st.observed_generation == d.metadata.generation;
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollout stuck: {st:?}"
        );
        // New pods turn ready a moment after they appear; deleted pods finish.
        kubelet(&pods, |_| true).await;
        finish_deletes(&pods).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rs_list = rss.list(&ListParams::default()).await.unwrap().items;
    let sizes: BTreeMap<String, i32> = rs_list
        .iter()
        .map(|r| {
            (
                r.metadata.name.clone().unwrap(),
                r.spec.replicas.unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert_eq!(
        sizes[&first_rs], 0,
        "old ReplicaSet kept at zero: {sizes:?}"
    );

    // Scale to 5 then 1; a not-ready pod leaves the ready endpoints, a deleted one is terminating.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        kubelet(&pods, |_| true).await;
        finish_deletes(&pods).await;
        let n = live(&pods.list(&ListParams::default()).await.unwrap().items).len();
        let eps = slices
            .get("web-keel")
            .await
            .unwrap()
            .endpoints
            .unwrap_or_default()
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        if n == 5 && eps == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scale to 5: {n} pods, {eps} endpoints"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        let terminating = all
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .count();
        let slice = slices.get("web-keel").await.unwrap();
        let eps = slice.endpoints.unwrap_or_default();
        let term_eps = eps
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.terminating) == Some(true))
            .count();
        if live(&all).len() == 1 && terminating >= 4 && term_eps == terminating {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scale to 1: {} live, {terminating} terminating, {term_eps} terminating endpoints",
            live(&all).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish_deletes(&pods).await;
    let last = live(&pods.list(&ListParams::default()).await.unwrap().items)[0]
        .metadata
        .name
        .clone()
        .unwrap();
    kubelet(&pods, |_| false).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let eps = slices
            .get("web-keel")
            .await
            .unwrap()
            .endpoints
            .unwrap_or_default();
        let names: Vec<String> = eps
            .iter()
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .collect();
        let ready: Vec<Option<bool>> = eps
            .iter()
            .map(|e| e.conditions.as_ref().and_then(|c| c.ready))
            .collect();
        if names == [last.clone()] && ready == [Some(false)] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready endpoint: {names:?} {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controllers.abort();
    scheduler.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_turns_unreachable_and_its_pods_are_evicted() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Node;
    use keel_cluster::controllers::nodelifecycle::{NodeLifecycleConfig, UNREACHABLE};

    let s = TestServer::redb().await;
    let client = s.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    for name in ["alive", "silent"] {
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        nodes.create(&pp, &n).await.unwrap();
    }
    // "alive" heartbeats through its Lease; "silent" never does.
    let beat = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let l = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "alive"}, "spec": {"holderIdentity": "alive", "renewTime": now}});
                let lease: Lease = serde_json::from_value(l.clone()).unwrap();
                if leases.create(&PostParams::default(), &lease).await.is_err() {
                    let _ = leases
                        .patch("alive", &PatchParams::default(), &Patch::Merge(&l))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    for (name, node, tolerations) in [
        ("on-silent", "silent", json!([])),
        (
            "stays",
            "silent",
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]),
        ),
        ("on-alive", "alive", json!([])),
    ] {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "tolerations": tolerations,
                     "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        pods.create(&pp, &p).await.unwrap();
    }
    let config = NodeLifecycleConfig {
        grace: Duration::from_secs(2),
        eviction: Duration::from_secs(2),
        interval: Duration::from_millis(250),
    };
    let controllers = tokio::spawn(keel_cluster::controllers::run(
        client.clone(),
        config,
        Default::default(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let silent = nodes.get("silent").await.unwrap();
        let ready = silent
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        let tainted = silent
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| {
                t.iter()
                    .any(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
            });
        let evicted = pods
            .get("on-silent")
            .await
            .map(|p| p.metadata.deletion_timestamp.is_some())
            .unwrap_or(true);
        if ready.as_deref() == Some("Unknown") && tainted && evicted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "silent node: Ready={ready:?} tainted={tainted} evicted={evicted}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The tolerating pod and the pod on the heartbeating node stay; that node stays Ready.
    assert!(
        pods.get("stays")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );
    assert!(
        pods.get("on-alive")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );
    let alive = nodes.get("alive").await.unwrap();
    assert!(
        alive
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_none_or(|t| t.is_empty())
    );
    controllers.abort();
    beat.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_pod_ranges_and_a_deleted_nodes_range_is_reused() {
    use k8s_openapi::api::core::v1::Node;
    use keel_cluster::controllers::nodeipam::NodeIpamConfig;

    let s = TestServer::redb().await;
    let client = s.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let ipam = NodeIpamConfig::new("10.77.0.0/22".parse().unwrap(), 24).unwrap();
    let add = |name: &'static str, cidr: Option<&'static str>| {
        let nodes = nodes.clone();
        async move {
            let mut n = json!({"metadata": {"name": name}});
            if let Some(c) = cidr {
                n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
            }
            nodes
                .create(&PostParams::default(), &serde_json::from_value(n).unwrap())
                .await
                .unwrap();
        }
    };
    // One node brings its own range (of ours): it keeps it and nobody else gets it.
    add("own", Some("10.77.0.0/24")).await;
    for name in ["a", "b"] {
        add(name, None).await;
    }
    let controllers = tokio::spawn(keel_cluster::controllers::run(
        client.clone(),
        Default::default(),
        ipam,
    ));
    let ranges = |names: &'static [&'static str]| {
        let nodes = nodes.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let mut got = Vec::new();
                for n in names {
                    let node = nodes.get(n).await.unwrap();
                    let spec = node.spec.unwrap_or_default();
                    if let Some(c) = spec.pod_cidr {
                        assert_eq!(spec.pod_cidrs, Some(vec![c.clone()]), "{n}: podCIDRs");
                        got.push(c);
                    }
                }
                if got.len() == names.len() {
                    return got;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "ranges after 20 s: {got:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        ranges(&["own", "a", "b"]).await,
        ["10.77.0.0/24", "10.77.1.0/24", "10.77.2.0/24"]
    );
    // Joining later, while the watch runs.
    add("c", None).await;
    assert_eq!(ranges(&["c"]).await, ["10.77.3.0/24"]);
    // The /22 is full: a fifth node waits without a range, until a node leaves.
    add("d", None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        nodes
            .get("d")
            .await
            .unwrap()
            .spec
            .unwrap_or_default()
            .pod_cidr,
        None
    );
    nodes.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(ranges(&["d"]).await, ["10.77.1.0/24"]);
    controllers.abort();
}
