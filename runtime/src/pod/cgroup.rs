//! The pod's cgroup: one directory per hierarchy (each mounted v1 controller and the v2
//! tree, pure or hybrid's `unified`), the parent of every container cgroup of the pod
//! (libcgroups creates those below it). Removal takes the directory and anything left below
//! it, deepest first, and fails (naming the directory) if processes still hold one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::PodError;

/// The roots of every cgroup hierarchy with controllers (v1) and of the v2 tree.
pub fn hierarchy_roots() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        let keep = match fstype {
            "cgroup2" => true,
            // Named hierarchies without controllers (name=systemd) are not ours to populate.
            "cgroup" => opts
                .split(',')
                .any(|o| !o.starts_with("name=") && is_controller(o)),
            _ => false,
        };
        if keep {
            roots.push(PathBuf::from(point));
        }
    }
    roots.sort();
    roots.dedup();
    roots
}

fn is_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "pids"
            | "blkio"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "hugetlb"
            | "rdma"
            | "misc"
    )
}

/// Checks a relative cgroup path: no empty, `.` or `..` components.
pub fn validate(path: &str) -> Result<String, PodError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(PodError::InvalidConfig(format!(
            "cgroup parent {path:?}: expected a relative path like kubepods/pod1234"
        )));
    }
    Ok(trimmed.to_string())
}

/// Creates the pod's cgroup in every hierarchy. On v1 cpuset, the new directory gets its
/// parent's cpus and mems (the kernel leaves them empty, and an empty cpuset takes no task).
pub fn create(rel: &str) -> Result<(), PodError> {
    for root in hierarchy_roots() {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).map_err(|e| PodError::Cgroup {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        if root.join("cpuset.cpus").exists() && root.join("cgroup.clone_children").exists() {
            inherit_cpuset(&root, Path::new(rel));
        }
    }
    Ok(())
}

fn inherit_cpuset(root: &Path, rel: &Path) {
    let mut dir = root.to_owned();
    for c in rel.components() {
        let parent = dir.clone();
        dir.push(c);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let mine = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            if mine.trim().is_empty()
                && let Ok(v) = std::fs::read_to_string(parent.join(f))
            {
                let _ = std::fs::write(dir.join(f), v.trim());
            }
        }
    }
}

/// Removes the pod's cgroup (and anything below it) in every hierarchy. Missing is success.
pub fn remove(rel: &str) -> Result<(), PodError> {
    for root in hierarchy_roots() {
        let top = root.join(rel);
        let mut dirs = Vec::new();
        collect(&top, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            remove_dir(&d)?;
        }
    }
    Ok(())
}

/// Removes a cgroup the caller named (kubelet's per-pod `cgroup_parent`): only if nothing else
/// lives in it. Other pods' containers may share a parent the caller gave, and the caller owns
/// the parent itself; a parent with child cgroups or tasks is left alone, never emptied.
pub fn remove_if_unused(rel: &str) -> Result<(), PodError> {
    for root in hierarchy_roots() {
        let dir = root.join(rel);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let has_children = rd
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        let has_tasks = std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| !procs.trim().is_empty());
        if has_children || has_tasks {
            tracing::debug!(cgroup = %dir.display(), "cgroup parent still in use; left in place");
            continue;
        }
        remove_dir(&dir)?;
    }
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    out.push(dir.to_owned());
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&e.path(), out);
        }
    }
}

/// rmdir with a short retry: a cgroup stays busy for a moment after its last task exits.
fn remove_dir(dir: &Path) -> Result<(), PodError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(PodError::Cgroup {
                    path: dir.to_owned(),
                    reason: format!("remove: {e}"),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parents_are_relative_and_clean() {
        assert_eq!(validate("/kubepods/pod1/").unwrap(), "kubepods/pod1");
        for bad in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
