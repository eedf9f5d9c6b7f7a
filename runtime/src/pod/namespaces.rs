//! The pod module's one door to the kernel for namespaces: creating network, IPC and UTS
//! namespaces and pinning them by bind mounts of their nsfs files (what CRI-O's `pinns`
//! does), unpinning them, running code inside pinned namespaces (sysctls), and the pod's
//! /dev/shm tmpfs.
//!
//! Namespaces are made in a short-lived thread of its own: `unshare` and `setns` of these
//! kinds change only the calling thread, so the caller's threads (a tokio runtime, ...) never
//! change namespace, and the thread's end drops its hold: the pins alone keep the namespaces.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

use super::sysctl::{Sysctl, SysctlNamespace};
use crate::container::sys;

/// A namespace kind a pod pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsKind {
    Net,
    Ipc,
    Uts,
    Pid,
}

impl NsKind {
    pub const ALL: [NsKind; 4] = [NsKind::Net, NsKind::Ipc, NsKind::Uts, NsKind::Pid];

    /// The name in /proc/<pid>/ns/ and of the pin file.
    pub fn name(self) -> &'static str {
        match self {
            NsKind::Net => "net",
            NsKind::Ipc => "ipc",
            NsKind::Uts => "uts",
            NsKind::Pid => "pid",
        }
    }

    fn flag(self) -> CloneFlags {
        match self {
            NsKind::Net => CloneFlags::CLONE_NEWNET,
            NsKind::Ipc => CloneFlags::CLONE_NEWIPC,
            NsKind::Uts => CloneFlags::CLONE_NEWUTS,
            NsKind::Pid => CloneFlags::CLONE_NEWPID,
        }
    }
}

fn annotate(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Bind-mounts the namespace file `source` (`/proc/<pid>/ns/<kind>`) onto `target`, which is
/// created as an empty file. On failure nothing is left at `target`.
pub fn pin(source: &Path, target: &Path) -> io::Result<()> {
    File::options()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(annotate(format!("create pin {}", target.display())))?;
    let r = rustix::mount::mount_bind(source, target).map_err(|e| {
        annotate(format!("bind {} on {}", source.display(), target.display()))(e.into())
    });
    if r.is_err() {
        let _ = std::fs::remove_file(target);
    }
    r
}

/// Unmounts a pin and removes its file. A missing pin is success.
pub fn unpin(target: &Path) -> io::Result<()> {
    sys::unmount(target).map_err(annotate(format!("unmount pin {}", target.display())))?;
    match std::fs::remove_file(target) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(annotate(format!("remove pin {}", target.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Creates new namespaces of `kinds` (net, ipc, uts; not pid), brings loopback up in a new
/// network namespace, sets `hostname` in a new UTS namespace, and pins each kind at
/// `pin_path(kind)`. On failure every pin made is removed again.
pub fn create_pinned(
    kinds: &[NsKind],
    hostname: Option<&str>,
    pin_path: &dyn Fn(NsKind) -> PathBuf,
) -> io::Result<()> {
    if kinds.is_empty() {
        return Ok(());
    }
    let mut flags = CloneFlags::empty();
    for k in kinds {
        if *k == NsKind::Pid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a PID namespace needs a process to live in; see keeper.rs",
            ));
        }
        flags |= k.flag();
    }
    let targets: Vec<(NsKind, PathBuf)> = kinds.iter().map(|k| (*k, pin_path(*k))).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(flags).map_err(|e| annotate("unshare".into())(e.into()))?;
            if kinds.contains(&NsKind::Net) {
                loopback_up().map_err(annotate("bring loopback up".into()))?;
            }
            if let Some(h) = hostname.filter(|_| kinds.contains(&NsKind::Uts)) {
                rustix::system::sethostname(h.as_bytes())
                    .map_err(|e| annotate(format!("sethostname {h:?}"))(e.into()))?;
            }
            let mut done: Vec<PathBuf> = Vec::new();
            for (k, target) in &targets {
                let source = PathBuf::from(format!("/proc/thread-self/ns/{}", k.name()));
                if let Err(e) = pin(&source, target) {
                    for p in &done {
                        let _ = unpin(p);
                    }
                    return Err(e);
                }
                done.push(target.clone());
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Runs `f` in a fresh thread that has joined the namespaces pinned at the given paths.
pub fn in_namespaces<T: Send>(
    pins: &[(NsKind, &Path)],
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            for (kind, path) in pins {
                let fd = File::open(path).map_err(annotate(format!("open {}", path.display())))?;
                nix::sched::setns(fd.as_fd(), kind.flag())
                    .map_err(|e| annotate(format!("setns {}", path.display()))(e.into()))?;
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Writes each sysctl inside the namespace it belongs to (pinned at `pin(kind)`).
pub fn apply_sysctls(plan: &[Sysctl], pin: &dyn Fn(NsKind) -> PathBuf) -> io::Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    let kind = |ns: SysctlNamespace| match ns {
        SysctlNamespace::Net => NsKind::Net,
        SysctlNamespace::Ipc => NsKind::Ipc,
        SysctlNamespace::Uts => NsKind::Uts,
    };
    let mut kinds: Vec<NsKind> = plan.iter().map(|s| kind(s.namespace)).collect();
    kinds.sort_by_key(|k| k.name());
    kinds.dedup();
    let paths: Vec<(NsKind, PathBuf)> = kinds.iter().map(|k| (*k, pin(*k))).collect();
    let refs: Vec<(NsKind, &Path)> = paths.iter().map(|(k, p)| (*k, p.as_path())).collect();
    in_namespaces(&refs, || {
        for s in plan {
            let file = Path::new("/proc/sys").join(&s.path);
            std::fs::write(&file, s.value.as_bytes())
                .map_err(annotate(format!("sysctl {}={:?}", s.name, s.value)))?;
        }
        Ok(())
    })
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; ifru_flags is the
    // union member these requests use.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Mounts the pod's /dev/shm (a tmpfs its containers share with the IPC namespace).
pub fn mount_shm(target: &Path) -> io::Result<()> {
    use rustix::mount::MountFlags;
    std::fs::create_dir_all(target).map_err(annotate(format!("create {}", target.display())))?;
    rustix::mount::mount(
        "shm",
        target,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(c"mode=1777,size=65536k"),
    )
    .map_err(|e| annotate(format!("mount tmpfs on {}", target.display()))(e.into()))
}
