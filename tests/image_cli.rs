//! End-to-end tests of `keel image ...`, driving the built binary against a local registry.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::image_builder::{self, MediaTypes, Variant};
use keel_testkit::registry::Registry;
use keel_testkit::throttle::ThrottleProxy;
use keel_testkit::{StateRoot, privileged};

fn keel(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.arg("--root").arg(root).env_remove("KEEL_CONFIG");
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `keel --root ROOT ARGS...`, which must succeed; its stdout.
fn keel_ok(root: &Path, args: &[&str]) -> String {
    let mut c = keel(root);
    c.args(args);
    ok(c)
}

/// `keel --root ROOT ARGS...`, which must fail.
fn keel_fails(root: &Path, args: &[&str]) -> Output {
    let mut c = keel(root);
    c.args(args);
    fails(c)
}

fn fails(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should fail");
    out
}

fn push(reg: &Registry, v: Variant, repo: &str, tag: &str) {
    let img = image_builder::build_cached(v, MediaTypes::Oci).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(img.push(&reg.host(), repo, tag, None)).unwrap();
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pull_killed_midway_then_retried_succeeds() {
    if !privileged("pull_killed_midway_then_retried_succeeds") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    push(&reg, Variant::Big, "test/big", "v1");
    let proxy = ThrottleProxy::start(reg.addr(), 2 * 1024 * 1024).unwrap();
    let root = StateRoot::new().unwrap();
    let reference = format!("{}/test/big:v1", proxy.host());

    let mut first = keel(root.path());
    first
        .args([
            "image",
            "pull",
            "--insecure-registry",
            &proxy.host(),
            &reference,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = first.spawn().unwrap();
    let ingest = root.path().join("images/content/ingest");
    let deadline = Instant::now() + Duration::from_secs(60);
    // midway: more than 1 MiB of the ~50 MiB went through the proxy
    while proxy.bytes_to_client() < 1024 * 1024 {
        assert!(Instant::now() < deadline, "pull never got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "pull ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // nothing is recorded, nothing half-written looks complete
    let ls = keel_ok(root.path(), &["image", "ls", "--quiet"]);
    assert_eq!(ls.trim(), "", "a killed pull must not record an image");

    proxy.set_rate(1024 * 1024 * 1024);
    let out = keel_ok(
        root.path(),
        &[
            "image",
            "pull",
            "--insecure-registry",
            &proxy.host(),
            &reference,
        ],
    );
    assert!(out.contains("pulled"), "{out}");
    assert!(files_with_suffix(&ingest, ".partial").is_empty());
    let snaps = root.path().join("images/snapshots");
    assert!(
        std::fs::read_dir(&snaps)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.')),
        "work dirs left in {}",
        snaps.display()
    );
    let ls = keel_ok(root.path(), &["image", "ls"]);
    assert!(ls.contains(&reference), "{ls}");
}

#[test]
fn mirrors_serve_docker_hub_names_from_flags_and_config() {
    if !privileged("mirrors_serve_docker_hub_names_from_flags_and_config") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    push(&reg, Variant::Single, "library/busybox", "latest");
    let root = StateRoot::new().unwrap();
    let mirror = format!("docker.io=http://{}", reg.host());
    let out = keel_ok(
        root.path(),
        &["image", "pull", "--registry-mirror", &mirror, "busybox"],
    );
    assert!(out.contains("1 layers downloaded"), "{out}");
    let ls = keel_ok(root.path(), &["image", "ls"]);
    assert!(ls.contains("docker.io/library/busybox:latest"), "{ls}");

    // the same through the config file, into a fresh root
    let root2 = StateRoot::new().unwrap();
    let cfg = root2.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[registry.mirrors]\n\"docker.io\" = [\"http://{}\"]\n",
            reg.host()
        ),
    )
    .unwrap();
    ok({
        let mut c = keel(root2.path());
        c.arg("--config")
            .arg(&cfg)
            .args(["image", "pull", "busybox:latest"]);
        c
    });

    // a bad config names the file and the key
    std::fs::write(&cfg, "[registry]\nmirror = 1\n").unwrap();
    let out = fails({
        let mut c = keel(root2.path());
        c.arg("--config").arg(&cfg).args(["image", "ls"]);
        c
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.toml") && err.contains("mirror"),
        "{err}"
    );
}

#[test]
fn ls_inspect_rm_import_prune_and_clear_errors() {
    if !privileged("ls_inspect_rm_import_prune_and_clear_errors") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    push(&reg, Variant::Multi, "test/multi", "v1");
    let root = StateRoot::new().unwrap();
    let reference = format!("{}/test/multi:v1", reg.host());
    let pulled = keel_ok(
        root.path(),
        &[
            "image",
            "pull",
            "--insecure-registry",
            &reg.host(),
            &reference,
        ],
    );
    // not a terminal: plain progress lines
    assert!(
        pulled.contains("resolved sha256:") && pulled.contains(": done"),
        "{pulled}"
    );

    let inspect = keel_ok(root.path(), &["image", "inspect", &reference]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["config"]["config"]["User"], "keel");
    assert_eq!(v["image"]["layers"].as_array().unwrap().len(), 3);

    // unknown tag in the registry: exit non-zero, name the image and the cause
    let missing = format!("{}/test/multi:nope", reg.host());
    let out = keel_fails(
        root.path(),
        &[
            "image",
            "pull",
            "--insecure-registry",
            &reg.host(),
            &missing,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing) && err.contains("not found"), "{err}");

    // import a docker archive beside it
    let single = image_builder::build_cached(Variant::Single, MediaTypes::Oci).unwrap();
    let archive = root.path().join("single.tar");
    single
        .write_docker_archive(&archive, "keel/single:v2")
        .unwrap();
    let out = ok({
        let mut c = keel(root.path());
        c.arg("image").arg("import").arg(&archive);
        c
    });
    assert!(out.contains("docker.io/keel/single:v2"), "{out}");

    let out = keel_ok(root.path(), &["image", "rm", &reference]);
    assert!(out.contains("Deleted: sha256:"), "{out}");
    let out = keel_fails(root.path(), &["image", "rm", &reference]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let out = keel_ok(root.path(), &["image", "prune", "--all"]);
    assert!(out.contains("removed 1 images"), "{out}");
    let ls = keel_ok(root.path(), &["image", "ls", "--quiet"]);
    assert_eq!(ls.trim(), "");
}
