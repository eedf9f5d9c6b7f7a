//! Privileged pod sandbox tests through the real runtime: pinned namespaces, the PID keeper,
//! the pod's /etc files and sysctls, containers (libcontainer, overlayfs, monitors) joining
//! pods, a second runtime instance over the same state, and that 100 pods with containers
//! leave no mount, cgroup, pin or directory behind.

mod container_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, ensure};
use container_common::Env;
use keel_runtime::container::{ContainerConfig, ListFilter};
use keel_runtime::pod::{
    DnsConfig, LoopbackOnly, NetworkError, PodConfig, PodFilter, PodIps, PodNetwork, PodOptions,
    PodRecord, PodRuntime, PodState,
};

fn main() -> std::process::ExitCode {
    container_common::main(&[
        (
            "pod_containers_share_localhost_files_and_sysctls",
            pod_containers_share_localhost_files_and_sysctls,
        ),
        ("shared_pid_namespace", shared_pid_namespace),
        ("host_network_pod", host_network_pod),
        (
            "pods_sharing_a_given_cgroup_parent_leave_each_other_alone",
            pods_sharing_a_given_cgroup_parent_leave_each_other_alone,
        ),
        (
            "network_hook_is_called_once_each_way",
            network_hook_is_called_once_each_way,
        ),
        (
            "second_instance_finds_and_stops_the_pod",
            second_instance_finds_and_stops_the_pod,
        ),
        (
            "hundred_pods_leave_nothing_behind",
            hundred_pods_leave_nothing_behind,
        ),
    ])
}

/// A container test world plus its pods, removed (with their containers) on drop.
struct PodEnv {
    pods: PodRuntime,
    env: Env,
}

impl PodEnv {
    fn new() -> anyhow::Result<PodEnv> {
        let env = Env::new()?;
        let pods = PodRuntime::open(env.rt.clone(), pod_options(&env))?;
        Ok(PodEnv { pods, env })
    }

    /// Creates and starts `sh -c script` in the pod.
    fn run_in(&self, pod: &str, script: &str) -> anyhow::Result<String> {
        let id = self
            .pods
            .create_container(pod, &self.env.sh(script), &self.env.image)?;
        self.env.rt.start(&id)?;
        Ok(id)
    }

    /// Runs `sh -c script` in the pod to completion; returns (exit code, stdout lines).
    fn run_to_exit(&self, pod: &str, script: &str) -> anyhow::Result<(i32, Vec<String>)> {
        let id = self.run_in(pod, script)?;
        let exit = self
            .env
            .rt
            .wait(&id, Some(Duration::from_secs(30)))?
            .with_context(|| format!("container {id} did not exit"))?;
        Ok((exit.exit_code, self.stdout(&id)?))
    }

    fn stdout(&self, id: &str) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        self.env.rt.read_log(id, false, &mut |l| {
            lines.push(l.msg);
            true
        })?;
        Ok(lines)
    }
}

fn pod_options(env: &Env) -> PodOptions {
    let root = env.root();
    PodOptions {
        state_dir: root.join("pods"),
        run_dir: root.join("run-pods"),
        cgroup_parent: env.cgroup_parent.clone(),
    }
}

impl Drop for PodEnv {
    fn drop(&mut self) {
        if let Ok(all) = self.pods.list(&PodFilter::default()) {
            for p in all {
                if let Err(e) = self.pods.remove(&p.record.id, &LoopbackOnly) {
                    eprintln!("cleanup: remove pod {}: {e}", p.record.id);
                }
            }
        }
    }
}

fn read_host(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn pod_containers_share_localhost_files_and_sysctls() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let host_port_start = read_host("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    let host_shmmni = read_host("/proc/sys/kernel/shmmni");
    let cfg = PodConfig {
        name: "web".into(),
        hostname: Some("web-1".into()),
        dns: Some(DnsConfig {
            servers: vec!["192.0.2.53".into()],
            searches: vec!["svc.keel.test".into()],
            options: vec!["ndots:3".into()],
        }),
        sysctls: BTreeMap::from([
            (
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "1234".to_string(),
            ),
            ("kernel.shmmni".to_string(), "2222".to_string()),
        ]),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        ..Default::default()
    };
    let pod = t.pods.run(&cfg, &LoopbackOnly)?;
    let info = t.pods.status(&pod)?;
    ensure!(info.state == PodState::Ready, "{info:?}");

    // One listens on the pod's loopback, the other connects to it.
    let server = t.run_in(&pod, "echo hello-from-server | nc -l -p 7777")?;
    let (code, lines) = t.run_to_exit(
        &pod,
        "for i in $(seq 100); do nc -w 2 127.0.0.1 7777 </dev/null && exit 0; sleep 0.1; done; exit 1",
    )?;
    ensure!(
        code == 0 && lines == ["hello-from-server"],
        "client: {code} {lines:?}"
    );
    let exit = t
        .env
        .rt
        .wait(&server, Some(Duration::from_secs(10)))?
        .context("server did not exit")?;
    ensure!(exit.exit_code == 0, "server: {exit:?}");

    let (code, lines) = t.run_to_exit(
        &pod,
        "hostname; cat /etc/hostname; cat /etc/resolv.conf; grep web-1 /etc/hosts; \
         cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shmmni; \
         grep -c ' /dev/shm ' /proc/mounts",
    )?;
    ensure!(code == 0, "{code} {lines:?}");
    let expect = [
        "web-1",
        "web-1",
        "nameserver 192.0.2.53",
        "search svc.keel.test",
        "options ndots:3",
        "127.0.1.1\tweb-1",
        "1234",
        "2222",
        "1",
    ];
    ensure!(lines == expect, "inside the pod: {lines:?}");
    // The node's values are untouched.
    ensure!(read_host("/proc/sys/net/ipv4/ip_unprivileged_port_start") == host_port_start);
    ensure!(read_host("/proc/sys/kernel/shmmni") == host_shmmni);

    // A node-wide sysctl is refused, and nothing is left of the attempt.
    let before = t.pods.list(&PodFilter::default())?.len();
    let bad = PodConfig {
        sysctls: BTreeMap::from([("vm.swappiness".to_string(), "1".to_string())]),
        ..Default::default()
    };
    let err = t.pods.run(&bad, &LoopbackOnly).unwrap_err().to_string();
    ensure!(err.contains("vm.swappiness"), "{err}");
    ensure!(t.pods.list(&PodFilter::default())?.len() == before);

    // Filters.
    let by_label = t.pods.list(&PodFilter {
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        ..Default::default()
    })?;
    ensure!(by_label.len() == 1 && by_label[0].record.id == pod);
    ensure!(t.pods.resolve("web")? == pod);
    Ok(())
}

fn shared_pid_namespace() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let shared = t.pods.run(
        &PodConfig {
            share_pid: true,
            ..Default::default()
        },
        &LoopbackOnly,
    )?;
    t.run_in(&shared, "exec sleep 4242")?;
    let script = "for i in $(seq 50); do ps -o pid,args | grep -q '[s]leep 4242' && break; sleep 0.1; done; ps -o pid,args";
    let (code, lines) = t.run_to_exit(&shared, script)?;
    ensure!(code == 0, "{code} {lines:?}");
    ensure!(
        lines.iter().any(|l| l.contains("sleep 4242")),
        "the other container's process is not visible: {lines:?}"
    );
    // pid 1 is the keeper, not either container.
    ensure!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("__pod-pid")),
        "{lines:?}"
    );

    // Without sharing, each container has its own PID namespace.
    let apart = t.pods.run(&PodConfig::default(), &LoopbackOnly)?;
    t.run_in(&apart, "exec sleep 4343")?;
    let (_, lines) = t.run_to_exit(&apart, "sleep 0.5; ps -o args")?;
    ensure!(!lines.iter().any(|l| l.contains("sleep 4343")), "{lines:?}");

    // Stopping the pod ends the keeper: the pod is NotReady, its containers exited.
    t.pods
        .stop(&shared, Duration::from_secs(1), &LoopbackOnly)?;
    ensure!(t.pods.status(&shared)?.state == PodState::NotReady);
    ensure!(
        t.pods
            .pod_containers(&shared)?
            .iter()
            .all(|c| c.exit.is_some())
    );
    let keeper = t.pods.record(&shared)?.keeper.context("no keeper")?;
    ensure!(!keeper.is_alive());
    // Stop again: nothing to do, still fine.
    t.pods
        .stop(&shared, Duration::from_secs(1), &LoopbackOnly)?;
    Ok(())
}

fn host_network_pod() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let mut cfg = PodConfig::default();
    cfg.host.network = true;
    let pod = t.pods.run(&cfg, &LoopbackOnly)?;
    let rec = t.pods.record(&pod)?;
    ensure!(rec.namespaces.network.is_none() && rec.namespaces.uts.is_none());
    ensure!(rec.namespaces.ipc.is_some());
    let host_net = std::fs::read_link("/proc/self/ns/net")?;
    let (code, lines) = t.run_to_exit(&pod, "readlink /proc/self/ns/net; hostname")?;
    ensure!(code == 0, "{lines:?}");
    ensure!(
        lines.first().map(PathBuf::from) == Some(host_net),
        "{lines:?}"
    );
    let node = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    ensure!(lines.get(1) == Some(&node), "{lines:?}");
    // net.* sysctls would change the node: refused.
    cfg.sysctls = BTreeMap::from([("net.ipv4.ip_forward".to_string(), "1".to_string())]);
    ensure!(t.pods.run(&cfg, &LoopbackOnly).is_err());
    Ok(())
}

/// A network hook that records its calls and hands out a documentation address (no traffic
/// is ever sent to it).
#[derive(Default)]
struct RecordingNetwork {
    calls: Mutex<Vec<String>>,
    fail_setup: bool,
}

impl PodNetwork for RecordingNetwork {
    fn setup(&self, pod: &PodRecord, netns: &Path) -> Result<PodIps, NetworkError> {
        // The namespace is pinned and usable when the hook runs.
        std::fs::File::open(netns)?;
        self.calls.lock().unwrap().push(format!("setup {}", pod.id));
        if self.fail_setup {
            return Err("no address left".into());
        }
        Ok(PodIps {
            ips: vec!["192.0.2.10".parse()?],
            details: serde_json::json!({"cni": "result"}),
        })
    }
    fn teardown(&self, pod: &PodRecord, netns: &Path) -> Result<(), NetworkError> {
        std::fs::File::open(netns)?;
        ensure_eq(&pod.network.details, &serde_json::json!({"cni": "result"}))?;
        self.calls
            .lock()
            .unwrap()
            .push(format!("teardown {}", pod.id));
        Ok(())
    }
}

/// Two pods given one cgroup parent (as a caller may do; kubelet gives one a pod): removing the
/// first leaves the second's running container and the parent alone; removing the second
/// removes the parent, which nothing uses any more.
fn pods_sharing_a_given_cgroup_parent_leave_each_other_alone() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let shared = format!("{}/shared", t.env.cgroup_parent);
    let cfg = PodConfig {
        cgroup_parent: Some(shared.clone()),
        ..PodConfig::default()
    };
    let first = t.pods.run(&cfg, &LoopbackOnly)?;
    let second = t.pods.run(&cfg, &LoopbackOnly)?;
    let ctr = t.run_in(&second, "sleep 600")?;
    let ctr_dirs: Vec<PathBuf> = container_common::cgroup_roots()
        .into_iter()
        .map(|root| root.join(&shared).join(&ctr))
        .filter(|d| d.is_dir())
        .collect();
    ensure!(
        !ctr_dirs.is_empty(),
        "the container has no cgroup under {shared}"
    );
    t.pods.remove(&first, &LoopbackOnly)?;
    for dir in &ctr_dirs {
        ensure!(dir.is_dir(), "{} went with the other pod", dir.display());
    }
    let (code, lines) = t.run_to_exit(&second, "echo alive")?;
    ensure!(code == 0 && lines == ["alive"], "{code} {lines:?}");
    t.pods.remove(&second, &LoopbackOnly)?;
    for root in container_common::cgroup_roots() {
        let dir = root.join(&shared);
        ensure!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

fn ensure_eq(a: &serde_json::Value, b: &serde_json::Value) -> Result<(), NetworkError> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{a} != {b}").into())
    }
}

fn hundred_pods_leave_nothing_behind_check(t: &PodEnv) -> anyhow::Result<()> {
    let root = t.env.root().to_owned();
    let mounts = keel_testkit::state::mounts_under(&root);
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    for roots in container_common::cgroup_roots() {
        let parent = roots.join(&t.env.cgroup_parent);
        let left: Vec<PathBuf> = std::fs::read_dir(&parent)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        ensure!(left.is_empty(), "cgroups left: {left:?}");
    }
    for dir in [
        root.join("pods"),
        root.join("run-pods"),
        root.join("containers"),
        root.join("run"),
    ] {
        let left: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        ensure!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
    Ok(())
}

fn network_hook_is_called_once_each_way() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let net = RecordingNetwork::default();
    let pod = t.pods.run(
        &PodConfig {
            hostname: Some("api".into()),
            ..Default::default()
        },
        &net,
    )?;
    let rec = t.pods.record(&pod)?;
    ensure!(rec.network.ips == ["192.0.2.10".parse::<std::net::IpAddr>()?]);
    let hosts = std::fs::read_to_string(t.pods.pod_dir(&pod).join("hosts"))?;
    ensure!(hosts.contains("192.0.2.10\tapi\n"), "{hosts}");
    t.pods.stop(&pod, Duration::ZERO, &net)?;
    t.pods.stop(&pod, Duration::ZERO, &net)?;
    t.pods.remove(&pod, &net)?;
    t.pods.remove(&pod, &net)?;
    let calls = net.calls.lock().unwrap().clone();
    ensure!(
        calls == [format!("setup {pod}"), format!("teardown {pod}")],
        "{calls:?}"
    );

    // A failing setup fails the run and leaves nothing.
    let failing = RecordingNetwork {
        fail_setup: true,
        ..Default::default()
    };
    let err = t
        .pods
        .run(&PodConfig::default(), &failing)
        .unwrap_err()
        .to_string();
    ensure!(err.contains("no address left"), "{err}");
    hundred_pods_leave_nothing_behind_check(&t)
}

fn second_instance_finds_and_stops_the_pod() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let pod = t.pods.run(
        &PodConfig {
            name: "keep".into(),
            share_pid: true,
            ..Default::default()
        },
        &LoopbackOnly,
    )?;
    let ctr = t.run_in(&pod, "exec sleep 300")?;
    drop_in_place_instance(&t, &pod, &ctr)
}

fn drop_in_place_instance(t: &PodEnv, pod: &str, ctr: &str) -> anyhow::Result<()> {
    // A new runtime over the same state (a restarted daemon).
    let rt2 = keel_runtime::container::ContainerRuntime::open(container_common::options(
        t.env.state.as_ref().context("state")?,
        &t.env.cgroup_parent,
    ))?;
    let pods2 = PodRuntime::open(rt2, pod_options(&t.env))?;
    let all = pods2.list(&PodFilter::default())?;
    ensure!(all.len() == 1 && all[0].record.id == pod, "{all:?}");
    ensure!(all[0].state == PodState::Ready && all[0].record.config.name == "keep");
    let members = pods2.pod_containers(pod)?;
    ensure!(members.len() == 1 && members[0].record.id == ctr);
    pods2.stop(pod, Duration::from_secs(1), &LoopbackOnly)?;
    ensure!(t.pods.status(pod)?.state == PodState::NotReady);
    ensure!(
        pods2
            .list(&PodFilter {
                state: Some(PodState::Ready),
                ..Default::default()
            })?
            .is_empty()
    );
    pods2.remove(pod, &LoopbackOnly)?;
    ensure!(t.pods.list(&PodFilter::default())?.is_empty());
    ensure!(t.env.rt.list(&ListFilter::default())?.is_empty());
    Ok(())
}

fn hundred_pods_leave_nothing_behind() -> anyhow::Result<()> {
    let t = PodEnv::new()?;
    let worker = |n: usize| -> anyhow::Result<()> {
        for i in 0..n {
            let cfg = PodConfig {
                share_pid: i % 4 == 0,
                sysctls: BTreeMap::from([(
                    "net.ipv4.ping_group_range".to_string(),
                    "0 0".to_string(),
                )]),
                ..Default::default()
            };
            let pod = t.pods.run(&cfg, &LoopbackOnly)?;
            let c = ContainerConfig {
                command: vec!["sleep".into(), "60".into()],
                ..Default::default()
            };
            let id = t.pods.create_container(&pod, &c, &t.env.image)?;
            // Half of them still running when removed, half stopped first.
            if i % 2 == 0 {
                t.env.rt.start(&id).with_context(|| {
                    let log = t.env.rt.container_dir(&id).join("monitor.log");
                    format!(
                        "pod {i}: {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                })?;
            } else {
                t.pods.stop(&pod, Duration::ZERO, &LoopbackOnly)?;
            }
            t.pods.remove(&pod, &LoopbackOnly)?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| worker(50));
        let b = s.spawn(|| worker(50));
        a.join().expect("worker a")?;
        b.join().expect("worker b")
    })?;
    ensure!(t.pods.list(&PodFilter::default())?.is_empty());
    hundred_pods_leave_nothing_behind_check(&t)
}
