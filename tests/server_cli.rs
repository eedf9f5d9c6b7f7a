//! End-to-end tests of `keel server --no-node`: the built binary writes its kubeconfig, serves
//! kubectl, keeps its credentials across restarts, and after a SIGKILL in the middle of a stream
//! of writes every acknowledged write is there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};

/// A `keel server` process, SIGKILLed on drop.
struct Server {
    child: Child,
    kubeconfig: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, port: u16) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["server", "--no-node", "--data-dir"])
        .arg(dir)
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .env_remove("KEEL_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn keel server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut server = Server {
        child,
        kubeconfig: PathBuf::new(),
    };
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("keel server printed its kubeconfig path");
        if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
            server.kubeconfig = PathBuf::from(p);
            break;
        }
    }
    assert_eq!(server.kubeconfig, dir.join("kubeconfig"));
    assert!(
        server.kubeconfig.exists(),
        "kubeconfig written before serving"
    );
    server
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let cache = kubeconfig.parent().unwrap().join("kubectl-cache");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kubectl (Debian's kubernetes-client)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn client(kubeconfig: &Path) -> kube::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The node roles' flags are checked before anything starts: a bad pod CIDR is refused by name
/// and nothing is written to the data dir.
#[test]
fn server_refuses_a_bad_node_flag_before_starting() {
    for (flags, named) in [
        (&["--pod-cidr", "10.42.0.0"][..], "--pod-cidr"),
        (&["--cluster-cidr", "10.42.0.0/33"][..], "--cluster-cidr"),
        (
            &[
                "--cluster-cidr",
                "10.42.0.0/16",
                "--node-cidr-mask-size",
                "12",
            ][..],
            "--node-cidr-mask-size",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["server", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--api-listen", "127.0.0.1:0"])
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{flags:?}: {err}");
        assert!(!dir.path().join("data").exists(), "{flags:?}");
    }
}

/// Acknowledged creates before each SIGKILL.
const ACKS_BEFORE_KILL: usize = 100;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::Builder::new()
        .prefix("keel-server-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let mut server = start(dir.path(), port);
    let ns = kubectl(&server.kubeconfig, &["get", "ns", "-o", "name"]);
    assert!(ns.contains("namespace/default"), "{ns}");
    let ca = std::fs::read(dir.path().join("pki/ca.crt")).unwrap();

    let mut acked: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let cms: Api<ConfigMap> = Api::namespaced(client(&server.kubeconfig).await, "default");
        let done = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let done = done.clone();
            tokio::spawn(async move {
                for i in 0..100_000 {
                    let name = format!("r{round}-{i:06}");
                    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name}, "data": {"payload": "x".repeat(256)}
                    }))
                    .unwrap();
                    match cms.create(&PostParams::default(), &cm).await {
                        Ok(_) => done.lock().unwrap().push(name),
                        Err(_) => return,
                    }
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while done.lock().unwrap().len() < ACKS_BEFORE_KILL {
            assert!(std::time::Instant::now() < deadline, "writes too slow");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // SIGKILL while the writer is still sending.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("writer stops")
            .unwrap();
        acked.extend(done.lock().unwrap().iter().cloned());

        server = start(dir.path(), port);
        assert_eq!(
            std::fs::read(dir.path().join("pki/ca.crt")).unwrap(),
            ca,
            "CA reused"
        );
        let cms: Api<ConfigMap> = Api::namespaced(client(&server.kubeconfig).await, "default");
        let present: std::collections::HashSet<String> = cms
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        let missing: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged writes lost: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    let count = kubectl(&server.kubeconfig, &["get", "cm", "-o", "name"])
        .lines()
        .count();
    assert!(count >= acked.len());
}

#[test]
fn the_server_schedules_pods_onto_ready_nodes() {
    let dir = tempfile::Builder::new()
        .prefix("keel-server-")
        .tempdir()
        .unwrap();
    let server = start(dir.path(), free_port());
    let manifest = dir.path().join("objects.yaml");
    std::fs::write(
        &manifest,
        r#"apiVersion: v1
kind: Node
metadata: {name: worker-1}
status:
  allocatable: {cpu: "2", memory: 4Gi, pods: "110"}
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: fits, namespace: default}
spec: {containers: [{name: c, image: busybox, resources: {requests: {cpu: 500m}}}]}
---
apiVersion: v1
kind: Pod
metadata: {name: too-big, namespace: default}
spec: {containers: [{name: c, image: busybox, resources: {requests: {cpu: "4"}}}]}
"#,
    )
    .unwrap();
    kubectl(
        &server.kubeconfig,
        &["create", "-f", manifest.to_str().unwrap()],
    );
    let node_of = |pod: &str| {
        kubectl(
            &server.kubeconfig,
            &["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while node_of("fits") != "worker-1" {
        assert!(std::time::Instant::now() < deadline, "pod not scheduled");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = kubectl(
            &server.kubeconfig,
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=too-big",
                "-o",
                "jsonpath={.items[*].message}",
            ],
        );
        if events.contains("Insufficient cpu") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no FailedScheduling event: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node_of("too-big"), "");
}
