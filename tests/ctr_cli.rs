//! End-to-end tests of `keel ctr ...`: the built binary creates containers whose monitor is
//! the same binary re-executed. Privileged (root): overlay mounts, cgroups, namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, StateRoot, privileged};

const IMAGE: &str = "example.com/keel/busybox:v1";

/// A state root with the busybox image imported, a cgroup parent, and cleanup of every
/// container on drop (also when the test fails).
struct Cli {
    cgroup: Option<CgroupGuard>,
    state: Option<StateRoot>,
}

impl Cli {
    fn new() -> Cli {
        let state = StateRoot::new().unwrap();
        let tar = state.path().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE)
            .unwrap();
        let cli = Cli {
            cgroup: Some(CgroupGuard::new().unwrap()),
            state: Some(state),
        };
        let out = cli.keel(&["image", "import", tar.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cli
    }

    fn root(&self) -> &Path {
        self.state.as_ref().unwrap().path()
    }

    fn parent(&self) -> String {
        self.cgroup.as_ref().unwrap().name().to_string()
    }

    fn keel(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env_remove("KEEL_CONFIG")
            .env("KEEL_RUN_DIR", self.root().join("run"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let ids = self.keel(&["ctr", "ls", "-a", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["ctr", "rm", "-f", id]);
        }
        let parent = self.parent();
        drop(self.cgroup.take());
        for root in cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(&parent));
        }
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

#[test]
fn run_rm_prints_output_and_exits_with_code() {
    if !privileged("run_rm_prints_output_and_exits_with_code") {
        return;
    }
    let cli = Cli::new();
    let parent = cli.parent();
    let out = cli.keel(&[
        "ctr",
        "run",
        "--rm",
        "--cgroup-parent",
        &parent,
        IMAGE,
        "sh",
        "-c",
        "echo hello; echo oops >&2; exit 4",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    // --rm: nothing left
    assert_eq!(cli.ok(&["ctr", "ls", "-a", "-q"]), "");
    assert!(keel_testkit::state::mounts_under(cli.root()).is_empty());
    // The plain form the issue names (default cgroup parent) works too.
    let out = cli.keel(&["ctr", "run", "--rm", IMAGE, "echo", "plain"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain\n");
}

#[test]
fn detached_lifecycle_through_the_cli() {
    if !privileged("detached_lifecycle_through_the_cli") {
        return;
    }
    let cli = Cli::new();
    let parent = cli.parent();
    let id = cli.ok(&[
        "ctr",
        "run",
        "-d",
        "--name",
        "web",
        "--cgroup-parent",
        &parent,
        "--label",
        "app=web",
        "--memory",
        "64m",
        IMAGE,
        "sh",
        "-c",
        "echo started; sleep 300",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 64);
    let ls = cli.ok(&["ctr", "ls", "--filter", "label=app=web"]);
    assert!(ls.contains("running") && ls.contains("web"), "{ls}");
    assert_eq!(cli.ok(&["ctr", "exec", "web", "echo", "hi"]), "hi\n");
    let out = cli.keel(&["ctr", "exec", "web", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(cli.ok(&["ctr", "stats", "web"]).contains(&id[..12]));
    let inspect: serde_json::Value =
        serde_json::from_str(&cli.ok(&["ctr", "inspect", "web"])).unwrap();
    assert_eq!(inspect["status"], "running");
    assert_eq!(cli.ok(&["ctr", "logs", "web"]), "started\n");
    // rm without -f refuses a running container
    assert!(!cli.keel(&["ctr", "rm", "web"]).status.success());
    cli.ok(&["ctr", "stop", "-t", "1", "web"]);
    let ls = cli.ok(&["ctr", "ls", "-a"]);
    assert!(
        ls.contains("exited (137)") || ls.contains("exited (143)"),
        "{ls}"
    );
    assert_eq!(cli.ok(&["ctr", "ls", "-q"]), "");
    cli.ok(&["ctr", "rm", "web"]);
    assert_eq!(cli.ok(&["ctr", "ls", "-a", "-q"]), "");
    for root in cgroup_roots() {
        assert!(!root.join(&parent).join(id).exists());
    }
}
