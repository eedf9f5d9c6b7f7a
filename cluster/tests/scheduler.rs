//! The scheduler against keel's API server (redb): pods land on nodes that fit, replicas of one
//! owner spread, selectors/affinity/taints/cordons/readiness/hostPorts/resources filter, a pod no
//! node fits gets a FailedScheduling event saying why and is bound once a node with room comes.

mod api_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use api_support::TestServer;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use keel_cluster::scheduler::{self, SchedulerConfig};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};

fn node(name: &str, cpu: &str, labels: Value, extra_spec: Value, ready: bool) -> Node {
    let mut spec = json!({});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
        "status": {
            "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    }))
    .unwrap()
}

fn pod(name: &str, cpu: &str, extra_spec: Value, owner: Option<&str>) -> Pod {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox",
        "resources": {"requests": {"cpu": cpu}}}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(e.clone());
    }
    let mut meta = json!({"name": name});
    if let Some(uid) = owner {
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "rs", "uid": uid, "controller": true}]);
    }
    serde_json::from_value(json!({"metadata": meta, "spec": spec})).unwrap()
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Option<String> {
    pods.get(name).await.ok()?.spec?.node_name
}

async fn wait_bound(pods: &Api<Pod>, name: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = node_of(pods, name).await {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod {name} was not bound in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_pods_where_they_fit_and_says_why_not() {
    let s = TestServer::redb().await;
    let client = s.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    for n in [
        node("a", "4", json!({"disk": "ssd"}), json!({}), true),
        node("b", "4", json!({}), json!({}), true),
        node("c", "4", json!({}), json!({}), true),
        node(
            "cordoned",
            "64",
            json!({}),
            json!({"unschedulable": true}),
            true,
        ),
        node("down", "64", json!({}), json!({}), false),
        node(
            "tainted",
            "64",
            json!({}),
            json!({"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}),
            true,
        ),
    ] {
        nodes.create(&pp, &n).await.unwrap();
    }
    let sched = tokio::spawn(scheduler::run(client.clone(), SchedulerConfig::default()));

    // Three replicas of one owner: three different nodes, none of the three unfit ones.
    for i in 0..3 {
        pods.create(
            &pp,
            &pod(&format!("web-{i}"), "100m", json!({}), Some("rs-uid")),
        )
        .await
        .unwrap();
    }
    let mut placed = BTreeSet::new();
    for i in 0..3 {
        placed.insert(wait_bound(&pods, &format!("web-{i}")).await);
    }
    assert_eq!(placed, BTreeSet::from(["a".into(), "b".into(), "c".into()]));

    // nodeSelector, required node affinity, a toleration, a hostPort taken.
    pods.create(
        &pp,
        &pod(
            "ssd",
            "100m",
            json!({"nodeSelector": {"disk": "ssd"}}),
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(wait_bound(&pods, "ssd").await, "a");
    let affinity = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
        {"nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "DoesNotExist"}],
                                "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}]}}}});
    pods.create(&pp, &pod("aff", "100m", affinity, None))
        .await
        .unwrap();
    assert_eq!(wait_bound(&pods, "aff").await, "b");
    let tolerates = json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db",
        "effect": "NoSchedule"}], "nodeSelector": {}});
    // 10 cpus: only the tainted node has room, and this pod tolerates it.
    pods.create(&pp, &pod("db", "10", tolerates, None))
        .await
        .unwrap();
    assert_eq!(wait_bound(&pods, "db").await, "tainted");
    let host_port = |name: &str| {
        pod(
            name,
            "10m",
            json!({"containers": [{"name": "c", "image": "busybox",
                "ports": [{"containerPort": 80, "hostPort": 8080}]}],
                "nodeSelector": {"disk": "ssd"}}),
            None,
        )
    };
    pods.create(&pp, &host_port("port-1")).await.unwrap();
    assert_eq!(wait_bound(&pods, "port-1").await, "a");
    pods.create(&pp, &host_port("port-2")).await.unwrap();

    // Too big for every schedulable node: pending, with an event that counts the reasons.
    pods.create(&pp, &pod("big", "16", json!({}), None))
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut messages = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(messages.contains_key("big") && messages.contains_key("port-2")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "FailedScheduling events: {messages:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        for e in events.list(&ListParams::default()).await.unwrap().items {
            if e.reason.as_deref() == Some("FailedScheduling") {
                let name = e.involved_object.name.clone().unwrap_or_default();
                messages.insert(name, e.message.clone().unwrap_or_default());
            }
        }
    }
    let big = &messages["big"];
    assert!(big.starts_with("0/6 nodes are available: "), "{big}");
    for want in [
        "3 Insufficient cpu",
        "1 node(s) were unschedulable",
        "1 node(s) were not ready",
        "1 node(s) had untolerated taint {dedicated: db}",
    ] {
        assert!(big.contains(want), "{want:?} missing from {big:?}");
    }
    assert!(
        messages["port-2"].contains("1 node(s) didn't have free ports"),
        "{}",
        messages["port-2"]
    );
    assert_eq!(node_of(&pods, "big").await, None);

    // A node with room arrives: the waiting pod is bound without waiting out its back-off.
    nodes
        .create(&pp, &node("huge", "32", json!({}), json!({}), true))
        .await
        .unwrap();
    assert_eq!(wait_bound(&pods, "big").await, "huge");

    // Deleting the pod on the port frees it for the other.
    pods.delete("port-1", &Default::default()).await.unwrap();
    // Bound pods are deleted gracefully (the node finishes them); with no agent, force it.
    let _ = pods
        .delete(
            "port-1",
            &kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(wait_bound(&pods, "port-2").await, "a");

    // Pods for another scheduler are left alone.
    pods.create(
        &pp,
        &pod(
            "other",
            "10m",
            json!({"schedulerName": "someone-else"}),
            None,
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node_of(&pods, "other").await, None);
    sched.abort();
}
