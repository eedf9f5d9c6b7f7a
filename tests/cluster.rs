//! End-to-end test of a three-node keel cluster on one machine: `keel server` (with its own
//! node) and two `keel agent --server URL --token-file F` joins, each node in its own network
//! namespace, cgroup and state root, the namespaces joined by a bridge (the underlay) in one
//! more namespace, and an "outside" namespace on the same bridge. Through kubectl: a Deployment
//! of busybox httpd with a readiness probe spreads over the nodes; a pod on one node reaches the
//! ClusterIP and is served by pods on every node; the NodePort answers from outside, and so does
//! a pod's hostPort (no portmap plugin: the proxy serves it); `kubectl
//! logs` works; scale 5 and 1; a rolling update to another tag while a client requests every
//! 100 ms sees no failure; a stopped agent's pods are replaced on the other nodes after the
//! (shortened) grace period; `kill -9` of the server and a restart keep the state and leave the
//! running pods alone. Privileged (root).
//!
//! Needs `target/debug/keel-cni` (`cargo build -p keel-cni`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{NetnsGuard, VethPair, privileged};
use serde_json::json;

mod common;

use common::{IMAGE, NodeRes, Proc, keel_bin, kubectl_in, wait_for};

/// The rolled-out tag: the same image under another name.
const IMAGE2: &str = "example.com/keel/busybox:v2";
const SERVER_IP: &str = "10.252.0.1";
const OUTSIDE_IP: &str = "10.252.0.100";

/// One node of the cluster: its resources, its underlay address, its proxy pins.
struct ClusterNode {
    name: String,
    ip: String,
    res: NodeRes,
    bpffs: PathBuf,
}

impl ClusterNode {
    fn netns(&self) -> &NetnsGuard {
        self.res.netns.as_ref().unwrap()
    }
    fn root(&self) -> PathBuf {
        self.res.root().to_owned()
    }

    /// `keel <role...>` in the node's namespace, its v2 cgroup (where its proxy's socket hooks
    /// attach, so that its pods are load balanced), with the node's dirs.
    fn spawn(&self, label: &'static str, role: &[&str], log_name: &str) -> Proc {
        let root = self.root();
        let log = root.join(log_name);
        let cg = self.res.cgroup.as_ref().unwrap();
        let v2_procs = cg.v2_path().expect("a cgroup v2 tree").join("cgroup.procs");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns().path().display()))
            .arg("--")
            .arg(keel_bin())
            .arg("--root")
            .arg(&root)
            .args(["--log", "info"])
            .args(role)
            .args(["--node-name", &self.name, "--node-ip", &self.ip])
            .arg("--cri-socket")
            .arg(self.res.socket())
            .arg("--cni-dir")
            .arg(root.join("node-cni"))
            .args(["--bridge", "kbr1"])
            .arg("--run-dir")
            .arg(self.res.run_dir())
            .arg("--pod-log-dir")
            .arg(root.join("pod-logs"))
            .args(["--cgroup-parent", cg.name()])
            .arg("--proxy-cgroup")
            .arg(cg.v2_path().unwrap())
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .args(["--heartbeat-interval", "1"])
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: only a write(2) to a path prepared before the fork.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&v2_procs, "0"));
        }
        Proc {
            name: label,
            child: cmd.spawn().expect("spawn keel"),
            log,
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        let _ = Command::new(keel_bin())
            .args(["proxy", "uninstall", "--bpffs-dir"])
            .arg(&self.bpffs)
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// Lines of a child's stdout, as they come.
fn stdout_lines(proc: &mut Proc) -> std::sync::mpsc::Receiver<String> {
    let stdout = proc.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn start_server(node: &ClusterNode) -> (Proc, PathBuf) {
    let data = node.root().join("server");
    let data = data.to_str().unwrap();
    let mut proc = node.spawn(
        "keel server",
        &[
            "server",
            "--data-dir",
            data,
            "--api-listen",
            "0.0.0.0:6443",
            "--cluster-cidr",
            "10.249.0.0/16",
            "--node-grace-period",
            "4",
            "--pod-eviction-timeout",
            "1",
        ],
        "server.log",
    );
    let rx = stdout_lines(&mut proc);
    let mut kubeconfig = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("keel server printed its banner");
        if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
            kubeconfig = Some(PathBuf::from(p));
        }
        if let Some(join) = line.strip_prefix("keel server: join other machines with: ") {
            let want = format!(
                "keel agent --server https://{SERVER_IP}:6443 --token-file {data}/node-token"
            );
            assert!(join.starts_with(&want), "{join}");
            return (
                proc,
                kubeconfig.expect("kubeconfig line before the join line"),
            );
        }
    }
}

fn start_agent(node: &ClusterNode, token_file: &Path) -> Proc {
    let data = node.root().join("agent");
    node.spawn(
        "keel agent",
        &[
            "agent",
            "--server",
            &format!("https://{SERVER_IP}:6443"),
            "--token-file",
            token_file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--restart-backoff",
            "0.5",
        ],
        "agent.log",
    )
}

/// `wget` from the host's busybox inside `ns`: the body, or None. (busybox 1.35's `wget -T`
/// crashes: timeout(1) bounds it instead.)
fn wget_in(ns: &NetnsGuard, url: &str) -> Option<String> {
    let out = ns
        .command("timeout")
        .args(["3", "busybox", "wget", "-q", "-O", "-", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_run_a_deployment_behind_services() {
    if !privileged("three_nodes_run_a_deployment_behind_services") {
        return;
    }
    let tag = std::process::id() % 100_000;
    let mut nodes = Vec::new();
    for (i, name) in ["server", "agent-a", "agent-b"].into_iter().enumerate() {
        let res = NodeRes::new();
        let tar = res.root().join("busybox-v2.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE2)
            .unwrap();
        res.keel_ok(&["image", "import", tar.to_str().unwrap()]);
        nodes.push(ClusterNode {
            name: format!("keel-e2e-{name}"),
            ip: format!("10.252.0.{}", i + 1),
            res,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/keel-e2e-{tag}-{i}")),
        });
    }
    // The underlay: a bridge in a namespace of its own, each node's eth0 on it, and an
    // "outside" namespace for a client that is on no node.
    let underlay = NetnsGuard::new().unwrap();
    underlay
        .exec("ip", &["link", "add", "ubr", "type", "bridge"])
        .unwrap();
    underlay.exec("ip", &["link", "set", "ubr", "up"]).unwrap();
    let outside = NetnsGuard::new().unwrap();
    let mut links = Vec::new();
    let mut hosts: Vec<(&NetnsGuard, String)> = nodes
        .iter()
        .map(|n| (n.netns(), format!("{}/24", n.ip)))
        .collect();
    hosts.push((&outside, format!("{OUTSIDE_IP}/24")));
    for (i, (ns, addr)) in hosts.iter().enumerate() {
        let port = format!("u{i}");
        links.push(VethPair::between(ns, "eth0", &underlay, &port).unwrap());
        underlay
            .exec("ip", &["link", "set", &port, "master", "ubr", "up"])
            .unwrap();
        ns.exec("ip", &["addr", "add", addr, "dev", "eth0"])
            .unwrap();
        ns.exec("ip", &["link", "set", "eth0", "up"]).unwrap();
        ns.exec("ip", &["link", "set", "lo", "up"]).unwrap();
    }

    let (mut server, kubeconfig) = start_server(&nodes[0]);
    let token_file = nodes[0].root().join("server/node-token");
    let mut agent_a = start_agent(&nodes[1], &token_file);
    let mut agent_b = start_agent(&nodes[2], &token_file);
    let server_ns = nodes[0].netns().path();
    let kc = |args: &[&str]| kubectl_in(&server_ns, &kubeconfig, args, None);
    let apply = |doc: serde_json::Value| {
        let (ok, out) = kubectl_in(
            &server_ns,
            &kubeconfig,
            &["apply", "-f", "-"],
            Some(&doc.to_string()),
        );
        assert!(ok, "kubectl apply: {out}");
    };

    // Three nodes Ready, each with a range of the cluster CIDR of its own.
    let ranges = wait_for("three nodes Ready", 90, || async {
        let (ok, out) = kc(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ]);
        let ready: Vec<String> = out
            .lines()
            .filter(|l| l.ends_with(" True"))
            .map(str::to_owned)
            .collect();
        (ok && ready.len() == 3).then_some(ready)
    })
    .await;
    let cidrs: BTreeSet<&str> = ranges
        .iter()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|c| c.starts_with("10.249."))
        .collect();
    assert_eq!(cidrs.len(), 3, "a range per node: {ranges:?}");

    let web = |image: &str| {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{
                            "name": "httpd", "image": image, "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", "mkdir -p /www; echo \"$NODE $POD\" > /www/index.html; echo serving on $NODE; exec httpd -f -p 8080 -h /www"],
                            "env": [
                                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                            ],
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"port": 8080, "path": "/"},
                                               "periodSeconds": 1},
                            // Serve on while the endpoint's removal reaches every proxy.
                            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "2"]}}}
                        }]
                    }
                }
            }
        })
    };
    apply(web(IMAGE));
    apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }));
    apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-np", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": 8080}]}
    }));
    let ready_pods = || {
        let (_, out) = kc(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.spec.containers[0].image} {.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ]);
        // name, node, image of the pods that are Ready and not being deleted.
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 4 && f[3] == "True")
                    .then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned()))
            })
            .collect::<Vec<_>>()
    };
    let spread = wait_for("3 web pods Ready", 90, || async {
        let pods = ready_pods();
        (pods.len() == 3).then_some(pods)
    })
    .await;
    let on: BTreeSet<&str> = spread.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(on.len(), 3, "one replica per node: {spread:?}");

    // A client pod on agent-a requests the ClusterIP every 100 ms and logs who answered.
    let (_, cluster_ip) = kc(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {
            "nodeName": nodes[1].name,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", format!("while true; do timeout 2 wget -q -O - http://{cluster_ip}/ 2>/dev/null || echo FAIL; sleep 0.1; done")]
            }]
        }
    }));
    let client_log = || {
        let (ok, out) = kc(&["logs", "client"]);
        if ok { out } else { String::new() }
    };
    wait_for("ClusterIP answers from pods on every node", 60, || async {
        let log = client_log();
        let served: BTreeSet<&str> = log
            .lines()
            .filter_map(|l| l.split(' ').next())
            .filter(|n| n.starts_with("keel-e2e-"))
            .collect();
        (served.len() == 3).then_some(())
    })
    .await;

    // The NodePort from the outside namespace, through each node, to backends anywhere
    // (externalTrafficPolicy=Cluster: masqueraded to backends on other nodes).
    let (_, node_port) = kc(&[
        "get",
        "svc",
        "web-np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let mut served = BTreeSet::new();
    for n in &nodes {
        let url = format!("http://{}:{node_port}/", n.ip);
        for _ in 0..6 {
            let body = wget_in(&outside, &url)
                .unwrap_or_else(|| panic!("NodePort {url} from outside did not answer"));
            served.insert(body.split(' ').next().unwrap_or_default().to_owned());
        }
    }
    assert!(served.len() >= 2, "NodePort backends: {served:?}");
    eprintln!("NodePort from outside: 18 requests over 3 nodes, served by {served:?}");

    // A hostPort from outside: with the proxy on, no portmap plugin is chained; the proxy's
    // maps (its tc program on the node's interface) take the request to the pod.
    for n in &nodes {
        let conflist = n.root().join("node-cni/net.d/10-keel.conflist");
        let text = std::fs::read_to_string(&conflist)
            .unwrap_or_else(|e| panic!("{}: {e}", conflist.display()));
        assert!(!text.contains("portmap"), "{}: {text}", conflist.display());
    }
    apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hostport", "namespace": "default"},
        "spec": {
            "nodeName": nodes[2].name,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "httpd", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "mkdir -p /www; echo hostport-pod > /www/index.html; exec httpd -f -p 8080 -h /www"],
                "ports": [{"containerPort": 8080, "hostPort": 18080}]
            }]
        }
    }));
    let url = format!("http://{}:18080/", nodes[2].ip);
    wait_for("the hostPort answers from outside", 60, || async {
        wget_in(&outside, &url).filter(|b| b.contains("hostport-pod"))
    })
    .await;
    let (ok, out) = kc(&["delete", "pod", "hostport", "--wait=false"]);
    assert!(ok, "{out}");

    // kubectl logs of a pod on each agent goes through the server to that node.
    for (pod, node, _) in &spread {
        let (ok, out) = kc(&["logs", pod]);
        assert!(
            ok && out.contains(&format!("serving on {node}")),
            "kubectl logs {pod}: {out}"
        );
    }

    // Scale to 5 and back to 1.
    for n in [5usize, 1] {
        let (ok, out) = kc(&["scale", "deployment", "web", &format!("--replicas={n}")]);
        assert!(ok, "{out}");
        wait_for(&format!("{n} web pods"), 90, || async {
            let (_, all) = kc(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ]);
            (ready_pods().len() == n && all.split_whitespace().count() == n).then_some(())
        })
        .await;
    }
    let (ok, out) = kc(&["scale", "deployment", "web", "--replicas=3"]);
    assert!(ok, "{out}");
    wait_for("3 web pods again", 90, || async {
        (ready_pods().len() == 3).then_some(())
    })
    .await;

    // A rolling update to another tag while the client requests every 100 ms: no failure.
    let before = client_log().lines().count();
    let rollout = Instant::now();
    apply(web(IMAGE2));
    let (ok, out) = kc(&["rollout", "status", "deployment/web", "--timeout=180s"]);
    assert!(ok, "kubectl rollout status: {out}");
    wait_for("3 pods of the new tag Ready", 60, || async {
        let pods = ready_pods();
        (pods.len() == 3 && pods.iter().all(|p| p.2 == IMAGE2)).then_some(())
    })
    .await;
    // The old pods' preStop hooks and stops are part of the window too: until they are gone.
    wait_for("the old pods gone", 60, || async {
        let (_, all) = kc(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        (all.split_whitespace().count() == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = rollout.elapsed().as_secs_f64();
    let log = client_log();
    let during: Vec<&str> = log.lines().skip(before).collect();
    // A request every 100 ms plus its own time: at least 3 a second over the whole window.
    assert!(
        during.len() as f64 >= 3.0 * window,
        "the client kept requesting during the rollout: {} requests in {window:.1} s",
        during.len()
    );
    let failures = during.iter().filter(|l| l.starts_with("FAIL")).count();
    eprintln!(
        "rolling update: {} requests through the ClusterIP in {window:.1} s, {failures} failed",
        during.len()
    );
    assert_eq!(
        failures,
        0,
        "requests failed during the rolling update ({} requests)",
        during.len()
    );

    // agent-b stops: its node turns unreachable and its pods are replaced on the others.
    let _ = agent_b.child.kill();
    let _ = agent_b.child.wait();
    let gone = &nodes[2].name;
    wait_for("agent-b's web pod replaced elsewhere", 90, || async {
        let pods = ready_pods();
        (pods.len() == 3 && pods.iter().all(|p| &p.1 != gone)).then_some(())
    })
    .await;
    let (_, ready) = kc(&[
        "get",
        "node",
        gone,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "Unknown", "the stopped node is unreachable");

    // kill -9 of the server, then a restart: the objects are there, the running pods were
    // not touched (same sandboxes on every node, no restarts).
    let sandboxes = |n: &ClusterNode| {
        let mut ids: Vec<String> = n
            .res
            .keel_ok(&["pod", "ls", "-q"])
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids
    };
    let (_, uids_before) = kc(&["get", "pods", "-o", "jsonpath={.items[*].metadata.uid}"]);
    let sandboxes_before: Vec<Vec<String>> = nodes[..2].iter().map(sandboxes).collect();
    let _ = server.child.kill();
    let _ = server.child.wait();
    drop(server);
    let (server2, _) = start_server(&nodes[0]);
    wait_for("the server's node Ready again", 60, || async {
        let (ok, out) = kc(&[
            "get",
            "node",
            &nodes[0].name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        (ok && out == "True").then_some(())
    })
    .await;
    let (ok, uids_after) = kc(&["get", "pods", "-o", "jsonpath={.items[*].metadata.uid}"]);
    assert!(ok, "{uids_after}");
    assert_eq!(uids_before, uids_after, "the same pods after the restart");
    let (_, restarts) = kc(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
    ]);
    assert!(
        restarts.split_whitespace().all(|r| r == "0"),
        "no container restarted: {restarts}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sandboxes_after: Vec<Vec<String>> = nodes[..2].iter().map(sandboxes).collect();
    assert_eq!(
        sandboxes_before, sandboxes_after,
        "the running sandboxes stay as they were"
    );
    assert_eq!(ready_pods().len(), 3, "the web pods are still Ready");
    let _ = agent_a.child.kill();
    drop((server2, agent_a, agent_b, links, underlay, outside));
}
