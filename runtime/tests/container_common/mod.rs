//! Shared harness of the container tests: a state root, a cgroup parent, the busybox test
//! image, and a runtime whose monitor is this very test binary (its `main` dispatches the
//! hidden monitor roles first, which is why these tests use `harness = false`).
//!
//! Every `Env` removes its containers, their cgroups and mounts on drop, also when the test
//! panics.

#![allow(dead_code)]

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keel_runtime::ImageStore;
use keel_runtime::container::{
    ContainerConfig, ContainerRuntime, ImageInfo, ListFilter, RuntimeOptions,
};
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, StateRoot};

pub type TestFn = fn() -> anyhow::Result<()>;

/// The test binary's main: hidden roles first, then the tests named on the command line
/// (substring match; none = all), run in parallel.
pub fn main(tests: &[(&'static str, TestFn)]) -> std::process::ExitCode {
    if let Some(code) = keel_runtime::container::monitor::hidden_main() {
        return std::process::ExitCode::from(code.clamp(0, 255) as u8);
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| args.is_empty() || args.iter().any(|a| n.contains(a.as_str())))
        .collect();
    let handles: Vec<_> = selected
        .iter()
        .map(|(name, f)| {
            let (name, f) = (*name, *f);
            std::thread::spawn(move || {
                if !keel_testkit::privileged(name) {
                    return (name, Ok(()));
                }
                let start = Instant::now();
                let r = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(anyhow::anyhow!("panicked: {msg}"))
                });
                eprintln!(
                    "test {name} ... {} ({:.1?})",
                    if r.is_ok() { "ok" } else { "FAILED" },
                    start.elapsed()
                );
                (name, r)
            })
        })
        .collect();
    let mut failed = 0;
    for h in handles {
        match h.join() {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => {
                failed += 1;
                eprintln!("---- {name} ----\n{e:?}");
            }
            Err(_) => failed += 1,
        }
    }
    eprintln!(
        "test result: {} passed; {failed} failed",
        selected.len() - failed
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

pub const IMAGE: &str = "example.com/keel/busybox:v1";

fn archive() -> anyhow::Result<&'static Path> {
    static ARCHIVE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    if let Some((_, p)) = ARCHIVE.get() {
        return Ok(p);
    }
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("busybox.tar");
    build_cached(Variant::Single, MediaTypes::Oci)?.write_oci_archive(&p, IMAGE)?;
    let _ = ARCHIVE.set((dir, p));
    Ok(&ARCHIVE.get().expect("just set").1)
}

/// One test's world.
pub struct Env {
    pub rt: ContainerRuntime,
    pub image: ImageInfo,
    pub cgroup_parent: String,
    cgroup: Option<CgroupGuard>,
    pub state: Option<StateRoot>,
}

pub fn options(state: &StateRoot, cgroup_parent: &str) -> RuntimeOptions {
    RuntimeOptions {
        root: state.path().to_owned(),
        run_dir: state.path().join("run"),
        cgroup_parent: cgroup_parent.to_string(),
        monitor_exe: Some(std::env::current_exe().expect("test exe path")),
    }
}

impl Env {
    pub fn new() -> anyhow::Result<Env> {
        let state = StateRoot::new()?;
        let cgroup = CgroupGuard::new()?;
        let cgroup_parent = cgroup.name().to_string();
        let tar = archive()?;
        let image = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let store = ImageStore::open(state.path(), Default::default())?;
                store.import(tar).await?;
                anyhow::Ok(ImageInfo::resolve(&store, IMAGE).await?)
            })?;
        let rt = ContainerRuntime::open(options(&state, &cgroup_parent))?;
        Ok(Env {
            rt,
            image,
            cgroup_parent,
            cgroup: Some(cgroup),
            state: Some(state),
        })
    }

    pub fn root(&self) -> &Path {
        self.state.as_ref().expect("state").path()
    }

    /// A config running `sh -c script`.
    pub fn sh(&self, script: &str) -> ContainerConfig {
        ContainerConfig {
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }
    }

    /// Creates and starts; returns the id.
    pub fn run(&self, cfg: &ContainerConfig) -> anyhow::Result<String> {
        let id = self.rt.create(cfg, &self.image)?;
        self.rt.start(&id)?;
        Ok(id)
    }

    /// Runs to completion (30 s at most) and returns (exit record, stdout lines).
    pub fn run_to_exit(
        &self,
        cfg: &ContainerConfig,
    ) -> anyhow::Result<(keel_runtime::container::ExitRecord, Vec<String>, String)> {
        let id = self.run(cfg)?;
        let exit = self
            .rt
            .wait(&id, Some(Duration::from_secs(30)))?
            .ok_or_else(|| anyhow::anyhow!("container {id} did not exit"))?;
        let mut lines = Vec::new();
        self.rt.read_log(&id, false, &mut |l| {
            if l.stream == keel_runtime::container::crilog::Stream::Stdout {
                lines.push(l.msg);
            }
            true
        })?;
        Ok((exit, lines, id))
    }

    /// The v1 controller directory (or the v2 directory) of a container's cgroup.
    pub fn cgroup_dir(&self, controller: &str, id: &str) -> Option<PathBuf> {
        let v2 = keel_testkit::cgroup::v2_root();
        if keel_runtime::container::cgroups::is_v2() {
            return v2.map(|r| r.join(&self.cgroup_parent).join(id));
        }
        keel_testkit::cgroup::v1_root(controller).map(|r| r.join(&self.cgroup_parent).join(id))
    }
}

/// Every cgroup hierarchy root on this host.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(all) = self.rt.list(&ListFilter::default()) {
            for c in all {
                if let Err(e) = self.rt.remove(&c.record.id, true) {
                    eprintln!("cleanup: remove {}: {e}", c.record.id);
                }
            }
        }
        drop(self.cgroup.take());
        // libcgroups makes the parent in hierarchies the guard does not know (hugetlb, ...).
        for root in cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(&self.cgroup_parent));
        }
        drop(self.state.take());
    }
}
