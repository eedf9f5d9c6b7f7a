//! What the end-to-end tests of nodes share: child processes whose log shows when a test fails,
//! a node's resources (network namespace, cgroup, state root with the test image) removed on
//! drop, polling, and kubectl inside a namespace. Not every test file uses every helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot};
use serde_json::json;

pub const IMAGE: &str = "example.com/keel/busybox:v1";

pub fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

/// A child process (server, cri, agent) SIGKILLed on drop; its log printed if the test fails.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // KEEL_TEST_LOG_DIR keeps every log of a passing run too (the state root goes).
        if let Some(keep) = std::env::var_os("KEEL_TEST_LOG_DIR") {
            let name = self.log.file_name().unwrap_or_default();
            let _ = std::fs::copy(&self.log, Path::new(&keep).join(name));
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- {} log ----\n{text}", self.name);
        }
    }
}

/// The node's resources: a network namespace, a cgroup parent, a state root with the image
/// and keel-cni installed. Drop removes every pod left (`keel pod rm -f`, no daemon needed),
/// then the cgroups, the namespace and the state root.
pub struct NodeRes {
    pub cgroup: Option<CgroupGuard>,
    pub netns: Option<NetnsGuard>,
    pub state: Option<StateRoot>,
}

impl NodeRes {
    pub fn new() -> NodeRes {
        let plugin = keel_bin().with_file_name("keel-cni");
        assert!(
            plugin.is_file(),
            "{} is missing: run `cargo build -p keel-cni` first",
            plugin.display()
        );
        let node = NodeRes {
            cgroup: Some(CgroupGuard::new().unwrap()),
            netns: Some(NetnsGuard::new().unwrap()),
            state: Some(StateRoot::new().unwrap()),
        };
        let tar = node.root().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE)
            .unwrap();
        node.keel_ok(&["image", "import", tar.to_str().unwrap()]);
        node.install_cni("10.250.7.0/24");
        node
    }
    pub fn root(&self) -> &Path {
        self.state.as_ref().unwrap().path()
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root().join("run/containers")
    }
    pub fn socket(&self) -> PathBuf {
        self.root().join("keel.sock")
    }
    pub fn keel(&self, args: &[&str]) -> std::process::Output {
        Command::new(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env_remove("KEEL_CONFIG")
            .env("KEEL_RUN_DIR", self.run_dir())
            .output()
            .unwrap()
    }
    pub fn keel_ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    pub fn install_cni(&self, subnet: &str) {
        let conf = self.root().join("cni/net.d");
        self.keel_ok(&[
            "cni",
            "install",
            "--bin-dir",
            self.root().join("cni/bin").to_str().unwrap(),
            "--conf-dir",
            conf.to_str().unwrap(),
            "--network",
            "keeltest",
            "--bridge",
            "kbr0",
            "--subnet",
            subnet,
            "--no-masquerade",
        ]);
        let file = std::fs::read_dir(&conf)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "conflist"))
            .expect("keel cni install wrote a conflist");
        let mut list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        list["plugins"][0]["ipam"]["dataDir"] = json!(self.root().join("ipam").to_str().unwrap());
        std::fs::write(&file, list.to_string()).unwrap();
    }

    /// `keel cri` inside the node's network namespace.
    pub fn start_cri(&self) -> Proc {
        let log = self.root().join("cri.log");
        let child = Command::new("nsenter")
            .arg(format!(
                "--net={}",
                self.netns.as_ref().unwrap().path().display()
            ))
            .arg("--")
            .arg(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(["--log", "info", "cri", "--socket"])
            .arg(self.socket())
            .arg("--cni-conf-dir")
            .arg(self.root().join("cni/net.d"))
            .arg("--cni-bin-dir")
            .arg(self.root().join("cni/bin"))
            .args(["--metrics-address", ""])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(self.cgroup.as_ref().unwrap().name())
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc {
            name: "keel cri",
            child,
            log,
        }
    }
}

impl Drop for NodeRes {
    fn drop(&mut self) {
        let ids = self.keel(&["pod", "ls", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["pod", "rm", "-f", id]);
        }
        let ids = self.keel(&["ctr", "ls", "-a", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["ctr", "rm", "-f", id]);
        }
        let parent = self.cgroup.as_ref().unwrap().name().to_owned();
        drop(self.cgroup.take());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2") {
                keel_testkit::cgroup::remove_tree(&Path::new(f[1]).join(&parent));
            }
        }
        drop(self.netns.take());
        drop(self.state.take());
    }
}

/// Polls `f` every 200 ms until it returns Some, for at most `secs`.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kubectl` inside the network namespace `netns`: success, and stdout (or stderr on failure).
pub fn kubectl_in(
    netns: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["--", "kubectl", "--kubeconfig"])
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("nsenter kubectl");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
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
