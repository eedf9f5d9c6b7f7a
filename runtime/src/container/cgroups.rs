//! The container's cgroup, v1 or v2: creation and limits are libcontainer's (libcgroups'
//! cgroupfs managers, never systemd); this module reads what the runtime reports (OOM kills,
//! CPU, memory working set, pids), applies updates and removes the cgroup.
//!
//! Hybrid hosts (v1 controllers plus an empty v2 tree) are v1 to libcgroups, and so to us.
//! Parsing of the counter files is pure and unit-tested; reads go to `/sys/fs/cgroup`.

use std::path::{Path, PathBuf};

use libcgroups::common::{
    CgroupConfig, CgroupManager, CgroupSetup, ControllerOpt, create_cgroup_manager,
    get_cgroup_setup,
};
use libcgroups::v1::ControllerType;
use oci_spec::runtime::LinuxResources;

/// Something failed on a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {reason}")]
    Manager { path: PathBuf, reason: String },
}

const ROOT: &str = "/sys/fs/cgroup";

/// Gives the next cgroup move of this node a head start on its RCU grace period.
///
/// Moving a process into a cgroup (a write to `cgroup.procs`) takes the kernel's global
/// cgroup_threadgroup_rwsem for writing, and the first writer after a quiet spell waits out an
/// RCU grace period before it gets it (7-13 ms on these machines, idle CPU); writers in the
/// grace period after it go through at once. libcontainer's intermediate process is such a
/// writer on every create and every exec, 10-20 ms into the call: the wait used to come
/// after all the rest. This starts it at the beginning instead: a short-lived thread moves
/// this process to the cgroup it is already in (a move that changes nothing but takes the
/// lock), so the grace period runs beside the record, rootfs, spec and monitor start-up, and
/// libcontainer's write finds it over. Best effort: a failure only loses the head start.
pub fn start_grace_period() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static IN_FLIGHT: AtomicBool = AtomicBool::new(false);
    static OWN_PROCS: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let Some(procs) = OWN_PROCS.get_or_init(own_procs_file) else {
        return;
    };
    if IN_FLIGHT.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("keel-cgroup-gp".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            // "0": the writing task's own thread group, into the cgroup it is in.
            let _ = std::fs::write(procs, "0");
            IN_FLIGHT.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        IN_FLIGHT.store(false, Ordering::Release);
    }
}

/// The `cgroup.procs` of this process's own cgroup in one hierarchy (any: the lock is global).
fn own_procs_file() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    own_procs_candidates(&text)
        .into_iter()
        .find(|p| p.is_file())
}

/// Candidates from `/proc/self/cgroup`: each v1 controller hierarchy, then the v2 one.
fn own_procs_candidates(proc_self_cgroup: &str) -> Vec<PathBuf> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2.push(Path::new(ROOT).join(rel).join("cgroup.procs"));
            v2.push(
                Path::new(ROOT)
                    .join("unified")
                    .join(rel)
                    .join("cgroup.procs"),
            );
        } else if let Some(first) = controllers.split(',').find(|c| !c.starts_with("name=")) {
            v1.push(Path::new(ROOT).join(first).join(rel).join("cgroup.procs"));
        }
    }
    v1.extend(v2);
    v1
}

/// Whether the node uses the unified hierarchy for its controllers.
pub fn is_v2() -> bool {
    matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified))
}

fn manager(cgroups_path: &Path) -> Result<libcgroups::common::AnyCgroupManager, CgroupError> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroups_path.to_owned(),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| CgroupError::Manager {
        path: cgroups_path.to_owned(),
        reason: e.to_string(),
    })
}

fn rel(cgroups_path: &Path) -> &Path {
    cgroups_path.strip_prefix("/").unwrap_or(cgroups_path)
}

/// The directory of `cgroups_path` for a v1 controller (or the v2 directory on v2 hosts).
pub fn dir(cgroups_path: &Path, controller: ControllerType) -> Option<PathBuf> {
    if is_v2() {
        return Some(Path::new(ROOT).join(rel(cgroups_path)));
    }
    libcgroups::v1::util::get_subsystem_mount_point(&controller)
        .ok()
        .map(|m| m.join(rel(cgroups_path)))
}

/// Applies new limits to a running container.
pub fn update(cgroups_path: &Path, resources: &LinuxResources) -> Result<(), CgroupError> {
    let m = manager(cgroups_path)?;
    m.apply(&ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })
    .map_err(|e| CgroupError::Manager {
        path: cgroups_path.to_owned(),
        reason: e.to_string(),
    })
}

/// Kills what is left in the cgroup and removes it in every hierarchy (idempotent).
pub fn remove(cgroups_path: &Path) -> Result<(), CgroupError> {
    // Usually the cgroup is empty by now (the init was reaped): rmdir in each hierarchy is all
    // it takes, without a manager (which walks mountinfo per controller). Anything still in it,
    // or below it, is the manager's to kill and remove.
    let rel = rel(cgroups_path);
    let mut left = false;
    for dir in crate::pod::cgroup::hierarchy_roots()
        .iter()
        .map(|root| root.join(rel))
    {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => left = true,
        }
    }
    if !left {
        return Ok(());
    }
    let m = manager(cgroups_path)?;
    m.remove().map_err(|e| CgroupError::Manager {
        path: cgroups_path.to_owned(),
        reason: e.to_string(),
    })
}

/// Removes the (empty) parent of `cgroups_path` in every hierarchy, so the last container
/// removed leaves no `keel` directory behind. Busy or non-empty parents stay.
pub fn remove_empty_parent(cgroups_path: &Path) {
    let Some(parent) = cgroups_path.parent().filter(|p| *p != Path::new("/")) else {
        return;
    };
    let mut roots: Vec<PathBuf> = Vec::new();
    if is_v2() {
        roots.push(PathBuf::from(ROOT));
    } else if let Ok(points) = libcgroups::v1::util::list_subsystem_mount_points() {
        roots.extend(points);
    }
    for root in roots {
        let _ = std::fs::remove_dir(root.join(rel(parent)));
    }
}

/// Every pid in the container's cgroup.
pub fn pids(cgroups_path: &Path) -> Vec<i32> {
    let Some(d) = dir(cgroups_path, ControllerType::Pids) else {
        return Vec::new();
    };
    std::fs::read_to_string(d.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The value of `key` in a flat keyed file (`key value` lines: memory.events, memory.stat,
/// memory.oom_control, cpu.stat).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Whether the kernel OOM-killed a process of this cgroup.
pub fn oom_killed(cgroups_path: &Path) -> bool {
    let (file, key) = if is_v2() {
        ("memory.events", "oom_kill")
    } else {
        ("memory.oom_control", "oom_kill")
    };
    dir(cgroups_path, ControllerType::Memory)
        .and_then(|d| std::fs::read_to_string(d.join(file)).ok())
        .and_then(|t| keyed(&t, key))
        .is_some_and(|n| n > 0)
}

/// Usage counters for stats.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupStats {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_usage_ns: u64,
    pub memory_usage_bytes: u64,
    /// Usage minus inactive file cache (what kubelet evicts on).
    pub memory_working_set_bytes: u64,
    pub pids: u64,
}

fn read(dir: Option<PathBuf>, file: &str) -> Option<String> {
    std::fs::read_to_string(dir?.join(file)).ok()
}

fn number(text: Option<String>) -> u64 {
    text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Reads the counters; missing files count as zero (a controller the host lacks).
pub fn stats(cgroups_path: &Path) -> CgroupStats {
    let p = cgroups_path;
    let (cpu, usage, inactive) = if is_v2() {
        let d = dir(p, ControllerType::Memory);
        let cpu = read(d.clone(), "cpu.stat")
            .and_then(|t| keyed(&t, "usage_usec"))
            .unwrap_or(0)
            * 1000;
        let usage = number(read(d.clone(), "memory.current"));
        let inactive = read(d, "memory.stat").and_then(|t| keyed(&t, "inactive_file"));
        (cpu, usage, inactive)
    } else {
        let cpu = number(read(dir(p, ControllerType::CpuAcct), "cpuacct.usage"));
        let md = dir(p, ControllerType::Memory);
        let usage = number(read(md.clone(), "memory.usage_in_bytes"));
        let inactive = read(md, "memory.stat").and_then(|t| keyed(&t, "total_inactive_file"));
        (cpu, usage, inactive)
    };
    CgroupStats {
        cpu_usage_ns: cpu,
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage.saturating_sub(inactive.unwrap_or(0)),
        pids: number(read(dir(p, ControllerType::Pids), "pids.current")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_candidates_cover_v1_and_v2() {
        let hybrid = "9:name=systemd:/\n8:pids:/user.slice\n4:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            own_procs_candidates(hybrid),
            [
                "/sys/fs/cgroup/pids/user.slice/cgroup.procs",
                "/sys/fs/cgroup/cpu/cgroup.procs",
                "/sys/fs/cgroup/cgroup.procs",
                "/sys/fs/cgroup/unified/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            own_procs_candidates("0::/system.slice/keel.service\n"),
            [
                "/sys/fs/cgroup/system.slice/keel.service/cgroup.procs",
                "/sys/fs/cgroup/unified/system.slice/keel.service/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn keyed_files_parse() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(3));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n";
        assert_eq!(keyed(v1, "oom_kill"), Some(0));
        assert_eq!(keyed(v1, "missing"), None);
    }
}
