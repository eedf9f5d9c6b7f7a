//! End-to-end test of `keel agent`: `keel server --no-node` on 127.0.0.1 (API, scheduler,
//! controllers), `keel cri` inside a test network namespace with keel-cni (as
//! tests/cri_pods.rs runs it), and `keel agent` between them. Through kube-rs: the Node turns
//! Ready, pods are scheduled and run, exit codes and restarts show in their status, a deleted
//! pod's sandbox goes and then the pod object, and a Deployment's replicas run. The agent joins
//! with the node join token, and `kubectl logs` (plain, --tail, --timestamps, -f, --previous)
//! reaches its log endpoint through the API server. Privileged (root): namespaces, mounts,
//! cgroups.
//!
//! Needs `target/debug/keel-cni` (`cargo build -p keel-cni`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as KNode, Pod};
use keel_cri::api;
use keel_testkit::{NetnsGuard, privileged};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

mod common;

use common::{IMAGE, NodeRes, Proc, keel_bin, kubectl_in, wait_for};

const NODE: &str = "keel-test-node";

fn start_server(dir: &Path) -> (Proc, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.join("server.log");
    let mut child = Command::new(keel_bin())
        .args(["server", "--no-node", "--data-dir"])
        .arg(dir.join("server"))
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .env_remove("KEEL_CONFIG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn keel server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc {
        name: "keel server",
        child,
        log,
    };
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("keel server printed its kubeconfig path");
        if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
            return (proc, PathBuf::from(p));
        }
    }
}

async fn client(kubeconfig: &Path) -> kube::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn pod(name: &str, policy: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"test": name}},
        "spec": {
            "restartPolicy": policy,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", script],
                "env": [{"name": "GREETING", "value": "hi"}],
                "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}}
            }]
        }
    }))
    .unwrap()
}

fn container_status(p: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    p.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn condition(p: &Pod, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

async fn sandboxes_of(
    cri: &mut api::runtime_service_client::RuntimeServiceClient<
        keel_cri::tonic::transport::Channel,
    >,
    uid: &str,
) -> usize {
    cri.list_pod_sandbox(api::ListPodSandboxRequest {
        filter: Some(api::PodSandboxFilter {
            label_selector: HashMap::from([("io.kubernetes.pod.uid".into(), uid.into())]),
            ..Default::default()
        }),
    })
    .await
    .unwrap()
    .into_inner()
    .items
    .len()
}

/// `keel agent` for the test node, with a 1 s heartbeat and a 0.5 s restart back-off.
fn start_agent(node: &NodeRes, kubeconfig: &Path, n: u32) -> Proc {
    let dir = node.root();
    let log = dir.join(format!("agent-{n}.log"));
    let child = Command::new(keel_bin())
        .args(["--log", "keel_agent=debug,info", "agent", "--kubeconfig"])
        .arg(kubeconfig)
        .args(["--node-name", NODE, "--external-cri", "--disable-proxy"])
        .arg("--cri-socket")
        .arg(node.socket())
        .arg("--token-file")
        .arg(dir.join("server/tokens/node-join"))
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(["--node-ip", "127.0.0.1", "--pod-log-dir"])
        .arg(dir.join("pod-logs"))
        .arg("--pod-dir")
        .arg(dir.join("agent-pods"))
        .args(["--heartbeat-interval", "1", "--restart-backoff", "0.5"])
        .args(["--reserved-cpu", "100"])
        .env_remove("KEEL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        name: "keel agent",
        child,
        log,
    }
}

async fn sandbox_ids(
    cri: &mut api::runtime_service_client::RuntimeServiceClient<
        keel_cri::tonic::transport::Channel,
    >,
    label: (&str, &str),
) -> Vec<String> {
    let mut ids: Vec<String> = cri
        .list_pod_sandbox(api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: HashMap::from([(label.0.into(), label.1.into())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|s| s.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_the_pods_of_its_node() {
    if !privileged("agent_runs_the_pods_of_its_node") {
        return;
    }
    let node = NodeRes::new();
    let dir = node.root().to_owned();
    let _cri = node.start_cri();
    let (_server, kubeconfig) = start_server(&dir);
    let channel = wait_for("keel cri's socket", 30, || async {
        keel_cri::client::connect(&node.socket()).await.ok()
    })
    .await;
    let mut cri = keel_cri::client::clients(channel).0;

    let agent = start_agent(&node, &kubeconfig, 1);

    let kube = client(&kubeconfig).await;
    let nodes: Api<KNode> = Api::all(kube.clone());
    let n = wait_for("the Node to turn Ready", 30, || async {
        let n = nodes.get_opt(NODE).await.ok()??;
        let ready = n
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(n)
    })
    .await;
    let status = n.status.unwrap();
    let info = status.node_info.unwrap();
    assert!(
        info.container_runtime_version.starts_with("keel://"),
        "{}",
        info.container_runtime_version
    );
    let cap = status.capacity.unwrap();
    let alloc = status.allocatable.unwrap();
    assert_eq!(cap["pods"].0, "110");
    let cpus: u64 = cap["cpu"].0.parse().unwrap();
    assert_eq!(alloc["cpu"].0, format!("{}m", cpus * 1000 - 100));
    let addrs = status.addresses.unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1")
    );
    // The Lease is renewed (every second here).
    let leases: Api<Lease> = Api::namespaced(kube.clone(), "kube-node-lease");
    let first = wait_for("the node's Lease", 10, || async {
        leases.get_opt(NODE).await.ok()??.spec?.renew_time
    })
    .await;
    wait_for("a Lease renewal", 10, || async {
        let t = leases.get_opt(NODE).await.ok()??.spec?.renew_time?;
        (t != first).then_some(())
    })
    .await;

    // And so is the Ready condition's heartbeat.
    let beat = |n: KNode| {
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")?
            .last_heartbeat_time
    };
    let first_beat = beat(nodes.get(NODE).await.unwrap()).expect("a Ready heartbeat");
    wait_for("a Ready heartbeat renewal", 10, || async {
        let t = beat(nodes.get(NODE).await.ok()?)?;
        (t != first_beat).then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod(
            "hi",
            "Always",
            "echo hi; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
        ),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("fail", "Never", "echo failing; exit 3"),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("crash", "Always", "echo crashing; exit 1"),
    )
    .await
    .unwrap();

    let hi = wait_for("pod hi Running and Ready", 60, || async {
        let p = pods.get("hi").await.ok()?;
        let s = p.status.as_ref()?;
        (s.phase.as_deref() == Some("Running")
            && s.pod_ip.is_some()
            && condition(&p, "Ready").as_deref() == Some("True"))
        .then_some(p)
    })
    .await;
    assert_eq!(hi.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE));
    let s = hi.status.as_ref().unwrap();
    assert!(s.pod_ip.as_ref().unwrap().starts_with("10.250.7."), "{s:?}");
    assert_eq!(s.host_ip.as_deref(), Some("127.0.0.1"));
    let cs = container_status(&hi).unwrap();
    assert!(cs.ready);
    assert!(cs.container_id.as_ref().unwrap().starts_with("keel://"));
    assert!(cs.state.as_ref().unwrap().running.is_some());
    // The container's log is under the pod log dir, in kubelet's layout.
    let uid = hi.metadata.uid.clone().unwrap();
    let log = dir.join(format!("pod-logs/default_hi_{uid}/main/0.log"));
    wait_for("hi's log line", 10, || async {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("hi")
            .then_some(())
    })
    .await;

    check_kubectl_logs(&kubeconfig, &nodes).await;

    let fail = wait_for("pod fail Failed", 60, || async {
        let p = pods.get("fail").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Failed")).then_some(p)
    })
    .await;
    let t = container_status(&fail)
        .unwrap()
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    // Its sandbox is stopped, not replaced, and the status stays Failed.
    let fail_uid = fail.metadata.uid.clone().unwrap();
    wait_for("fail's sandbox stopped", 10, || {
        let mut cri = cri.clone();
        let uid = fail_uid.clone();
        async move {
            let items = cri
                .list_pod_sandbox(api::ListPodSandboxRequest {
                    filter: Some(api::PodSandboxFilter {
                        label_selector: HashMap::from([("io.kubernetes.pod.uid".into(), uid)]),
                        ..Default::default()
                    }),
                })
                .await
                .ok()?
                .into_inner()
                .items;
            (items.len() == 1 && items[0].state == api::PodSandboxState::SandboxNotready as i32)
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sandboxes_of(&mut cri, &fail_uid).await, 1);
    let again = pods.get("fail").await.unwrap();
    assert_eq!(again.status.unwrap().phase.as_deref(), Some("Failed"));

    wait_for("pod crash restarted twice", 60, || async {
        let p = pods.get("crash").await.ok()?;
        (container_status(&p)?.restart_count >= 2).then_some(())
    })
    .await;

    // Logs of exited containers: the last attempt, and the one before it.
    let (ok, out) = kubectl(&kubeconfig, &["logs", "fail"]);
    assert!(ok, "{out}");
    assert_eq!(out, "failing\n");
    let t0 = Instant::now();
    let (ok, out) = kubectl(&kubeconfig, &["logs", "-f", "fail"]);
    assert!(ok && out == "failing\n", "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "following an exited container ends"
    );
    let (ok, out) = kubectl(&kubeconfig, &["logs", "--previous", "crash"]);
    assert!(ok, "{out}");
    assert_eq!(out, "crashing\n");

    // Delete: the node stops the pod, removes its sandbox, then the object goes.
    assert_eq!(sandboxes_of(&mut cri, &uid).await, 1);
    pods.delete("hi", &DeleteParams::default()).await.unwrap();
    wait_for("pod hi gone from the API", 30, || async {
        pods.get_opt("hi").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(sandboxes_of(&mut cri, &uid).await, 0, "sandbox removed");

    // Init containers run one after the other, each to success, before the main container; on
    // delete the preStop hook runs before the container is stopped.
    let hooks = dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let work = json!([{"name": "work", "mountPath": "/work"}]);
    let staged: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "staged"},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "volumes": [{"name": "work", "emptyDir": {}},
                        {"name": "host", "hostPath": {"path": hooks.to_str().unwrap()}}],
            "initContainers": [
                {"name": "one", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": ["sh", "-c", "sleep 1; echo one >> /work/order"], "volumeMounts": work},
                {"name": "two", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                 "command": ["sh", "-c", "echo two >> /work/order"], "volumeMounts": work}
            ],
            "containers": [{
                "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "cat /work/order; echo main; trap 'exit 0' TERM; sleep 3600 & wait"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"},
                                 {"name": "host", "mountPath": "/host"}],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 1; echo ran > /host/prestop"]}}}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &staged).await.unwrap();
    // The first status the agent writes (it has conditions), while "one" still sleeps.
    let first = wait_for("staged's status from the node", 30, || async {
        let s = pods.get("staged").await.ok()?.status?;
        s.conditions.is_some().then_some(s)
    })
    .await;
    let staged = wait_for("staged Running", 60, || async {
        let p = pods.get("staged").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    if first.phase.as_deref() == Some("Pending") {
        let init = first.conditions.unwrap_or_default();
        assert!(
            init.iter()
                .any(|c| c.type_ == "Initialized" && c.status == "False"),
            "not initialized while its init containers run: {init:?}"
        );
    }
    assert_eq!(condition(&staged, "Initialized").as_deref(), Some("True"));
    let inits = staged
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .clone()
        .unwrap();
    assert_eq!(inits.len(), 2);
    for s in &inits {
        let t = s.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(t.exit_code, 0, "{}", s.name);
    }
    wait_for("the main container's log", 20, || async {
        let (ok, out) = kubectl(&kubeconfig, &["logs", "staged"]);
        (ok && out == "one\ntwo\nmain\n").then_some(())
    })
    .await;
    pods.delete("staged", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("pod staged gone from the API", 30, || async {
        pods.get_opt("staged").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(hooks.join("prestop")).unwrap_or_default(),
        "ran\n",
        "the preStop hook ran before the stop"
    );

    // A Deployment of 2 replicas.
    let deploy: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                    "name": "web", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", "3600"]
                }]}
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(kube.clone(), "default")
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    wait_for("2 Running web pods", 60, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
            })
            .count();
        (running == 2).then_some(())
    })
    .await;

    // A restarted agent adopts the sandboxes it finds, and tears down those of pods the API
    // lost while it was away.
    let web_before = sandbox_ids(&mut cri, ("app", "web")).await;
    assert_eq!(web_before.len(), 2);
    let crash_uid = pods.get("crash").await.unwrap().metadata.uid.unwrap();
    assert_eq!(sandboxes_of(&mut cri, &crash_uid).await, 1);
    drop(agent);
    pods.delete("crash", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for("pod crash gone from the API", 10, || async {
        pods.get_opt("crash").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(
        sandboxes_of(&mut cri, &crash_uid).await,
        1,
        "no agent ran meanwhile"
    );
    let _agent = start_agent(&node, &kubeconfig, 2);
    wait_for("the orphaned sandbox torn down", 30, || {
        let mut cri = cri.clone();
        let uid = crash_uid.clone();
        async move { (sandboxes_of(&mut cri, &uid).await == 0).then_some(()) }
    })
    .await;
    assert_eq!(
        sandbox_ids(&mut cri, ("app", "web")).await,
        web_before,
        "the web pods' sandboxes are adopted, not replaced"
    );
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    for p in &list.items {
        let cs = container_status(p).unwrap();
        assert_eq!(cs.restart_count, 0, "{:?}", p.metadata.name);
        assert!(cs.state.as_ref().unwrap().running.is_some());
    }
}

/// `kubectl --kubeconfig <kc> <args>`: success, and stdout (or stderr on failure).
fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl (Debian's kubernetes-client)");
    let text = if out.status.success() {
        out.stdout
    } else {
        out.stderr
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    )
}

/// `kubectl logs` of the running pod `hi` (which prints `hi`, then `tick <n>` every 0.2 s):
/// through the API server to the agent's endpoint, which refuses any other caller.
async fn check_kubectl_logs(kubeconfig: &Path, nodes: &Api<KNode>) {
    let (ok, out) = kubectl(kubeconfig, &["logs", "hi"]);
    assert!(ok, "kubectl logs: {out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hi"), "{out}");
    assert!(lines.all(|l| l.starts_with("tick ")), "{out}");

    let (ok, out) = kubectl(kubeconfig, &["logs", "--tail=2", "hi"]);
    assert!(ok, "{out}");
    let tail: Vec<&str> = out.lines().collect();
    assert_eq!(tail.len(), 2, "{out}");
    assert!(tail.iter().all(|l| l.starts_with("tick ")), "{out}");

    let (ok, out) = kubectl(
        kubeconfig,
        &["logs", "--timestamps", "--limit-bytes=100", "hi"],
    );
    assert!(ok, "{out}");
    let first = out.lines().next().unwrap_or_default();
    let (ts, msg) = first.split_once(' ').unwrap();
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z') && msg == "hi",
        "{first}"
    );
    assert!(out.len() <= 100, "{}", out.len());

    // -f streams the lines the container writes from now on.
    let mut follow = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["logs", "-f", "--tail=1", "hi"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let tick = |l: &str| l.strip_prefix("tick ").and_then(|n| n.parse::<u64>().ok());
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("kubectl logs -f keeps streaming");
        seen.push(tick(&line).unwrap_or_else(|| panic!("unexpected line {line:?}")));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive ticks: {seen:?}"
    );

    let (ok, out) = kubectl(kubeconfig, &["logs", "hi", "-c", "nope"]);
    assert!(
        !ok && out.contains("container nope is not valid for pod hi"),
        "{out}"
    );

    // The endpoint itself takes only the node's credential: neither none nor the admin token.
    let n = nodes.get(NODE).await.unwrap();
    let port = n
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    assert!(port > 0);
    let kc = std::fs::read_to_string(kubeconfig).unwrap();
    let admin = kc
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .to_string();
    for auth in [None, Some(admin)] {
        let mut curl = Command::new("curl");
        curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
        if let Some(t) = auth {
            curl.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = curl
            .arg(format!(
                "https://127.0.0.1:{port}/containerLogs/default/hi/main"
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    }
}

/// `kubectl` inside network namespace `netns` (where `keel server` serves).
/// `keel server` without --no-node is a single-node cluster by itself: its node (CRI endpoint,
/// agent, proxy in the same process) turns Ready, runs a pod and serves its log, probes gate
/// readiness and restart a container that fails liveness; SIGTERM stops it cleanly. Everything runs inside the test's network namespace; the proxy's socket hooks
/// attach to the test's cgroup, its pins live under a bpffs dir of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_is_a_single_node_cluster() {
    if !privileged("server_is_a_single_node_cluster") {
        return;
    }
    let node = NodeRes::new();
    let dir = node.root().to_owned();
    let netns = node.netns.as_ref().unwrap().path().to_owned();
    let v2 = node
        .cgroup
        .as_ref()
        .unwrap()
        .v2_path()
        .expect("a cgroup v2 hierarchy")
        .to_owned();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/keel-test-{}", std::process::id()));
    struct Pins(PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = Command::new(keel_bin())
                .args(["proxy", "uninstall", "--bpffs-dir"])
                .arg(&self.0)
                .output();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _pins = Pins(bpffs.clone());
    let log = dir.join("server-node.log");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(keel_bin())
        .arg("--root")
        .arg(&dir)
        .args(["--log", "info", "server", "--data-dir"])
        .arg(dir.join("server"))
        .args([
            "--api-listen",
            "127.0.0.1:6443",
            "--node-name",
            "keel-test-server",
        ])
        .arg("--cri-socket")
        .arg(node.socket())
        .arg("--cni-dir")
        .arg(dir.join("server-cni"))
        // Node IPAM gives the node its range: the whole (one-range) cluster CIDR here.
        .args([
            "--cluster-cidr",
            "10.250.9.0/24",
            "--node-cidr-mask-size",
            "24",
        ])
        .args(["--bridge", "kbr9"])
        .arg("--run-dir")
        .arg(node.run_dir())
        .arg("--pod-log-dir")
        .arg(dir.join("pod-logs"))
        .arg("--cgroup-parent")
        .arg(node.cgroup.as_ref().unwrap().name())
        .args(["--agent-listen", "127.0.0.1:0"])
        .arg("--proxy-cgroup")
        .arg(&v2)
        .arg("--bpffs-dir")
        .arg(&bpffs)
        .args(["--proxy-healthz-address", "127.0.0.1:0"])
        .env_remove("KEEL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn keel server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut server = Proc {
        name: "keel server (with its node)",
        child,
        log,
    };
    let kubeconfig = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("keel server printed its kubeconfig path");
        if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
            break PathBuf::from(p);
        }
    };
    let kc = |args: &[&str]| kubectl_in(&netns, &kubeconfig, args, None);
    wait_for("the server's own node Ready", 60, || async {
        let (ok, out) = kc(&[
            "get",
            "node",
            "keel-test-server",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        (ok && out == "True").then_some(())
    })
    .await;

    let (_, range) = kc(&[
        "get",
        "node",
        "keel-test-server",
        "-o",
        "jsonpath={.spec.podCIDR}",
    ]);
    assert_eq!(range, "10.250.9.0/24", "the node's range from node IPAM");

    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello", "namespace": "default", "labels": {"app": "hello"}},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "settings", "configMap": {"name": "settings"}},
                             {"name": "scratch", "emptyDir": {}}],
                 "containers": [{
            "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", "echo hello from the server node; echo $(POD) $NODE $MODE $MISSING.; cat /etc/settings/mode; echo kept > /scratch/f; cat /scratch/f; sleep 3600"],
            "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings", "readOnly": true},
                             {"name": "scratch", "mountPath": "/scratch"}],
            "env": [
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": true}}}
            ]
        }]}
    });
    let settings = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "default"}, "data": {"mode": "fast"}});
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&settings.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&manifest.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    wait_for("pod hello Running on the server's node", 60, || async {
        let (ok, out) = kc(&[
            "get",
            "pod",
            "hello",
            "-o",
            "jsonpath={.spec.nodeName} {.status.phase} {.status.podIP}",
        ]);
        (ok && out.starts_with("keel-test-server Running 10.250.9.")).then_some(())
    })
    .await;
    let last = std::sync::Mutex::new(String::new());
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        wait_for("kubectl logs hello", 30, || async {
            let (ok, out) = kc(&["logs", "hello"]);
            *last.lock().unwrap() = out.clone();
            (ok && out.lines().count() >= 3).then_some(out)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("kubectl logs hello: {}", last.lock().unwrap()));
    // The environment: fieldRefs, a ConfigMap key, an optional missing Secret, $(VAR) in args;
    // the volumes: a ConfigMap mounted read-only (its value has no newline), an emptyDir.
    assert_eq!(
        out,
        "hello from the server node\nhello keel-test-server fast .\nfastkept\n"
    );

    // A container whose ConfigMap does not exist yet waits with CreateContainerConfigError
    // naming it, and starts once the ConfigMap is there.
    let waiting = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waits", "namespace": "default"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "3600"],
            "envFrom": [{"configMapRef": {"name": "later"}}]
        }]}
    });
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&waiting.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    let waiting_state = "jsonpath={.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}";
    wait_for("CreateContainerConfigError", 30, || async {
        let (_, out) = kc(&["get", "pod", "waits", "-o", waiting_state]);
        (out.starts_with("CreateContainerConfigError: ")
            && out.contains("configmap \"later\" not found"))
        .then_some(())
    })
    .await;
    let later = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "later", "namespace": "default"}, "data": {"X": "1"}});
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&later.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    wait_for("waits Running once its ConfigMap exists", 30, || async {
        let (_, out) = kc(&["get", "pod", "waits", "-o", "jsonpath={.status.phase}"]);
        (out == "Running").then_some(())
    })
    .await;

    // Probes: readiness over HTTP gates Ready; a failing liveness exec probe restarts.
    let probed = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probed", "namespace": "default"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "web", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
             "command": ["sh", "-c", "sleep 4; mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www"],
             "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1}},
            {"name": "live", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
             "command": ["sh", "-c", "touch /tmp/alive; sleep 3; rm /tmp/alive; sleep 3600"],
             "livenessProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]},
                               "periodSeconds": 1, "failureThreshold": 2}}
        ]}
    });
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&probed.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    let ready_of = |name: &'static str| {
        let netns = netns.clone();
        let kubeconfig = kubeconfig.clone();
        move || {
            let (_, out) = kubectl_in(
                &netns,
                &kubeconfig,
                &[
                    "get",
                    "pod",
                    "probed",
                    "-o",
                    &format!(
                        "jsonpath={{.status.containerStatuses[?(@.name==\"{name}\")].ready}} {{.status.containerStatuses[?(@.name==\"{name}\")].state.running.startedAt}} {{.status.containerStatuses[?(@.name==\"{name}\")].restartCount}}"
                    ),
                ],
                None,
            );
            out
        }
    };
    let web = ready_of("web");
    let first = wait_for("web running", 30, || async {
        let out = web();
        let f: Vec<&str> = out.split_whitespace().collect();
        (f.len() == 3).then_some(out)
    })
    .await;
    assert!(
        first.starts_with("false "),
        "not ready before its probe succeeds: {first}"
    );
    wait_for("web ready once httpd answers", 30, || async {
        web().starts_with("true ").then_some(())
    })
    .await;
    let live = ready_of("live");
    wait_for("live restarted by its liveness probe", 40, || async {
        let out = live();
        let restarts: u32 = out.split_whitespace().last()?.parse().ok()?;
        (restarts >= 1).then_some(())
    })
    .await;

    // The proxy serves a Service of the pod from its maps: ClusterIP -> pod IP.
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}
    });
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&svc.to_string()),
    );
    assert!(ok, "kubectl apply: {out}");
    let (_, cluster_ip) = kc(&["get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}"]);
    let (_, pod_ip) = kc(&["get", "pod", "hello", "-o", "jsonpath={.status.podIP}"]);
    assert!(
        cluster_ip.parse::<std::net::Ipv4Addr>().is_ok() && pod_ip.starts_with("10.250.9."),
        "{cluster_ip} {pod_ip}"
    );
    wait_for("the Service in the proxy's maps", 30, || async {
        let ls = Command::new(keel_bin())
            .args(["proxy", "ls", "--bpffs-dir"])
            .arg(&bpffs)
            .output()
            .ok()?;
        let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
        (ls.contains(&format!("{cluster_ip}:80")) && ls.contains(&format!("-> {pod_ip}:8080")))
            .then_some(())
    })
    .await;

    // Deleting the pod removes its volumes from the node.
    let (_, uid) = kc(&["get", "pod", "hello", "-o", "jsonpath={.metadata.uid}"]);
    let volumes = dir.join("agent/pods").join(uid.trim());
    assert!(volumes.join("volumes/configmap/settings/mode").is_file());
    let (ok, out) = kc(&["delete", "pod", "hello", "--wait=true"]);
    assert!(ok, "{out}");
    wait_for("the pod's volumes removed", 20, || async {
        (!volumes.exists()).then_some(())
    })
    .await;

    // host-gw: another Node (its range and InternalIP; its "machine" a namespace behind a veth)
    // gets a route through it, tagged as the agent's, and the route goes with the Node.
    let peer_ns = NetnsGuard::new().unwrap();
    let server_ns = node.netns.as_ref().unwrap();
    let _veth =
        keel_testkit::netns::VethPair::between(server_ns, "kpeer0", &peer_ns, "kpeer1").unwrap();
    for (ns, link, addr) in [
        (server_ns, "kpeer0", "10.251.0.1/24"),
        (&peer_ns, "kpeer1", "10.251.0.2/24"),
    ] {
        ns.exec("ip", &["addr", "add", addr, "dev", link]).unwrap();
        ns.exec("ip", &["link", "set", link, "up"]).unwrap();
    }
    let peer = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "keel-test-peer"}, "spec": {"podCIDR": "10.251.5.0/24"}});
    let (ok, out) = kubectl_in(
        &netns,
        &kubeconfig,
        &["create", "-f", "-"],
        Some(&peer.to_string()),
    );
    assert!(ok, "kubectl create node: {out}");
    let (ok, out) = kc(&[
        "patch",
        "node",
        "keel-test-peer",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"addresses":[{"type":"InternalIP","address":"10.251.0.2"}]}}"#,
    ]);
    assert!(ok, "kubectl patch node status: {out}");
    let agent_routes = || {
        server_ns
            .exec("ip", &["-4", "route", "show", "proto", "0x6b"])
            .unwrap_or_default()
    };
    wait_for("the route to the peer's pods", 30, || async {
        agent_routes()
            .contains("10.251.5.0/24 via 10.251.0.2 dev kpeer0")
            .then_some(())
    })
    .await;
    let (ok, out) = kc(&["delete", "node", "keel-test-peer"]);
    assert!(ok, "{out}");
    wait_for("the peer's route removed with its Node", 30, || async {
        (!agent_routes().contains("10.251.5.0/24")).then_some(())
    })
    .await;

    // SIGTERM: the server stops cleanly and takes its CRI socket with it; the pod stays.
    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "keel server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    assert!(!node.socket().exists(), "the CRI socket is removed");
    let pods = node.keel_ok(&["pod", "ls", "-q"]);
    assert_eq!(
        pods.split_whitespace().count(),
        2,
        "the pods keep running: {pods}"
    );
}
