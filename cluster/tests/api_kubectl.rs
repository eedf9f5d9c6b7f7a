//! Debian's kubectl against the API server on 127.0.0.1: apply (create, then a changed
//! manifest), get -o yaml / -o wide / -w, label, scale, the three patch types, cascading deletes,
//! and the error answers (409, 422, 404, 401, node authorization 403). Runs on redb; one test
//! runs the kubectl flow on etcd.

mod api_support;

use std::time::Duration;

use api_support::{TestServer, code, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: nginx:1.25
        ports:
        - containerPort: 80
        env:
        - {name: MODE, value: one}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_label_scale_patch() {
    let s = TestServer::redb().await;
    let out = s.apply(DEPLOYMENT).await;
    assert!(out.contains("deployment.apps/web created"), "{out}");
    assert!(out.contains("service/web created"), "{out}");

    // Apply a changed manifest: kubectl computes a strategic merge patch from last-applied.
    let changed = DEPLOYMENT
        .replace("nginx:1.25", "nginx:1.26")
        .replace("value: one", "value: two");
    let out = s.apply(&changed).await;
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    assert!(out.contains("service/web unchanged"), "{out}");
    let got = s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].value} {.metadata.generation}"]).await;
    assert_eq!(got, "nginx:1.26 two 2");

    // -o yaml shows the server's defaults and metadata.
    let yaml = s.ok(&["get", "deploy", "web", "-o", "yaml"]).await;
    for want in [
        "uid:",
        "creationTimestamp:",
        "resourceVersion:",
        "imagePullPolicy: IfNotPresent",
        "maxSurge: 25%",
        "restartPolicy: Always",
    ] {
        assert!(yaml.contains(want), "missing {want:?} in\n{yaml}");
    }
    // -o wide prints the Table's priority-1 columns.
    let wide = s.ok(&["get", "deploy", "-o", "wide"]).await;
    assert!(
        wide.contains("IMAGES") && wide.contains("nginx:1.26") && wide.contains("app=web"),
        "{wide}"
    );
    let svc = s.ok(&["get", "svc", "web", "-o", "wide"]).await;
    assert!(
        svc.contains("NodePort") && svc.contains("80:3") && svc.contains("10."),
        "{svc}"
    );
    let ip = s
        .ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .await;
    assert!(ip.starts_with("10.") && ip != "10.96.0.1", "{ip}");

    // label, then select by it.
    s.ok(&["label", "deploy", "web", "tier=frontend"]).await;
    let sel = s
        .ok(&["get", "deploy", "-l", "tier=frontend", "-o", "name"])
        .await;
    assert_eq!(sel.trim(), "deployment.apps/web");
    assert_eq!(
        s.ok(&["get", "deploy", "-l", "tier!=frontend", "-o", "name"])
            .await
            .trim(),
        ""
    );

    // scale goes through the scale subresource.
    s.ok(&["scale", "deploy", "web", "--replicas=5"]).await;
    assert_eq!(
        s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "5"
    );

    // The three patch types.
    s.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
    ])
    .await;
    assert_eq!(
        s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "3"
    );
    s.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ])
    .await;
    assert_eq!(
        s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "4"
    );
    s.ok(&["patch", "deploy", "web", "--type=strategic", "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"busybox"},{"name":"app","env":[{"name":"EXTRA","value":"x"}]}]}}}}"#]).await;
    let names = s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.template.spec.containers[*].name}|{.spec.template.spec.containers[?(@.name==\"app\")].env[*].name}"]).await;
    assert_eq!(names, "app side|MODE EXTRA");
    // A strategic patch of a service port merges by port.
    s.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        r#"{"spec":{"ports":[{"port":80,"targetPort":8080}]}}"#,
    ])
    .await;
    assert_eq!(
        s.ok(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].targetPort} {.spec.ports[0].nodePort}"
        ])
        .await
        .split(' ')
        .next(),
        Some("8080")
    );

    // Tables for the other main resources.
    s.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: '1', b: '2'}\n")
        .await;
    let cm = s.ok(&["get", "cm", "cfg"]).await;
    assert!(
        cm.contains("DATA") && cm.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("2"),
        "{cm}"
    );
    let ns = s.ok(&["get", "ns"]).await;
    assert!(ns.contains("kube-system") && ns.contains("Active"), "{ns}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_streams_changes() {
    let s = TestServer::redb().await;
    let mut watch = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(s.kubeconfig())
        .arg("--cache-dir")
        .arg(s.data_dir().join("kubectl-cache"))
        .args(["get", "pods", "-w", "--output-watch-events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let _ = tx.send(l);
        }
    });
    // kubectl prints nothing for an empty list; give it time to start watching.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.ok(&["run", "w1", "--image=busybox", "--restart=Never"])
        .await;
    s.ok(&["label", "pod", "w1", "seen=yes"]).await;
    s.ok(&["delete", "pod", "w1", "--wait=false"]).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !got.iter().any(|l: &String| l.starts_with("DELETED")) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => got.push(l),
            _ => panic!("kubectl get -w printed only {got:?}"),
        }
    }
    got.retain(|l| !l.starts_with("EVENT"));
    let kinds: Vec<&str> = got
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(kinds.first(), Some(&"ADDED"), "{got:?}");
    assert!(kinds.contains(&"MODIFIED"), "{got:?}");
    assert!(got.iter().all(|l| l.contains("w1")), "{got:?}");
    let _ = watch.kill().await;
}

fn owned(kind: &str, api_version: &str, name: &str, uid: &str) -> serde_json::Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}])
}

/// Deployment -> ReplicaSet -> Pod, linked by ownerReferences as the controllers would.
async fn owner_chain(s: &TestServer, name: &str) {
    s.apply(&DEPLOYMENT.replace("name: web", &format!("name: {name}")))
        .await;
    let duid = s
        .ok(&["get", "deploy", name, "-o", "jsonpath={.metadata.uid}"])
        .await;
    let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": format!("{name}-rs"), "labels": {"app": "web"}, "ownerReferences": owned("Deployment", "apps/v1", name, &duid)},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "nginx"}]}}}});
    let out = s
        .kubectl_with(&["create", "-f", "-"], Some(&rs.to_string()))
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rsuid = s
        .ok(&[
            "get",
            "rs",
            &format!("{name}-rs"),
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-pod"), "labels": {"app": "web"}, "ownerReferences": owned("ReplicaSet", "apps/v1", &format!("{name}-rs"), &rsuid)},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}});
    let out = s
        .kubectl_with(&["create", "-f", "-"], Some(&pod.to_string()))
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn gone(s: &TestServer, what: &str) -> bool {
    eventually(Duration::from_secs(15), || async {
        let out = s
            .kubectl(&["get", what, "-o", "name", "--ignore-not-found"])
            .await;
        String::from_utf8_lossy(&out.stdout).trim().is_empty()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_cascades() {
    let s = TestServer::redb().await;
    // Background (kubectl's default): the owner goes at once, the collector removes the rest.
    owner_chain(&s, "bg").await;
    s.ok(&["delete", "deploy", "bg"]).await;
    assert!(gone(&s, "rs/bg-rs").await, "replicaset left behind");
    assert!(gone(&s, "pod/bg-pod").await, "pod left behind");

    // Foreground: kubectl waits until the owner is gone, which is after its dependents.
    owner_chain(&s, "fg").await;
    s.ok(&[
        "delete",
        "deploy",
        "fg",
        "--cascade=foreground",
        "--timeout=30s",
    ])
    .await;
    assert_eq!(s.ok(&["get", "rs,pods", "-o", "name"]).await.trim(), "");

    // Orphan: dependents stay, without the reference to the deleted owner.
    owner_chain(&s, "or").await;
    s.ok(&[
        "delete",
        "deploy",
        "or",
        "--cascade=orphan",
        "--timeout=30s",
    ])
    .await;
    assert!(gone(&s, "deploy/or").await);
    let refs = s
        .ok(&[
            "get",
            "rs",
            "or-rs",
            "-o",
            "jsonpath={.metadata.ownerReferences}",
        ])
        .await;
    assert_eq!(refs, "");
    assert_eq!(
        s.ok(&["get", "pod", "or-pod", "-o", "name"]).await.trim(),
        "pod/or-pod"
    );

    // A finalizer holds a delete until it is removed.
    s.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held}\n")
        .await;
    s.ok(&[
        "patch",
        "cm",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ])
    .await;
    s.ok(&["delete", "cm", "held", "--wait=false"]).await;
    let ts = s
        .ok(&[
            "get",
            "cm",
            "held",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .await;
    assert!(!ts.is_empty());
    s.ok(&[
        "patch",
        "cm",
        "held",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await;
    assert!(gone(&s, "cm/held").await);

    // Deleting a namespace deletes its contents.
    s.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: doomed}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: doomed}\n").await;
    s.ok(&["delete", "namespace", "doomed", "--timeout=30s"])
        .await;
    assert!(gone(&s, "ns/doomed").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers() {
    let s = TestServer::redb().await;
    let client = s.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();

    // 409: create twice, and an update from a stale resourceVersion.
    assert_eq!(
        code(&cms.create(&PostParams::default(), &cm).await.unwrap_err()),
        409
    );
    let mut fresh = created.clone();
    fresh.data = Some([("k".to_string(), "v2".to_string())].into());
    cms.replace("c", &PostParams::default(), &fresh)
        .await
        .unwrap();
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "v3".to_string())].into());
    let e = cms
        .replace("c", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(code(&e), 409, "{e}");
    assert!(
        e.to_string().contains("the object has been modified"),
        "{e}"
    );
    // kubectl sees the same through replace of an old manifest.
    let old = serde_json::to_string(&created).unwrap();
    let out = s.kubectl_with(&["replace", "-f", "-"], Some(&old)).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the object has been modified"));

    // 422 lists each bad field.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let bad: Pod = serde_json::from_value(json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "c", "image": ""}]}})).unwrap();
    let e = pods.create(&PostParams::default(), &bad).await.unwrap_err();
    assert_eq!(code(&e), 422, "{e}");
    let kube::Error::Api(status) = &e else {
        panic!("{e}")
    };
    let fields: Vec<String> = status
        .details
        .as_ref()
        .unwrap()
        .causes
        .iter()
        .map(|c| c.field.clone())
        .collect();
    assert_eq!(fields, ["metadata.name", "spec.containers[0].image"]);
    let out = s
        .kubectl_with(
            &["apply", "-f", "-"],
            Some(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n",
            ),
        )
        .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.containers[0].image: Required value"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An object that does not match its type's schema is refused too.
    let out = s.kubectl_with(&["create", "--validate=false", "-f", "-"], Some(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":"nope"}}"#)).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 404: unknown object, namespace, resource.
    assert_eq!(code(&pods.get("nope").await.unwrap_err()), 404);
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "no-such-ns");
    assert_eq!(
        code(
            &elsewhere
                .create(&PostParams::default(), &cm)
                .await
                .unwrap_err()
        ),
        404
    );
    let out = s.kubectl(&["get", "--raw", "/apis/batch/v1/jobs"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 401 without a valid token.
    let anon = s.client_with_token("not-a-token").await;
    let e = Api::<ConfigMap>::namespaced(anon, "default")
        .list(&Default::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 401, "{e}");
    let out = s.kubectl(&["--token=wrong", "get", "pods"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_write_only_their_own_objects() {
    let s = TestServer::redb().await;
    let admin = s.client().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["n1", "n2"] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": n}})).unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    for (p, n) in [("on1", "n1"), ("on2", "n2")] {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": p}, "spec": {"nodeName": n, "containers": [{"name": "c", "image": "busybox"}]}})).unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    let cred = keel_cluster::api::node_credential(&s.node_join_token(), "n1");
    let node1 = s.client_with_token(&cred).await;
    let as_n1: Api<Node> = Api::all(node1.clone());
    let ready =
        Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
    as_n1
        .patch_status("n1", &PatchParams::default(), &ready)
        .await
        .unwrap();
    as_n1
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    let e = as_n1
        .patch_status("n2", &PatchParams::default(), &ready)
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403, "{e}");
    assert_eq!(
        code(&as_n1.delete("n2", &Default::default()).await.unwrap_err()),
        403
    );
    // Reads are allowed.
    assert_eq!(
        as_n1.list(&Default::default()).await.unwrap().items.len(),
        2
    );

    let pods_n1: Api<Pod> = Api::namespaced(node1.clone(), "default");
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    pods_n1
        .patch_status("on1", &PatchParams::default(), &running)
        .await
        .unwrap();
    assert_eq!(
        code(
            &pods_n1
                .patch_status("on2", &PatchParams::default(), &running)
                .await
                .unwrap_err()
        ),
        403
    );
    // Nor may it change a pod's spec or create other objects.
    assert_eq!(
        code(
            &pods_n1
                .patch(
                    "on1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}))
                )
                .await
                .unwrap_err()
        ),
        403
    );
    let cms: Api<ConfigMap> = Api::namespaced(node1, "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    assert_eq!(
        code(&cms.create(&PostParams::default(), &cm).await.unwrap_err()),
        403
    );
    // A node registers itself: it may create its own Node and Lease, no other.
    let cred3 = keel_cluster::api::node_credential(&s.node_join_token(), "n3");
    let node3 = s.client_with_token(&cred3).await;
    let as_n3: Api<Node> = Api::all(node3.clone());
    for (name, want) in [("n4", Some(403)), ("n3", None)] {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let got = as_n3.create(&PostParams::default(), &n).await.err();
        assert_eq!(got.as_ref().map(code), want, "{name}: {got:?}");
    }
    let leases: Api<Lease> = Api::namespaced(node3, "kube-node-lease");
    for (name, want) in [("n1", Some(403)), ("n3", None)] {
        let l: Lease = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let got = leases.create(&PostParams::default(), &l).await.err();
        assert_eq!(got.as_ref().map(code), want, "{name}: {got:?}");
    }
    // A forged credential for n2 built without the join token is not accepted at all.
    let forged = cred.replace("node.n1.", "node.n2.");
    let e = Api::<Node>::all(s.client_with_token(&forged).await)
        .patch_status("n2", &PatchParams::default(), &ready)
        .await
        .unwrap_err();
    assert_eq!(code(&e), 401);
    assert_eq!(
        pods.get("on1")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_on_etcd() {
    let s = TestServer::etcd().await;
    assert!(
        s.apply(DEPLOYMENT)
            .await
            .contains("deployment.apps/web created")
    );
    let changed = DEPLOYMENT.replace("nginx:1.25", "nginx:1.27");
    assert!(s.apply(&changed).await.contains("configured"));
    assert_eq!(
        s.ok(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}"
        ])
        .await,
        "nginx:1.27"
    );
    s.ok(&["scale", "deploy", "web", "--replicas=7"]).await;
    assert_eq!(
        s.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "7"
    );
    owner_chain(&s, "chain").await;
    s.ok(&["delete", "deploy", "chain"]).await;
    assert!(gone(&s, "pod/chain-pod").await);
    s.ok(&["delete", "deploy/web", "svc/web"]).await;
    assert!(gone(&s, "deploy/web").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_generators_send_protobuf() {
    let s = TestServer::redb().await;
    s.ok(&["create", "namespace", "gen"]).await;
    s.ok(&[
        "-n",
        "gen",
        "create",
        "configmap",
        "cfg",
        "--from-literal=a=1",
        "--from-literal=b=2",
    ])
    .await;
    s.ok(&[
        "-n",
        "gen",
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=password=hunter2",
    ])
    .await;
    assert_eq!(
        s.ok(&[
            "-n",
            "gen",
            "get",
            "cm",
            "cfg",
            "-o",
            "jsonpath={.data.a}{.data.b}"
        ])
        .await,
        "12"
    );
    assert_eq!(
        s.ok(&[
            "-n",
            "gen",
            "get",
            "secret",
            "sec",
            "-o",
            "jsonpath={.data.password} {.type}"
        ])
        .await,
        "aHVudGVyMg== Opaque"
    );
    // Kinds without protobuf decoding say to send JSON.
    let out = s
        .kubectl(&["create", "deployment", "d", "--image=busybox"])
        .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("as JSON"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
