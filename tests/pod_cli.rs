//! End-to-end test of `keel pod ...` and `keel ctr run --pod`: the built binary makes a pod
//! whose containers see its hostname and DNS, lists, inspects, stops and removes it, and
//! leaves no pod behind. Privileged (root): namespaces, mounts, cgroups.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, StateRoot, privileged};

const IMAGE: &str = "example.com/keel/busybox:v1";

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
        cli.ok(&["image", "import", tar.to_str().unwrap()]);
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
        let ids = self.keel(&["pod", "ls", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["pod", "rm", "-f", id]);
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
fn pod_run_ctr_in_pod_ls_inspect_stop_rm() {
    if !privileged("pod_run_ctr_in_pod_ls_inspect_stop_rm") {
        return;
    }
    let cli = Cli::new();
    let cgroup = format!("{}/web", cli.parent());
    let id = cli
        .ok(&[
            "pod",
            "run",
            "--name",
            "web",
            "--hostname",
            "web-1",
            "--dns",
            "192.0.2.53",
            "--dns-search",
            "svc.keel.test",
            "--label",
            "app=web",
            "--cgroup-parent",
            &cgroup,
        ])
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "{id}");
    let out = cli.ok(&[
        "ctr",
        "run",
        "--rm",
        "--pod",
        "web",
        IMAGE,
        "sh",
        "-c",
        "hostname; grep nameserver /etc/resolv.conf",
    ]);
    assert_eq!(out, "web-1\nnameserver 192.0.2.53\n");

    let ls = cli.ok(&["pod", "ls", "--filter", "label=app=web"]);
    assert!(ls.contains(&id[..12]) && ls.contains("ready"), "{ls}");
    let ctr = cli
        .ok(&["ctr", "run", "-d", "--pod", &id[..8], IMAGE, "sleep", "300"])
        .trim()
        .to_string();
    let inspect: serde_json::Value =
        serde_json::from_str(&cli.ok(&["pod", "inspect", "web"])).unwrap();
    assert_eq!(inspect["state"], "ready");
    assert_eq!(inspect["containers"], serde_json::json!([ctr]));

    // A ready pod is not removed without --force.
    assert!(!cli.keel(&["pod", "rm", "web"]).status.success());
    cli.ok(&["pod", "stop", "-t", "1", "web"]);
    assert!(
        cli.ok(&["pod", "ls", "--filter", "state=notready", "-q"])
            .contains(&id)
    );
    cli.ok(&["pod", "rm", "web"]);
    assert_eq!(cli.ok(&["pod", "ls", "-q"]), "");
    assert_eq!(cli.ok(&["ctr", "ls", "-a", "-q"]), "");
    let unknown = cli.keel(&["pod", "rm", "nope"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("\"nope\" not found"));
}
