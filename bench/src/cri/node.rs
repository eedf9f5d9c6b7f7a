//! One node of `cargo xtask bench cri`: a daemon (`keel cri` or containerd 1.6) in a network
//! namespace made here, with its cgroup parent and a state root holding its root, state,
//! socket, log, CNI bin and conf dirs (keel-cni installed by `keel cni install`). Starting it
//! imports the image and connects keel's CRI client; dropping it kills the daemon and removes
//! whatever the run left: pods and containers (keel's `pod rm -f`, containerd's shims by
//! socket), cgroups, the namespace, mounts and directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_cri::api;
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot};

use super::{CONTAINERD, Client, PAUSE};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Keel,
    Containerd,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Keel => "keel",
            Kind::Containerd => "containerd",
        }
    }
}

/// One daemon with its namespace, cgroup parent and state root. Drop kills the daemon and
/// removes whatever is left.
pub(super) struct Node {
    pub(super) kind: Kind,
    keel: PathBuf,
    child: Option<Child>,
    client: Option<Client>,
    made_run_containerd: bool,
    cgroup: Option<CgroupGuard>,
    netns: Option<NetnsGuard>,
    state: Option<StateRoot>,
}

impl Node {
    pub(super) fn new(kind: Kind, keel: &Path) -> anyhow::Result<Node> {
        let node = Node {
            kind,
            keel: keel.to_owned(),
            child: None,
            client: None,
            made_run_containerd: !Path::new("/run/containerd").exists(),
            cgroup: Some(CgroupGuard::new()?),
            netns: Some(NetnsGuard::new()?),
            state: Some(StateRoot::new()?),
        };
        let (bridge, subnet) = match kind {
            Kind::Keel => ("kbench0", "10.210.0.0/16"),
            Kind::Containerd => ("cbench0", "10.211.0.0/16"),
        };
        node.install_cni(bridge, subnet)?;
        Ok(node)
    }

    pub(super) fn root(&self) -> &Path {
        self.state
            .as_ref()
            .map(StateRoot::path)
            .unwrap_or(Path::new("/nonexistent"))
    }
    fn socket(&self) -> PathBuf {
        self.root().join(format!("{}.sock", self.kind.label()))
    }
    fn log(&self) -> PathBuf {
        self.root().join(format!("{}.log", self.kind.label()))
    }
    fn run_dir(&self) -> PathBuf {
        self.root().join("run/containers")
    }
    pub(super) fn cgroup_parent(&self) -> String {
        format!(
            "/{}",
            self.cgroup
                .as_ref()
                .map(CgroupGuard::name)
                .unwrap_or_default()
        )
    }

    pub(super) fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log(), n)
    }

    /// `keel ARGS` against this node's root, offline (no daemon needed).
    fn keel_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        keel_offline(&self.keel, self.root(), &self.run_dir(), args)
    }

    /// keel-cni and its conflist through `keel cni install`, IPAM data inside the state root;
    /// the reference loopback plugin beside it (containerd runs it for the pod's `lo`).
    fn install_cni(&self, bridge: &str, subnet: &str) -> anyhow::Result<()> {
        let bin_dir = self.root().join("cni/bin");
        let conf_dir = self.root().join("cni/net.d");
        self.keel_cli(&[
            "cni",
            "install",
            "--bin-dir",
            &bin_dir.to_string_lossy(),
            "--conf-dir",
            &conf_dir.to_string_lossy(),
            "--network",
            "bench",
            "--bridge",
            bridge,
            "--subnet",
            subnet,
            "--no-masquerade",
        ])?;
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", bin_dir.join("loopback"))?;
        let conflist = std::fs::read_dir(&conf_dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "conflist"))
            .context("keel cni install wrote no conflist")?;
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conflist)?)?;
        v["plugins"][0]["ipam"]["dataDir"] = serde_json::json!(self.root().join("ipam"));
        std::fs::write(&conflist, serde_json::to_vec(&v)?)?;
        Ok(())
    }

    /// Imports the image (keel: offline into its root, before the daemon starts), starts the
    /// daemon inside the namespace and connects the client.
    pub(super) async fn start(&mut self, image: &Path) -> anyhow::Result<()> {
        let netns = self.netns.as_ref().context("netns")?.path();
        let mut cmd = Command::new("nsenter");
        // nsenter, not `ip netns exec`: only the network namespace changes (`ip netns exec`
        // also remounts /sys, hiding the cgroup mounts runc needs, and the pins keel makes).
        cmd.arg(format!("--net={}", netns.display())).arg("--");
        match self.kind {
            Kind::Keel => {
                self.keel_cli(&["image", "import", &image.to_string_lossy()])?;
                cmd.arg(&self.keel)
                    .arg("--root")
                    .arg(self.root())
                    .args(["cri", "--socket"])
                    .arg(self.socket())
                    .arg("--cni-conf-dir")
                    .arg(self.root().join("cni/net.d"))
                    .arg("--cni-bin-dir")
                    .arg(self.root().join("cni/bin"))
                    .args(["--metrics-address", ""])
                    .arg("--run-dir")
                    .arg(self.run_dir())
                    .arg("--cgroup-parent")
                    .arg(self.cgroup_parent().trim_start_matches('/'))
                    .env_remove("KEEL_CONFIG");
            }
            Kind::Containerd => {
                let cfg = self.root().join("containerd.toml");
                std::fs::write(&cfg, self.containerd_config())?;
                cmd.arg(CONTAINERD).arg("--config").arg(&cfg);
            }
        }
        let log = std::fs::File::create(self.log())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.kind.label()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket().exists()
                && let Ok(channel) = keel_cri::client::connect(&self.socket()).await
            {
                self.client = Some(keel_cri::client::clients(channel).0);
                break;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("{} exited at start: {st}", self.kind.label());
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not listen within 30 s",
                self.kind.label()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.kind == Kind::Containerd {
            self.import(image)?;
        }
        Ok(())
    }

    /// containerd's config: everything under the state root; `restrict_oom_score_adj` because
    /// these machines have no CAP_SYS_RESOURCE; pod netns mounts under the state dir too.
    fn containerd_config(&self) -> String {
        let s = self.root();
        format!(
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
  netns_mounts_under_state_dir = true
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
            socket = self.socket().display(),
            opt = s.join("opt").display(),
            bin = s.join("cni/bin").display(),
            conf = s.join("cni/net.d").display(),
            runc_root = s.join("runc").display(),
        )
    }

    /// `ctr images import` into containerd's CRI namespace.
    pub(super) fn import(&self, archive: &Path) -> anyhow::Result<()> {
        keel_testkit::run(
            "ctr",
            &[
                "-a",
                &self.socket().to_string_lossy(),
                "-n",
                "k8s.io",
                "images",
                "import",
                &archive.to_string_lossy(),
            ],
        )
        .map(drop)
    }

    pub(super) fn client(&self) -> anyhow::Result<Client> {
        self.client.clone().context("daemon not connected")
    }

    pub(super) fn daemon_pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("daemon not started")?.id())
    }

    /// The per-pod helpers: processes other than the daemon whose command line names this
    /// node (keel's watchers name its containers dir, containerd's shims its socket).
    pub(super) fn helpers(&self) -> anyhow::Result<Vec<u32>> {
        let daemon = self.daemon_pid()?;
        let key = match self.kind {
            Kind::Keel => self.root().to_string_lossy().into_owned(),
            Kind::Containerd => self.socket().to_string_lossy().into_owned(),
        };
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == daemon {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&key) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Stops and removes every pod the daemon lists.
    pub(super) async fn remove_all_pods(&self) -> anyhow::Result<Duration> {
        let Some(mut client) = self.client.clone() else {
            return Ok(Duration::ZERO);
        };
        let start = Instant::now();
        let pods = client
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items;
        for p in pods {
            client
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await
                .with_context(|| format!("{}: StopPodSandbox {}", self.kind.label(), p.id))?;
            client
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await
                .with_context(|| format!("{}: RemovePodSandbox {}", self.kind.label(), p.id))?;
        }
        Ok(start.elapsed())
    }

    fn kill_daemon(&mut self) {
        self.client = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = keel_testkit::run("kill", &["-TERM", &child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let helpers = if self.child.is_some() {
            self.helpers().unwrap_or_default()
        } else {
            Vec::new()
        };
        self.kill_daemon();
        match self.kind {
            Kind::Keel => remove_leftovers(&self.keel, self.root(), &self.run_dir()),
            Kind::Containerd => {
                // Shims outlive containerd; their containers die with the cgroups below.
                for pid in helpers {
                    let _ = keel_testkit::run("kill", &["-9", &pid.to_string()]);
                }
            }
        }
        let parent = self.cgroup_parent();
        drop(self.cgroup.take());
        for root in cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(parent.trim_start_matches('/')));
        }
        drop(self.netns.take());
        drop(self.state.take());
        if self.kind == Kind::Containerd && self.made_run_containerd {
            // containerd 1.6 hard-codes its shim socket dir.
            let _ = std::fs::remove_dir("/run/containerd/s");
            let _ = std::fs::remove_dir("/run/containerd");
        }
    }
}

/// The last `n` lines of a log file.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `keel --root ROOT ARGS` (containers under `run_dir`), without a daemon; its stdout.
pub(crate) fn keel_offline(
    keel: &Path,
    root: &Path,
    run_dir: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let out = Command::new(keel)
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("KEEL_CONFIG")
        .env("KEEL_RUN_DIR", run_dir)
        .output()
        .with_context(|| format!("run {}", keel.display()))?;
    ensure!(
        out.status.success(),
        "keel {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes, without a daemon, the pods and containers a failed run left under `root`.
pub(crate) fn remove_leftovers(keel: &Path, root: &Path, run_dir: &Path) {
    let keel = |args: &[&str]| keel_offline(keel, root, run_dir, args);
    if let Ok(ids) = keel(&["pod", "ls", "-q"]) {
        for id in ids.split_whitespace() {
            let _ = keel(&["pod", "rm", "-f", id]);
        }
    }
    if let Ok(ids) = keel(&["ctr", "ls", "-a", "-q"]) {
        for id in ids.split_whitespace() {
            let _ = keel(&["ctr", "rm", "-f", id]);
        }
    }
}

pub(crate) fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}
