//! End-to-end tests of `keel cri`'s pod sandbox and container RPCs: the daemon is the built
//! binary on a unix socket, run inside a network namespace the test makes (the "node": the
//! bridge keel-cni creates lives there, never on the host), with keel-cni installed by
//! `keel cni install` into the test's state root (its IPAM data dir too). The client is
//! k8s-cri's generated CRI client (what crictl and kubelet speak); the image is the busybox
//! test image imported into the daemon's root. Privileged (root): namespaces, mounts, cgroups.
//!
//! Needs `target/debug/keel-cni` (`cargo build -p keel-cni`): the plugin is another package's
//! binary, which cargo does not build for this package's tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_cri::api;
use keel_cri::api::runtime_service_client::RuntimeServiceClient;
use keel_cri::tonic::Code;
use keel_cri::tonic::transport::Channel;
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, privileged};

const IMAGE: &str = "example.com/keel/busybox:v1";

type Client = RuntimeServiceClient<Channel>;

/// A node: a network namespace, a cgroup parent, a state root with the image and keel-cni
/// installed, and (while running) a `keel cri` inside the namespace. Drop removes every pod
/// left (through `keel pod rm -f`, which needs no daemon), then the cgroups, the namespace
/// (and with it the bridge and veths) and the state root.
struct Node {
    child: Option<Child>,
    cgroup: Option<CgroupGuard>,
    netns: Option<NetnsGuard>,
    state: Option<StateRoot>,
    log_n: u32,
}

fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

impl Node {
    fn new() -> Node {
        let plugin = keel_bin().with_file_name("keel-cni");
        assert!(
            plugin.is_file(),
            "{} is missing: run `cargo build -p keel-cni` first",
            plugin.display()
        );
        let node = Node {
            child: None,
            cgroup: Some(CgroupGuard::new().unwrap()),
            netns: Some(NetnsGuard::new().unwrap()),
            state: Some(StateRoot::new().unwrap()),
            log_n: 0,
        };
        let tar = node.root().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE)
            .unwrap();
        node.keel_ok(&["image", "import", tar.to_str().unwrap()]);
        // The conf dir stays empty until `install_cni`.
        std::fs::create_dir_all(node.conf_dir()).unwrap();
        node
    }

    fn root(&self) -> &Path {
        self.state.as_ref().unwrap().path()
    }
    fn conf_dir(&self) -> PathBuf {
        self.root().join("cni/net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.root().join("cni/bin")
    }
    fn socket(&self) -> PathBuf {
        self.root().join("keel.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.root().join("run/containers")
    }
    fn pods_run_dir(&self) -> PathBuf {
        self.root().join("run/pods")
    }
    fn parent(&self) -> String {
        self.cgroup.as_ref().unwrap().name().to_owned()
    }
    fn netns(&self) -> &NetnsGuard {
        self.netns.as_ref().unwrap()
    }
    fn log(&self) -> PathBuf {
        self.root().join(format!("keel-cri-{}.log", self.log_n))
    }

    fn keel(&self, args: &[&str]) -> std::process::Output {
        Command::new(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env_remove("KEEL_CONFIG")
            .env("KEEL_RUN_DIR", self.run_dir())
            .output()
            .unwrap()
    }

    fn keel_ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `keel cni install` into the state root, its IPAM data inside it too.
    fn install_cni(&self, subnet: &str) {
        self.keel_ok(&[
            "cni",
            "install",
            "--bin-dir",
            self.bin_dir().to_str().unwrap(),
            "--conf-dir",
            self.conf_dir().to_str().unwrap(),
            "--network",
            "keeltest",
            "--bridge",
            "kbr0",
            "--subnet",
            subnet,
            "--no-masquerade",
        ]);
        let (file, mut list) = self.conflist();
        list["plugins"][0]["ipam"]["dataDir"] =
            serde_json::json!(self.root().join("ipam").to_str().unwrap());
        std::fs::write(&file, list.to_string()).unwrap();
    }

    /// The conflist `keel cni install` wrote: its path and content.
    fn conflist(&self) -> (PathBuf, serde_json::Value) {
        let file = std::fs::read_dir(self.conf_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "conflist"))
            .expect("keel cni install wrote a conflist");
        let list = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        (file, list)
    }

    /// Starts `keel cri` inside the node's network namespace (nsenter: the mount namespace
    /// stays the host's, so the pins it makes are visible to the test and to a restarted
    /// daemon) and connects.
    async fn start(&mut self) -> Client {
        self.log_n += 1;
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns().path().display()))
            .arg("--")
            .arg(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(["--log", "keel_cri=debug,info", "cri", "--socket"])
            .arg(self.socket())
            .arg("--cni-conf-dir")
            .arg(self.conf_dir())
            .arg("--cni-bin-dir")
            .arg(self.bin_dir())
            .args(["--metrics-address", ""])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(self.parent())
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = keel_cri::client::connect(&self.socket()).await {
                return keel_cri::client::clients(channel).0;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keel cri exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "keel cri did not listen within 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// SIGKILL: what a crash or an OOM kill of the daemon does.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn links(&self) -> String {
        self.netns().exec("ip", &["-o", "link", "show"]).unwrap()
    }

    /// Pod veths on the node: every link but loopback and the bridge.
    fn veths(&self) -> usize {
        self.links()
            .lines()
            .filter(|l| !l.contains(": lo:") && !l.contains(": kbr0:"))
            .count()
    }

    /// Waits (at most 5 s) for the veth count to reach `n`: keel-cni's DEL answers once the
    /// pod is cut off and deletes the veth right after.
    async fn wait_veths(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.veths() != n {
            assert!(
                Instant::now() < deadline,
                "want {n} veths: {}",
                self.links()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keel cri log:\n{}", self.log_text());
        }
        self.kill9();
        let ids = self.keel(&["pod", "ls", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["pod", "rm", "-f", id]);
        }
        let ids = self.keel(&["ctr", "ls", "-a", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["ctr", "rm", "-f", id]);
        }
        let parent = self.parent();
        drop(self.cgroup.take());
        for root in cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(&parent));
        }
        drop(self.netns.take());
        drop(self.state.take());
    }
}

fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn pod_config(name: &str, log_dir: &Path) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(name).to_str().unwrap().into(),
        labels: HashMap::from([("app".into(), name.into()), ("tier".into(), "test".into())]),
        annotations: HashMap::from([("keel.test/note".into(), format!("pod {name}"))]),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: api::NamespaceMode::Pod as i32,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ctr_config(name: &str, cmd: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("ctr".into(), name.into())]),
        annotations: HashMap::from([("keel.test/ctr".into(), name.into())]),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    pid: api::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                seccomp: Some(api::SecurityProfile {
                    profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                capabilities: Some(api::Capability {
                    drop_capabilities: vec!["NET_RAW".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(rt: &mut Client, config: api::PodSandboxConfig) -> String {
    rt.run_pod_sandbox(api::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .pod_sandbox_id
}

async fn create(rt: &mut Client, pod: &str, config: api::ContainerConfig) -> String {
    rt.create_container(api::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(config),
        sandbox_config: None,
    })
    .await
    .unwrap()
    .into_inner()
    .container_id
}

async fn start(rt: &mut Client, id: &str) {
    rt.start_container(api::StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .unwrap();
}

async fn status(rt: &mut Client, id: &str) -> (api::ContainerStatus, HashMap<String, String>) {
    let r = rt
        .container_status(api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    (r.status.unwrap(), r.info)
}

async fn exec(rt: &mut Client, id: &str, cmd: &[&str], timeout: i64) -> api::ExecSyncResponse {
    rt.exec_sync(api::ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Polls ContainerStatus until the container has exited (at most 20 s).
async fn wait_exited(rt: &mut Client, id: &str) -> api::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, _) = status(rt, id).await;
        if s.state == api::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} did not exit: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pods_listed(rt: &mut Client, filter: api::PodSandboxFilter) -> Vec<String> {
    let mut ids: Vec<String> = rt
        .list_pod_sandbox(api::ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    ids
}

async fn containers_listed(rt: &mut Client, filter: api::ContainerFilter) -> Vec<String> {
    let mut ids: Vec<String> = rt
        .list_containers(api::ListContainersRequest {
            filter: Some(filter),
        })
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Collects container events in the background.
fn collect_events(
    mut stream: keel_cri::tonic::Streaming<api::ContainerEventResponse>,
) -> std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            s.lock()
                .unwrap()
                .push((ev.container_id, ev.container_event_type));
        }
    });
    seen
}

fn cgroup_file(cgroups_path: &str, controller: &str, v1: &str, v2: &str) -> Option<String> {
    let rel = cgroups_path.trim_start_matches('/');
    let v1p = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(rel)
        .join(v1);
    if let Ok(s) = std::fs::read_to_string(&v1p) {
        return Some(s.trim().to_owned());
    }
    std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(rel).join(v2))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn mounted_under(dir: &Path) -> Vec<PathBuf> {
    keel_testkit::state::mounts_under(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_containers_through_cri() {
    if !privileged("pods_and_containers_through_cri") {
        return;
    }
    let subnet = "10.201.0.0/24";
    let mut node = Node::new();
    let mut rt = node.start().await;
    let logs = node.root().join("logs");

    // No CNI config yet: a pod on its own network is refused, naming the conf dir.
    let e = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod_config("early", &logs)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(node.conf_dir().to_str().unwrap()),
        "{e:?}"
    );
    node.install_cni(subnet);

    let events = collect_events(
        rt.get_container_events(api::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner(),
    );

    // RunPodSandbox gets an address from keel-cni; PodSandboxStatus shows it.
    let mut web_cfg = pod_config("web", &logs);
    web_cfg.dns_config = Some(api::DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec!["svc.keel.test".into()],
        options: vec!["ndots:5".into()],
    });
    web_cfg.linux.as_mut().unwrap().sysctls =
        HashMap::from([("net.ipv4.ip_local_port_range".into(), "30000 40000".into())]);
    let web = run_pod(&mut rt, web_cfg).await;
    let st = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: web.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(st.state, api::PodSandboxState::SandboxReady as i32);
    let ip = st.network.as_ref().unwrap().ip.clone();
    assert!(ip.starts_with("10.201.0."), "pod ip {ip:?}");
    let m = st.metadata.as_ref().unwrap();
    assert_eq!((m.name.as_str(), m.namespace.as_str()), ("web", "default"));
    assert_eq!(st.labels["app"], "web");
    assert_eq!(st.annotations["keel.test/note"], "pod web");
    assert_eq!(
        st.annotations.len(),
        1,
        "no reserved keys: {:?}",
        st.annotations
    );

    // A reused pod name is refused, naming the holder.
    let e = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod_config("web", &logs)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&web), "{e:?}");

    // kubelet names the pod cgroup.
    let mut db_cfg = pod_config("db", &logs);
    let db_cgroup = format!("{}/kubepods/poddb", node.parent());
    db_cfg.linux.as_mut().unwrap().cgroup_parent = format!("/{db_cgroup}");
    let db = run_pod(&mut rt, db_cfg).await;
    // Host network: no CNI, the node's addresses.
    let mut host_cfg = pod_config("hostnet", &logs);
    host_cfg
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options
        .as_mut()
        .unwrap()
        .network = api::NamespaceMode::Node as i32;
    let hostnet = run_pod(&mut rt, host_cfg).await;

    // ListPodSandbox with filters.
    assert_eq!(
        pods_listed(&mut rt, Default::default()).await,
        sorted(vec![web.clone(), db.clone(), hostnet.clone()])
    );
    let by_label = pods_listed(
        &mut rt,
        api::PodSandboxFilter {
            label_selector: HashMap::from([("app".into(), "db".into())]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_label, vec![db.clone()]);
    let by_id = pods_listed(
        &mut rt,
        api::PodSandboxFilter {
            id: web[..12].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_id, vec![web.clone()]);
    let not_ready = pods_listed(
        &mut rt,
        api::PodSandboxFilter {
            state: Some(api::PodSandboxStateValue {
                state: api::PodSandboxState::SandboxNotready as i32,
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(not_ready.is_empty(), "{not_ready:?}");

    // Two containers in one pod share localhost.
    let server = create(
        &mut rt,
        &web,
        ctr_config(
            "server",
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo hello-from-server > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www",
            ],
        ),
    )
    .await;
    let (s, _) = status(&mut rt, &server).await;
    assert_eq!(s.state, api::ContainerState::ContainerCreated as i32);
    start(&mut rt, &server).await;
    let shared = node.root().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("greeting"), "from-the-host\n").unwrap();
    let mut client_cfg = ctr_config("client", &["sleep", "3600"]);
    client_cfg.mounts.push(api::Mount {
        container_path: "/shared".into(),
        host_path: shared.to_str().unwrap().into(),
        readonly: true,
        ..Default::default()
    });
    let client = create(&mut rt, &web, client_cfg).await;
    start(&mut rt, &client).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exec(
            &mut rt,
            &client,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"],
            5,
        )
        .await;
        if r.exit_code == 0 {
            assert_eq!(
                String::from_utf8_lossy(&r.stdout).trim(),
                "hello-from-server"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no localhost reply: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ContainerStatus while running.
    let (s, info) = status(&mut rt, &client).await;
    assert_eq!(s.state, api::ContainerState::ContainerRunning as i32);
    assert!(s.created_at > 0 && s.started_at >= s.created_at, "{s:?}");
    assert_eq!(s.finished_at, 0);
    assert_eq!(s.image.as_ref().unwrap().image, IMAGE);
    assert!(s.image_ref.starts_with("sha256:"), "{s:?}");
    assert_eq!(
        Path::new(&s.log_path),
        logs.join("web").join("client/0.log")
    );
    assert_eq!(s.labels["ctr"], "client");
    assert_eq!(s.annotations.len(), 1, "{:?}", s.annotations);
    assert_eq!(s.metadata.as_ref().unwrap().name, "client");

    // The pod's address is on eth0 inside the containers.
    let r = exec(
        &mut rt,
        &client,
        &["ip", "-4", "-o", "addr", "show", "eth0"],
        5,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&r.stdout).contains(&format!("{ip}/")),
        "{r:?}"
    );
    let r = exec(&mut rt, &client, &["hostname"], 5).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "web");
    // DNS config and sysctls of the sandbox.
    let r = exec(&mut rt, &client, &["cat", "/etc/resolv.conf"], 5).await;
    let resolv = String::from_utf8_lossy(&r.stdout);
    assert!(
        resolv.contains("nameserver 192.0.2.53") && resolv.contains("search svc.keel.test"),
        "{resolv}"
    );
    let r = exec(
        &mut rt,
        &client,
        &["cat", "/proc/sys/net/ipv4/ip_local_port_range"],
        5,
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&r.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["30000", "40000"]
    );

    // The mount: visible, read-only, and in ContainerStatus.
    let r = exec(&mut rt, &client, &["cat", "/shared/greeting"], 5).await;
    assert_eq!(r.stdout, b"from-the-host\n");
    let r = exec(&mut rt, &client, &["touch", "/shared/new"], 5).await;
    assert_ne!(r.exit_code, 0, "read-only mount was writable");
    let (s, _) = status(&mut rt, &client).await;
    assert_eq!(s.mounts.len(), 1, "{:?}", s.mounts);
    assert_eq!(
        (s.mounts[0].container_path.as_str(), s.mounts[0].readonly),
        ("/shared", true)
    );

    // Security context: user and groups, read-only rootfs, no_new_privs, every capability
    // dropped (the bounding set: a non-root user has no effective ones anyway).
    let mut secure_cfg = ctr_config("secure", &["sleep", "3600"]);
    {
        let sc = secure_cfg
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap();
        sc.run_as_user = Some(api::Int64Value { value: 1000 });
        sc.run_as_group = Some(api::Int64Value { value: 1000 });
        sc.supplemental_groups = vec![4242];
        sc.readonly_rootfs = true;
        sc.no_new_privs = true;
        sc.capabilities = Some(api::Capability {
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
    }
    let secure = create(&mut rt, &web, secure_cfg).await;
    start(&mut rt, &secure).await;
    let r = exec(&mut rt, &secure, &["id"], 5).await;
    let id = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        id.contains("uid=1000") && id.contains("gid=1000") && id.contains("4242"),
        "{id}"
    );
    let r = exec(&mut rt, &secure, &["touch", "/rootfs-write"], 5).await;
    assert_ne!(r.exit_code, 0, "rootfs was writable");
    let r = exec(
        &mut rt,
        &secure,
        &["grep", "-E", "^(CapBnd|NoNewPrivs)", "/proc/self/status"],
        5,
    )
    .await;
    let caps = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        caps.contains("CapBnd:\t0000000000000000") && caps.contains("NoNewPrivs:\t1"),
        "{caps}"
    );
    rt.remove_container(api::RemoveContainerRequest {
        container_id: secure.clone(),
    })
    .await
    .unwrap();

    // ExecSync: output, exit code, timeout.
    let r = exec(
        &mut rt,
        &client,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        5,
    )
    .await;
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.exit_code, 7);
    let t0 = Instant::now();
    let e = rt
        .exec_sync(api::ExecSyncRequest {
            container_id: client.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // A reused container name in the pod is refused, naming the holder.
    let e = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: web.clone(),
            config: Some(ctr_config("client", &["sleep", "1"])),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains(&client), "{e:?}");
    // The same name in another pod is fine.
    let db_main = create(&mut rt, &db, ctr_config("client", &["sleep", "3600"])).await;
    start(&mut rt, &db_main).await;
    let (_, db_info) = status(&mut rt, &db_main).await;
    let db_path = serde_json::from_str::<serde_json::Value>(&db_info["info"]).unwrap()["record"]
        ["cgroups_path"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        db_path.trim_start_matches('/').starts_with(&db_cgroup),
        "{db_path} not under {db_cgroup}"
    );

    // ListContainers with filters.
    let all = containers_listed(&mut rt, Default::default()).await;
    assert_eq!(
        all,
        sorted(vec![server.clone(), client.clone(), db_main.clone()])
    );
    let in_web = containers_listed(
        &mut rt,
        api::ContainerFilter {
            pod_sandbox_id: web.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(in_web, sorted(vec![server.clone(), client.clone()]));
    let labelled = containers_listed(
        &mut rt,
        api::ContainerFilter {
            label_selector: HashMap::from([("ctr".into(), "server".into())]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(labelled, vec![server.clone()]);
    let by_state = containers_listed(
        &mut rt,
        api::ContainerFilter {
            state: Some(api::ContainerStateValue {
                state: api::ContainerState::ContainerExited as i32,
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(by_state.is_empty(), "{by_state:?}");

    // UpdateContainerResources shows in the cgroup and in ContainerStatus.
    let cgroups_path = serde_json::from_str::<serde_json::Value>(&info["info"]).unwrap()["record"]
        ["cgroups_path"]
        .as_str()
        .unwrap()
        .to_owned();
    rt.update_container_resources(api::UpdateContainerResourcesRequest {
        container_id: client.clone(),
        linux: Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 100 << 20,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mem = cgroup_file(
        &cgroups_path,
        "memory",
        "memory.limit_in_bytes",
        "memory.max",
    );
    assert_eq!(mem.as_deref(), Some("104857600"), "{cgroups_path}");
    let quota = cgroup_file(&cgroups_path, "cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(
        quota.as_deref().is_some_and(|q| q.starts_with("50000")),
        "{quota:?}"
    );
    let (s, _) = status(&mut rt, &client).await;
    let res = s.resources.unwrap().linux.unwrap();
    assert_eq!(res.memory_limit_in_bytes, 100 << 20);

    // Logs: CRI format at the path kubelet asked for; ReopenContainerLog after a rotation.
    let talker = create(
        &mut rt,
        &web,
        ctr_config(
            "talker",
            &[
                "sh",
                "-c",
                "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done",
            ],
        ),
    )
    .await;
    start(&mut rt, &talker).await;
    let log = logs.join("web/talker/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("line2")) {
        assert!(Instant::now() < deadline, "no log at {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = std::fs::read_to_string(&log).unwrap();
    assert!(
        first.lines().next().unwrap().contains(" stdout F line0"),
        "{first}"
    );
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    rt.reopen_container_log(api::ReopenContainerLogRequest {
        container_id: talker.clone(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains(" stdout F line")) {
        assert!(Instant::now() < deadline, "log not reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stats.
    let cs = rt
        .container_stats(api::ContainerStatsRequest {
            container_id: talker.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(cs.attributes.as_ref().unwrap().id, talker);
    assert!(cs.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert!(cs.memory.unwrap().working_set_bytes.unwrap().value > 0);
    let listed = rt
        .list_container_stats(api::ListContainerStatsRequest {
            filter: Some(api::ContainerStatsFilter {
                pod_sandbox_id: web.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    let mut ids: Vec<String> = listed
        .iter()
        .map(|s| s.attributes.as_ref().unwrap().id.clone())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        sorted(vec![server.clone(), client.clone(), talker.clone()])
    );
    let ps = rt
        .pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: web.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let linux = ps.linux.unwrap();
    assert_eq!(linux.containers.len(), 3);
    assert!(linux.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert!(linux.process.unwrap().process_count.unwrap().value >= 3);
    let net = linux.network.unwrap();
    assert_eq!(net.default_interface.unwrap().name, "eth0");
    let all_pod_stats = rt
        .list_pod_sandbox_stats(api::ListPodSandboxStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(all_pod_stats.len(), 3);

    // Exits: reason and exit code.
    let failing = create(&mut rt, &db, ctr_config("failing", &["sh", "-c", "exit 3"])).await;
    start(&mut rt, &failing).await;
    let s = wait_exited(&mut rt, &failing).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"), "{s:?}");
    assert!(s.finished_at >= s.started_at && s.started_at > 0, "{s:?}");
    let done = create(&mut rt, &db, ctr_config("done", &["true"])).await;
    start(&mut rt, &done).await;
    let s = wait_exited(&mut rt, &done).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");
    rt.stop_container(api::StopContainerRequest {
        container_id: talker.clone(),
        timeout: 1,
    })
    .await
    .unwrap();
    let s = wait_exited(&mut rt, &talker).await;
    assert_eq!(s.reason, "Error", "{s:?}");
    assert!(s.exit_code == 137 || s.exit_code == 143, "{s:?}");
    // Stopping again, and removing, are fine; so are unknown ids.
    rt.stop_container(api::StopContainerRequest {
        container_id: talker.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_container(api::RemoveContainerRequest {
        container_id: talker.clone(),
    })
    .await
    .unwrap();
    let unknown = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    rt.stop_container(api::StopContainerRequest {
        container_id: unknown.into(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_container(api::RemoveContainerRequest {
        container_id: unknown.into(),
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .unwrap();
    let e = rt
        .container_status(api::ContainerStatusRequest {
            container_id: talker.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Malformed requests: InvalidArgument / NotFound naming the field, never a crash.
    let e = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: web.clone(),
            config: None,
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("config"), "{e:?}");
    let mut no_image = ctr_config("noimage", &["true"]);
    no_image.image = None;
    let e = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: web.clone(),
            config: Some(no_image),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("config.image.image"), "{e:?}");
    let mut no_meta = ctr_config("nometa", &["true"]);
    no_meta.metadata = None;
    let e = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: web.clone(),
            config: Some(no_meta),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: unknown.into(),
            config: Some(ctr_config("orphan", &["true"])),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut no_meta = pod_config("nometa", &logs);
    no_meta.metadata = None;
    let e = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(no_meta),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("config.metadata"), "{e:?}");
    let e = rt
        .exec_sync(api::ExecSyncRequest {
            container_id: client.clone(),
            cmd: vec![],
            timeout: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // StopPodSandbox (CNI DEL) + RemovePodSandbox leave no pin, mount, cgroup or veth.
    let web_info = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: web.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let rec: serde_json::Value = serde_json::from_str(&web_info.info["info"]).unwrap();
    let pod_cgroup = rec["cgroup_parent"].as_str().unwrap().to_owned();
    assert!(pod_cgroup.starts_with(&node.parent()), "{pod_cgroup}");
    assert_eq!(web_info.containers_statuses.len(), 2, "server and client");
    let veths_before = node.veths();
    assert_eq!(veths_before, 2, "web and db: {}", node.links());
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: web.clone(),
    })
    .await
    .unwrap();
    let st = rt
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: web.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(st.state, api::PodSandboxState::SandboxNotready as i32);
    let (s, _) = status(&mut rt, &client).await;
    assert_eq!(s.state, api::ContainerState::ContainerExited as i32);
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: web.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: web.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: web.clone(),
    })
    .await
    .unwrap();
    let pin_dir = node.pods_run_dir().join(&web);
    assert!(!pin_dir.exists(), "{} left", pin_dir.display());
    assert!(
        mounted_under(&node.pods_run_dir())
            .iter()
            .all(|m| !m.starts_with(&pin_dir)),
        "mounts left"
    );
    for root in cgroup_roots() {
        assert!(
            !root.join(&pod_cgroup).exists(),
            "cgroup {} left",
            root.join(&pod_cgroup).display()
        );
    }
    node.wait_veths(1).await;
    assert_eq!(
        containers_listed(&mut rt, Default::default()).await,
        sorted(vec![db_main.clone(), failing.clone(), done.clone()])
    );

    // Events: created, started, stopped, deleted for the web pod's client container.
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = [
        api::ContainerEventType::ContainerCreatedEvent as i32,
        api::ContainerEventType::ContainerStartedEvent as i32,
        api::ContainerEventType::ContainerStoppedEvent as i32,
        api::ContainerEventType::ContainerDeletedEvent as i32,
    ];
    loop {
        let got: Vec<i32> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| *id == client)
            .map(|(_, t)| *t)
            .collect();
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "events of {client}: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The exit the daemon saw by itself (no RPC stopped it).
    let failing_events: Vec<i32> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _)| *id == failing)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(failing_events, want[..3].to_vec());

    for pod in [&db, &hostnet] {
        rt.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .unwrap();
    }
    assert!(pods_listed(&mut rt, Default::default()).await.is_empty());
    node.wait_veths(0).await;
    assert!(
        mounted_under(node.root()).is_empty(),
        "{:?}",
        mounted_under(node.root())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pods_survive_a_sigkill_of_the_daemon() {
    if !privileged("ten_pods_survive_a_sigkill_of_the_daemon") {
        return;
    }
    let subnet = "10.202.0.0/24";
    let mut node = Node::new();
    node.install_cni(subnet);
    let mut rt = node.start().await;
    let logs = node.root().join("logs");
    let mut pods = Vec::new();
    let mut ctrs = Vec::new();
    for i in 0..10 {
        let pod = run_pod(&mut rt, pod_config(&format!("p{i}"), &logs)).await;
        let c = create(&mut rt, &pod, ctr_config("main", &["sleep", "3600"])).await;
        start(&mut rt, &c).await;
        pods.push(pod);
        ctrs.push(c);
    }
    node.kill9();
    let mut rt = node.start().await;
    let ready = pods_listed(
        &mut rt,
        api::PodSandboxFilter {
            state: Some(api::PodSandboxStateValue {
                state: api::PodSandboxState::SandboxReady as i32,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ready, sorted(pods.clone()));
    let running = containers_listed(
        &mut rt,
        api::ContainerFilter {
            state: Some(api::ContainerStateValue {
                state: api::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(running, sorted(ctrs.clone()));
    for (pod, c) in pods.iter().zip(&ctrs) {
        let r = exec(&mut rt, c, &["echo", "alive"], 5).await;
        assert_eq!((r.exit_code, r.stdout.as_slice()), (0, &b"alive\n"[..]));
        let st = rt
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert!(st.network.unwrap().ip.starts_with("10.202.0."));
    }
    // The restarted daemon tears them down as well as the first would have.
    for pod in &pods {
        rt.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    }
    assert!(pods_listed(&mut rt, Default::default()).await.is_empty());
    node.wait_veths(0).await;
    assert!(
        mounted_under(node.root()).is_empty(),
        "{:?}",
        mounted_under(node.root())
    );
}

/// An HTTP GET of `/index.html` at `addr` made from inside the node's network namespace (a
/// thread enters it and ends): the answer, or the connect error.
fn http_get_in(netns: &Path, addr: &str) -> Result<String, std::io::Error> {
    let (netns, addr) = (netns.to_owned(), addr.to_owned());
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns)?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        use std::io::{Read, Write};
        let mut conn =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        conn.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .unwrap()
}

/// A pod's hostPort through the CRI: RunPodSandbox passes the port mappings to a chained
/// plugin that declares the `portMappings` capability (Debian's reference `portmap`, after
/// keel-cni), so the node's address and the host port reach the container; StopPodSandbox's
/// CNI DEL removes the mapping again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_reaches_the_container_through_a_chained_portmap_plugin() {
    if !privileged("host_port_reaches_the_container_through_a_chained_portmap_plugin") {
        return;
    }
    let portmap = Path::new("/usr/lib/cni/portmap");
    assert!(
        portmap.exists(),
        "{} missing: apt-get install containernetworking-plugins (cargo xtask setup does)",
        portmap.display()
    );
    let mut node = Node::new();
    node.install_cni("10.204.0.0/24");
    std::fs::copy(portmap, node.bin_dir().join("portmap")).unwrap();
    let (file, mut list) = node.conflist();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ));
    std::fs::write(&file, list.to_string()).unwrap();
    let mut rt = node.start().await;
    let logs = node.root().join("logs");
    let mut cfg = pod_config("hostport", &logs);
    cfg.port_mappings = vec![api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 18080,
        host_ip: String::new(),
    }];
    let pod = run_pod(&mut rt, cfg).await;
    let web = create(
        &mut rt,
        &pod,
        ctr_config(
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo hello-through-hostport > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
            ],
        ),
    )
    .await;
    start(&mut rt, &web).await;
    // The bridge's address is one of the node's own: portmap's OUTPUT rule DNATs it.
    let netns = node.netns().path().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match http_get_in(&netns, "10.204.0.1:18080") {
            Ok(a) if a.contains("hello-through-hostport") => break a,
            other => {
                assert!(Instant::now() < deadline, "hostPort 18080: {other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let e = http_get_in(&netns, "10.204.0.1:18080").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(pods_listed(&mut rt, Default::default()).await.is_empty());
}

/// NetworkReady follows the plugins' CNI STATUS for a 1.1.0 network: keel-cni with a range
/// that has one address says it cannot serve ADD once a pod holds it, and is ready again
/// when the pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_ready_follows_cni_status() {
    if !privileged("network_ready_follows_cni_status") {
        return;
    }
    let mut node = Node::new();
    node.install_cni("10.205.0.0/30");
    let (file, mut list) = node.conflist();
    list["cniVersion"] = serde_json::json!("1.1.0");
    std::fs::write(&file, list.to_string()).unwrap();
    let mut rt = node.start().await;
    let network_ready = |r: api::StatusResponse| {
        r.status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .unwrap()
    };
    let status = |rt: &mut Client| {
        let mut rt = rt.clone();
        async move {
            rt.status(api::StatusRequest { verbose: false })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(network_ready(status(&mut rt).await).status);
    let logs = node.root().join("logs");
    let pod = run_pod(&mut rt, pod_config("only", &logs)).await;
    let c = network_ready(status(&mut rt).await);
    assert!(!c.status, "{c:?}");
    assert!(c.message.contains("full"), "{}", c.message);
    rt.stop_pod_sandbox(api::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(network_ready(status(&mut rt).await).status);
}
