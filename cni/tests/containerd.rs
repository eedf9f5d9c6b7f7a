//! Privileged interop: Debian's containerd 1.6 (its CRI plugin, driven over CRI by this test)
//! runs pod sandboxes whose network comes from `keel-cni` through a conflist written by
//! `keel_cni::install`. Each pod gets its address and reaches the other over TCP.
//!
//! containerd runs inside a "node" network namespace made by the test (so the bridge never lands in the
//! host's namespace), with its root, state, socket and CNI dirs under a StateRoot. The sandbox
//! image is a busybox image built offline and imported as `registry.k8s.io/pause:3.6`, with
//! `sleep` as its long-running command.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest,
};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, privileged};
use tonic::transport::{Channel, Endpoint, Uri};

const PAUSE: &str = "registry.k8s.io/pause:3.6";

/// A docker-archive of the busybox layer with `Cmd ["/bin/sleep","100000"]`: the sandbox's
/// process must outlive the test.
fn pause_archive(path: &Path) -> anyhow::Result<()> {
    let img = keel_testkit::image_builder::build(keel_testkit::image_builder::Variant::Single)?;
    let layer = img.layer_tar(0)?;
    let diff_id = keel_testkit::image_builder::sha256_digest(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/sleep", "100000"], "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let manifest = serde_json::json!([{ "Config": "config.json", "RepoTags": [PAUSE], "Layers": ["layer.tar"] }]);
    let mut tar = tar::Builder::new(std::fs::File::create(path)?);
    for (name, data) in [
        ("config.json", serde_json::to_vec(&config)?),
        ("manifest.json", serde_json::to_vec(&manifest)?),
        ("layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data.as_slice())?;
    }
    tar.finish()?;
    Ok(())
}

struct Containerd {
    child: Child,
    socket: std::path::PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = keel_testkit::run("kill", &["-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_containerd(node: &NetnsGuard, state: &StateRoot) -> anyhow::Result<Containerd> {
    let s = state.path();
    let bin_dir = state.subdir("cni/bin")?;
    let conf_dir = state.subdir("cni/net.d")?;
    // The plugin and its conflist, installed the way `keel cni install` does it.
    keel_cni::install::install(&keel_cni::install::InstallSpec {
        binary: common::BIN.into(),
        bin_dir: bin_dir.clone(),
        conf_dir: conf_dir.clone(),
        network: "keel".into(),
        bridge: "keel0".into(),
        subnets: vec!["10.104.0.0/24".parse()?, "fd00:104::/64".parse()?],
        mtu: None,
        ip_masq: true,
        portmap: false,
        conflist_name: "10-keel.conflist".into(),
        // Allocations under the state root rather than /var/lib/cni.
        ipam_data_dir: Some(s.join("ipam")),
    })?;
    // containerd's CRI plugin brings up the pod's loopback with the reference plugin.
    std::os::unix::fs::symlink("/usr/lib/cni/loopback", bin_dir.join("loopback"))?;
    let socket = s.join("containerd.sock");
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
"#,
        root = s.join("root").display(),
        state = s.join("state").display(),
        socket = socket.display(),
        opt = s.join("opt").display(),
        bin = bin_dir.display(),
        conf = conf_dir.display(),
        runc_root = s.join("runc").display(),
    );
    let cfg = s.join("containerd.toml");
    std::fs::write(&cfg, config)?;
    let log = std::fs::File::create(s.join("containerd.log"))?;
    // nsenter, not `ip netns exec`: only the network namespace changes. `ip netns exec` also
    // remounts /sys, which hides the cgroup mounts runc needs.
    let child = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg("containerd")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start containerd")?;
    let cd = Containerd { child, socket };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cd.socket.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "containerd did not come up: {}",
            log_tail(s)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(cd)
}

fn log_tail(state: &Path) -> String {
    let log = std::fs::read_to_string(state.join("containerd.log")).unwrap_or_default();
    log.lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

async fn cri(socket: &Path) -> anyhow::Result<RuntimeServiceClient<Channel>> {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(channel))
}

fn sandbox_config(name: &str, cgroup_parent: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        linux: Some(k8s_cri::v1::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            ..Default::default()
        }),
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: String::new(),
        ..Default::default()
    }
}

#[test]
fn containerd_cri_pods_get_network_from_keel_cni() -> anyhow::Result<()> {
    if !privileged("containerd_cri_pods_get_network_from_keel_cni") {
        return Ok(());
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP containerd_cri_pods_get_network_from_keel_cni: containerd not installed (apt-get install containerd)"
        );
        return Ok(());
    }
    let run_containerd_existed = Path::new("/run/containerd").exists();
    let state = StateRoot::new()?;
    let node = NetnsGuard::new()?;
    let cgroups = CgroupGuard::new()?;
    let cd = start_containerd(&node, &state)?;
    let archive = state.path().join("pause.tar");
    pause_archive(&archive)?;
    keel_testkit::run(
        "ctr",
        &[
            "-a",
            cd.socket.to_str().unwrap_or_default(),
            "-n",
            "k8s.io",
            "images",
            "import",
            archive.to_str().unwrap_or_default(),
        ],
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = rt.block_on(cri(&cd.socket))?;
    let mut ids = Vec::new();
    let outcome = (|| -> anyhow::Result<()> {
        let mut pods = Vec::new();
        for name in ["pod-a", "pod-b"] {
            let id = rt
                .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(sandbox_config(name, &format!("/{}", cgroups.name()))),
                    runtime_handler: String::new(),
                }))
                .map_err(|e| {
                    anyhow::anyhow!("RunPodSandbox {name}: {e}\n{}", log_tail(state.path()))
                })?
                .into_inner()
                .pod_sandbox_id;
            ids.push(id.clone());
            let st = rt
                .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: id,
                    verbose: true,
                }))?
                .into_inner();
            let net = st
                .status
                .as_ref()
                .and_then(|s| s.network.clone())
                .context("no network status")?;
            let info: serde_json::Value =
                serde_json::from_str(st.info.get("info").map(String::as_str).unwrap_or("{}"))?;
            let pid = info["pid"].as_u64().context("sandbox pid")?;
            let extra: Vec<String> = net.additional_ips.into_iter().map(|i| i.ip).collect();
            anyhow::ensure!(net.ip.starts_with("10.104.0."), "{name}: ip {}", net.ip);
            anyhow::ensure!(
                extra.iter().any(|i| i.starts_with("fd00:104::")),
                "{name}: v6 {extra:?}"
            );
            pods.push((
                net.ip,
                extra,
                std::path::PathBuf::from(format!("/proc/{pid}/ns/net")),
            ));
        }
        // Each pod reaches the other, IPv4 and IPv6, both ways.
        let (a, b) = (&pods[0], &pods[1]);
        for (server, client) in [(a, b), (b, a)] {
            common::tcp_exchange_paths(&server.2, &client.2, server.0.parse()?)?;
            common::tcp_exchange_paths(&server.2, &client.2, server.1[0].parse()?)?;
        }
        Ok(())
    })();
    // Tear down through CRI whatever happened, so containerd runs CNI DEL.
    for id in &ids {
        let stop = rt.block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        }));
        let remove = rt.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        }));
        if outcome.is_ok() {
            stop?;
            remove?;
        }
    }
    outcome?;
    let ipam = state.path().join("ipam").join("keel");
    let left: Vec<_> = std::fs::read_dir(&ipam)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.parse::<std::net::IpAddr>().is_ok()),
        "allocations left after CNI DEL: {left:?}"
    );
    drop(cd);
    // runc also made the pod cgroups under controllers the guard does not track.
    for hier in std::fs::read_dir("/sys/fs/cgroup")?.filter_map(|e| e.ok()) {
        let dir = hier.path().join(cgroups.name());
        if dir.is_dir() {
            keel_testkit::cgroup::remove_tree(&dir);
        }
    }
    // containerd 1.6 hard-codes its shim socket dir; remove it if this test made it.
    if !run_containerd_existed {
        let _ = std::fs::remove_dir("/run/containerd/s");
        let _ = std::fs::remove_dir("/run/containerd");
    }
    Ok(())
}
