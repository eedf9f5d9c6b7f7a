//! `cargo xtask bench cluster`: a single-node `keel server` (API, store, scheduler, controllers,
//! and this node's CRI endpoint, CNI, agent and proxy in one process), started in a network
//! namespace made here with its own state root, cgroup parent and BPF pin dir.
//!
//! Measured:
//! - **Deployment to Ready**: `kubectl apply` of a 10-replica Deployment (the busybox test image,
//!   imported before the server starts, so present) until all 10 pods report Ready=True, seen
//!   through a watch. Three rounds; between rounds the Deployment is deleted and the node drained.
//! - **Anchor**: the same node's own CRI endpoint driven directly (what the agent does for each
//!   pod: RunPodSandbox + CreateContainer + StartContainer), 10 pods all in flight at once, three
//!   rounds: what the runtime alone needs, without the API, scheduler, controllers and agent.
//!   The ratio says what the control plane adds.
//! - **Idle RSS** of the server process (control plane and node roles together; VmRSS), after
//!   the node is Ready and again after the rounds once the node is idle, beside the target
//!   (≤ 100 MiB for the server); then of a `keel agent --server URL --token-file F` joined as a
//!   second node in the same namespace (its own CRI endpoint, keel-cni with a fixed
//!   `--pod-cidr`, proxy), idle once Ready.
//!
//! Everything is removed afterwards, also on error: the Deployment, the anchor's pods, the
//! server (SIGTERM), then leftovers with `keel pod rm -f`, the cgroups, pins, the namespace.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use keel_cri::api;
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

use crate::cri::{self, IMAGE, PodSpec};

const REPLICAS: usize = 10;
const ROUNDS: usize = 3;
const LABEL: &str = "keel-bench-cluster";
const TARGET_READY: Duration = Duration::from_secs(3);
const TARGET_RSS_MIB: f64 = 100.0;

/// Entry point for `cargo xtask bench cluster`.
pub fn run() -> anyhow::Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "bench cluster needs root (namespaces, mounts, cgroups, BPF)"
    );
    ensure!(
        Path::new("/usr/bin/kubectl").exists(),
        "kubectl missing: apt-get install kubernetes-client"
    );
    let keel = cri::build()?.keel;
    let mut server = Server::new(&keel)?;
    let outcome = server.start().and_then(|()| server.bench());
    if outcome.is_err() {
        eprintln!("--- keel server log (tail) ---\n{}", server.log_tail(40));
    }
    drop(server);
    outcome
}

/// The server with its namespace, cgroup parent, pin dir and state root. Drop stops it and
/// removes whatever is left.
struct Server {
    keel: PathBuf,
    child: Option<Child>,
    /// The joined `keel agent`, while its RSS is measured.
    agent: std::sync::Mutex<Option<Child>>,
    kubeconfig: PathBuf,
    bpffs: PathBuf,
    cgroup: Option<CgroupGuard>,
    netns: Option<NetnsGuard>,
    state: Option<StateRoot>,
}

impl Server {
    fn new(keel: &Path) -> anyhow::Result<Server> {
        Ok(Server {
            keel: keel.to_owned(),
            child: None,
            agent: std::sync::Mutex::new(None),
            kubeconfig: PathBuf::new(),
            bpffs: PathBuf::from(format!(
                "/sys/fs/bpf/keel-bench-cluster-{}",
                std::process::id()
            )),
            cgroup: Some(CgroupGuard::new()?),
            netns: Some(NetnsGuard::new()?),
            state: Some(StateRoot::new()?),
        })
    }

    fn root(&self) -> &Path {
        self.state
            .as_ref()
            .map(StateRoot::path)
            .unwrap_or(Path::new("/nonexistent"))
    }
    fn netns(&self) -> PathBuf {
        self.netns
            .as_ref()
            .map(NetnsGuard::path)
            .unwrap_or_default()
    }
    fn cgroup_name(&self) -> String {
        self.cgroup
            .as_ref()
            .map(|c| c.name().to_owned())
            .unwrap_or_default()
    }
    fn log(&self) -> PathBuf {
        self.root().join("server.log")
    }
    fn cri_socket(&self) -> PathBuf {
        self.root().join("keel.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.root().join("run/containers")
    }
    fn log_tail(&self, n: usize) -> String {
        cri::log_tail(&self.log(), n)
    }

    /// `keel ARGS` against this node's root, without the server.
    fn keel_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        cri::keel_offline(&self.keel, self.root(), &self.run_dir(), args)
    }

    /// Imports the image, starts `keel server` in the namespace and waits for its kubeconfig.
    fn start(&mut self) -> anyhow::Result<()> {
        let archive = self.root().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Docker)?.write_docker_archive(&archive, IMAGE)?;
        self.keel_cli(&["image", "import", &archive.to_string_lossy()])?;
        let v2 = self
            .cgroup
            .as_ref()
            .and_then(CgroupGuard::v2_path)
            .context("no cgroup v2 hierarchy (the proxy's socket hooks need one)")?
            .to_owned();
        let root = self.root().to_owned();
        // nsenter, not `ip netns exec`: only the network namespace changes (`ip netns exec`
        // also remounts /sys, hiding the cgroup mounts and the pins).
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns().display()))
            .arg("--")
            .arg(&self.keel)
            .arg("--root")
            .arg(&root)
            .args(["--log", "info", "server", "--data-dir"])
            .arg(root.join("server"))
            .args(["--api-listen", "127.0.0.1:6443"])
            .args(["--node-name", "keel-bench"])
            .arg("--cri-socket")
            .arg(self.cri_socket())
            .args(["--cluster-cidr", "10.212.0.0/16", "--bridge", "kbench2"])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--pod-log-dir")
            .arg(root.join("pod-logs"))
            .arg("--cgroup-parent")
            .arg(self.cgroup_name())
            .args(["--agent-listen", "127.0.0.1:0"])
            .arg("--proxy-cgroup")
            .arg(&v2)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .args(["--proxy-healthz-address", "127.0.0.1:0"])
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.log())?)
            .spawn()
            .context("start keel server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .context("keel server did not print its kubeconfig path")?;
            if let Some(p) = line.strip_prefix("keel server: kubeconfig written to ") {
                self.kubeconfig = PathBuf::from(p);
                return Ok(());
            }
        }
    }

    fn agent_bpffs(&self) -> PathBuf {
        // bpffs refuses names with a dot.
        PathBuf::from(format!("{}-agent", self.bpffs.display()))
    }

    /// Starts `keel agent` joined to the server as node `keel-bench-agent`; returns its pid.
    fn start_agent(&self) -> anyhow::Result<u32> {
        let root = self.root().join("agent-node");
        std::fs::create_dir_all(&root)?;
        let v2 = self
            .cgroup
            .as_ref()
            .and_then(CgroupGuard::v2_path)
            .context("no cgroup v2 hierarchy")?
            .to_owned();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns().display()))
            .arg("--")
            .arg(&self.keel)
            .arg("--root")
            .arg(&root)
            .args([
                "--log",
                "info",
                "agent",
                "--server",
                "https://127.0.0.1:6443",
            ])
            .arg("--token-file")
            .arg(self.root().join("server/node-token"))
            .arg("--data-dir")
            .arg(root.join("data"))
            .args(["--node-name", "keel-bench-agent"])
            .arg("--cri-socket")
            .arg(root.join("keel.sock"))
            .args(["--pod-cidr", "10.213.0.0/24", "--bridge", "kbench3"])
            .arg("--run-dir")
            .arg(root.join("run"))
            .arg("--pod-log-dir")
            .arg(root.join("pod-logs"))
            .arg("--cgroup-parent")
            .arg(self.cgroup_name())
            .args(["--agent-listen", "127.0.0.1:0"])
            .arg("--proxy-cgroup")
            .arg(&v2)
            .arg("--bpffs-dir")
            .arg(self.agent_bpffs())
            .args(["--proxy-healthz-address", "127.0.0.1:0"])
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.root().join("agent.log"))?)
            .spawn()
            .context("start keel agent")?;
        let pid = child.id();
        *self.agent.lock().expect("agent lock") = Some(child);
        Ok(pid)
    }

    fn server_pid(&self) -> anyhow::Result<u32> {
        // nsenter with only --net execs keel in place: the child is the server.
        self.child
            .as_ref()
            .map(Child::id)
            .context("the server is not running")
    }

    /// `kubectl ARGS` inside the namespace; fails with its stderr.
    fn kubectl(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns().display()))
            .args(["--", "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run kubectl")?;
        if let Some(input) = stdin {
            child.stdin.take().context("stdin")?.write_all(input)?;
        }
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The measurement, on a thread inside the namespace (its sockets reach the API on the
    /// namespace's loopback).
    fn bench(&self) -> anyhow::Result<()> {
        let netns = std::fs::File::open(self.netns()).context("open the netns")?;
        let this = self;
        std::thread::scope(|s| {
            s.spawn(move || {
                rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .context("enter the bench netns")?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(this.measure())
            })
            .join()
            .unwrap_or_else(|_| bail!("the bench thread panicked"))
        })
    }

    async fn measure(&self) -> anyhow::Result<()> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        wait_node_ready(&client, "keel-bench").await?;
        // Settle: the proxy's first sync, the agent's first passes, allocator warm-up.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let pid = self.server_pid()?;
        let rss_idle = vm_rss_mib(pid);
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

        let manifest = deployment_manifest();
        let mut cluster = Vec::new();
        let mut applied = Vec::new();
        for round in 0..ROUNDS {
            let (apply, ready) = self.deploy_round(&pods, &manifest).await?;
            println!(
                "round {}: kubectl apply returned after {:.0} ms; {REPLICAS} pods Ready after {:.0} ms",
                round + 1,
                ms(apply),
                ms(ready)
            );
            applied.push(apply);
            cluster.push(ready);
            self.kubectl(
                &[
                    "delete",
                    "deployment",
                    LABEL,
                    "--wait=true",
                    "--timeout=120s",
                ],
                None,
            )?;
            self.wait_drained(&pods).await?;
        }

        let spec = PodSpec {
            cgroup_parent: format!("/{}", self.cgroup_name()),
            log_dir: self.root().join("anchor-logs"),
        };
        let mut cri =
            keel_cri::client::clients(keel_cri::client::connect(&self.cri_socket()).await?).0;
        let mut anchor = Vec::new();
        for round in 0..ROUNDS {
            let t = anchor_round(&cri, &spec, round).await;
            let removed = remove_anchor_pods(&mut cri).await;
            let t = t?;
            removed?;
            println!(
                "anchor round {}: {REPLICAS} pods through CRI directly in {:.0} ms",
                round + 1,
                ms(t)
            );
            anchor.push(t);
        }
        // Idle again: the agent's pass over an empty node, freed arenas.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss_after = vm_rss_mib(pid);
        let agent_pid = self.start_agent()?;
        wait_node_ready(&client, "keel-bench-agent")
            .await
            .with_context(|| {
                format!(
                    "--- keel agent log (tail) ---\n{}",
                    cri::log_tail(&self.root().join("agent.log"), 30)
                )
            })?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss_agent = vm_rss_mib(agent_pid);
        stop_child(self.agent.lock().expect("agent lock").take());

        let (c, a, k) = (
            cri::pct(&mut cluster, 50),
            cri::pct(&mut anchor, 50),
            cri::pct(&mut applied, 50),
        );
        println!();
        println!("| measure | keel server | anchor: CRI directly | ratio | target |");
        println!("| --- | --- | --- | --- | --- |");
        println!(
            "| {REPLICAS} replicas to Ready, p50 of {ROUNDS} | {:.0} ms | {:.0} ms | {:.2}x | < {} ms: {} |",
            ms(c),
            ms(a),
            ms(c) / ms(a),
            TARGET_READY.as_millis(),
            if c < TARGET_READY { "met" } else { "NOT met" }
        );
        println!(
            "| of which `kubectl apply` itself | {:.0} ms | | | |",
            ms(k)
        );
        for (what, v) in [
            ("idle RSS, Ready", rss_idle),
            ("idle RSS, after", rss_after),
        ] {
            println!(
                "| server {what} (with its node roles) | {v:.1} MiB | | | ≤ {TARGET_RSS_MIB:.0} MiB: {} |",
                if v <= TARGET_RSS_MIB {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        println!(
            "| joined `keel agent` idle RSS (CRI endpoint, CNI, agent, proxy) | {rss_agent:.1} MiB | | | |"
        );
        Ok(())
    }

    /// One round: the pods' watch is opened first, then `kubectl apply`; returns the time
    /// kubectl took and the time until every replica is Ready.
    async fn deploy_round(
        &self,
        pods: &Api<Pod>,
        manifest: &[u8],
    ) -> anyhow::Result<(Duration, Duration)> {
        let selector = format!("app={LABEL}");
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        ensure!(list.items.is_empty(), "pods of an earlier round are left");
        let version = list.metadata.resource_version.unwrap_or_default();
        let mut stream = pods
            .watch(&WatchParams::default().labels(&selector), &version)
            .await?
            .boxed();
        let start = Instant::now();
        self.kubectl(&["apply", "-f", "-"], Some(manifest))?;
        let applied = start.elapsed();
        let mut ready = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while ready.len() < REPLICAS {
            let ev = tokio::time::timeout_at(deadline, stream.try_next())
                .await
                .with_context(|| format!("{} of {REPLICAS} pods Ready after 120 s", ready.len()))?
                .context("pod watch")?
                .context("the pod watch ended")?;
            match ev {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if is_ready(&p) {
                        ready.insert(name);
                    } else {
                        ready.remove(&name);
                    }
                }
                WatchEvent::Deleted(p) => {
                    ready.remove(&p.metadata.name.unwrap_or_default());
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => bail!("pod watch: {e}"),
            }
        }
        Ok((applied, start.elapsed()))
    }

    /// Until the API has no bench pods and the node no sandboxes.
    async fn wait_drained(&self, pods: &Api<Pod>) -> anyhow::Result<()> {
        let mut cri =
            keel_cri::client::clients(keel_cri::client::connect(&self.cri_socket()).await?).0;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = pods
                .list(&ListParams::default().labels(&format!("app={LABEL}")))
                .await?
                .items
                .len();
            let sandboxes = cri
                .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
                .await?
                .into_inner()
                .items
                .len();
            if left == 0 && sandboxes == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "after 120 s, {left} pods and {sandboxes} sandboxes are left"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        stop_child(self.agent.lock().ok().and_then(|mut a| a.take()));
        stop_child(self.child.take());
    }
}

/// SIGTERM, then SIGKILL after 20 s.
fn stop_child(child: Option<Child>) {
    let Some(mut child) = child else {
        return;
    };
    let _ = keel_testkit::run("kill", &["-TERM", &child.id().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() && !self.kubeconfig.as_os_str().is_empty() {
            let _ = self.kubectl(
                &[
                    "delete",
                    "deployment",
                    LABEL,
                    "--ignore-not-found",
                    "--wait=false",
                ],
                None,
            );
        }
        self.stop();
        // Pods and containers a failed run left: removed without the server.
        cri::remove_leftovers(&self.keel, self.root(), &self.run_dir());
        for pins in [self.bpffs.clone(), self.agent_bpffs()] {
            let _ = Command::new(&self.keel)
                .args(["proxy", "uninstall", "--bpffs-dir"])
                .arg(&pins)
                .output();
            let _ = std::fs::remove_dir_all(&pins);
        }
        let parent = self.cgroup_name();
        drop(self.cgroup.take());
        for root in cri::cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(&parent));
        }
        drop(self.netns.take());
        drop(self.state.take());
    }
}

/// The Deployment: `REPLICAS` pods of the test image that sleep (SIGTERM ends them).
fn deployment_manifest() -> Vec<u8> {
    let labels = serde_json::json!({ "app": LABEL });
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": LABEL, "namespace": "default" },
        "spec": {
            "replicas": REPLICAS,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "main",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
                    }]
                }
            }
        }
    }))
    .expect("the manifest serializes")
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_node_ready(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(n) = nodes.get(name).await
            && n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "node {name} did not turn Ready in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `REPLICAS` pods through the node's CRI endpoint, all in flight; the wall time.
async fn anchor_round(cri: &cri::Client, spec: &PodSpec, round: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..REPLICAS)
        .map(|i| {
            let (mut client, spec) = (cri.clone(), spec.clone());
            tokio::spawn(async move {
                cri::start_pod(&mut client, &spec, &format!("anchor{round}-{i}")).await
            })
        })
        .collect();
    for t in tasks {
        t.await.context("anchor task")??;
    }
    Ok(start.elapsed())
}

/// Stops and removes the anchor's pods (the agent's own carry a pod uid label; there are none
/// left by now).
async fn remove_anchor_pods(cri: &mut cri::Client) -> anyhow::Result<()> {
    let pods = cri
        .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    for p in pods {
        if p.metadata.as_ref().is_some_and(|m| m.namespace == "bench") {
            cri.stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            })
            .await?;
            cri.remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            })
            .await?;
        }
    }
    Ok(())
}

fn vm_rss_mib(pid: u32) -> f64 {
    cri::proc_field(pid, "status", "VmRSS:") as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
