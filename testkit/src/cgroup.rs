//! A cgroup made for one test, in every hierarchy the host has: the v2 tree (pure v2 at
//! /sys/fs/cgroup, or hybrid's /sys/fs/cgroup/unified) and each mounted v1 controller.
//! On drop its processes are killed and the directories removed, deepest first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::unique_name;

const V1_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
];

#[derive(Debug)]
pub struct CgroupGuard {
    name: String,
    v2: Option<PathBuf>,
    v1: Vec<(String, PathBuf)>,
}

/// The v2 hierarchy's root: /sys/fs/cgroup when it is cgroup2 (pure v2), else
/// /sys/fs/cgroup/unified when mounted (hybrid), else none.
pub fn v2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .find(|p| p == Path::new("/sys/fs/cgroup") || p == Path::new("/sys/fs/cgroup/unified"))
}

/// The mount point of a v1 controller, if the host mounts it.
pub fn v1_root(controller: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

impl CgroupGuard {
    /// Creates `<root>/<unique name>` in the v2 tree and in every mounted v1 controller.
    pub fn new() -> anyhow::Result<Self> {
        let name = unique_name("cg");
        let mut guard = CgroupGuard {
            name: name.clone(),
            v2: None,
            v1: Vec::new(),
        };
        if let Some(root) = v2_root() {
            let p = root.join(&name);
            std::fs::create_dir(&p).with_context(|| format!("create cgroup {}", p.display()))?;
            guard.v2 = Some(p);
        }
        for ctrl in V1_CONTROLLERS {
            if let Some(root) = v1_root(ctrl) {
                let p = root.join(&name);
                if p.exists() {
                    continue; // co-mounted controllers (cpu,cpuacct) share one directory
                }
                std::fs::create_dir(&p)
                    .with_context(|| format!("create cgroup {}", p.display()))?;
                guard.v1.push((ctrl.to_string(), p));
            }
        }
        Ok(guard)
    }

    /// The cgroup's name relative to each hierarchy's root.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn v2_path(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    pub fn v1_path(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
    }

    /// Moves a process into this cgroup in every hierarchy.
    pub fn add_pid(&self, pid: u32) -> anyhow::Result<()> {
        for dir in self.v2.iter().chain(self.v1.iter().map(|(_, p)| p)) {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .with_context(|| format!("add pid {pid} to {}", procs.display()))?;
        }
        Ok(())
    }
}

/// Kills every process in `dir` and its children, then removes the directories deepest first.
pub fn remove_tree(dir: &Path) {
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in &dirs {
        for attempt in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
            }
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if attempt == 49 => {
                    eprintln!("testkit: could not remove cgroup {}: {e}", d.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_owned());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for dir in self.v2.iter().chain(self.v1.iter().map(|(_, p)| p)) {
            remove_tree(dir);
        }
    }
}
