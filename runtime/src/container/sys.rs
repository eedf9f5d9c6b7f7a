//! The container module's one door to the kernel for what libcontainer does not do for it:
//! process identity (pid + start time, so a reused pid is never signalled), signals, waits,
//! mounts and oom_score_adj. Everything else in the module calls these functions, so the
//! decisions around them stay testable.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// A process identified by pid and its start time (clock ticks since boot, from
/// /proc/<pid>/stat field 22), which together never name two processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// Parses field 22 (starttime) of a /proc/<pid>/stat line; the command name may hold spaces
/// and parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // after ")" come fields 3.. ; starttime is field 22 -> index 19 here.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process state (field 3) is zombie.
fn is_zombie(stat: &str) -> bool {
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|s| s == "Z" || s == "X")
}

impl ProcessId {
    /// The identity of a live process.
    pub fn of(pid: i32) -> io::Result<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let start_time = parse_start_time(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc stat"))?;
        Ok(ProcessId { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a newer process with its pid).
    pub fn is_alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => parse_start_time(&stat) == Some(self.start_time) && !is_zombie(&stat),
            Err(_) => false,
        }
    }

    /// Sends `sig` if the process is still this one. Uses a pidfd so the check and the signal
    /// apply to the same process. Returns false when it is gone.
    pub fn signal(&self, sig: i32) -> io::Result<bool> {
        let Some(pid) = Pid::from_raw(self.pid) else {
            return Ok(false);
        };
        let fd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if !self.is_alive() {
            return Ok(false);
        }
        let sig = to_signal(sig)?;
        match rustix::process::pidfd_send_signal(&fd, sig) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl ProcessId {
    /// Blocks until this process has exited (a zombie counts as exited; a newer process with
    /// its pid is not it) or `timeout` passes; true once it is gone. Waits on a pidfd opened
    /// before the identity check, so a reused pid cannot fool it; where the kernel lacks
    /// pidfd (before 5.3) it rechecks every few milliseconds.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Some(pid) = Pid::from_raw(self.pid) else {
            return true;
        };
        match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Err(rustix::io::Errno::SRCH) => return true,
            Ok(fd) => {
                if !self.is_alive() {
                    return true;
                }
                if let Some(gone) = poll_readable(fd.as_fd(), deadline) {
                    return gone || !self.is_alive();
                }
            }
            Err(_) => {}
        }
        loop {
            if !self.is_alive() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_millis(5)));
        }
    }
}

/// Polls `fd` for readability until `deadline`: `Some(true)` when readable, `Some(false)` at
/// the deadline, `None` when poll itself fails.
fn poll_readable(fd: std::os::fd::BorrowedFd<'_>, deadline: Instant) -> Option<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up: a zero timeout before the deadline would spin.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) if Instant::now() >= deadline => return Some(false),
            Ok(0) => {}
            Ok(_) => return Some(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

fn to_signal(sig: i32) -> io::Result<Signal> {
    Signal::from_named_raw(sig).ok_or_else(|| io::Error::from(rustix::io::Errno::INVAL))
}

/// Parses a signal name (`TERM`, `SIGTERM`, `sigkill`) or number.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::from_named_raw(n).map(|_| n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    nix::sys::signal::Signal::iterator()
        .find(|sig| sig.as_str().strip_prefix("SIG") == Some(name))
        .map(|sig| sig as i32)
}

/// The current process's oom_score_adj.
pub fn current_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Mounts an overlay at `target` with `options` (see [`super::rootfs::overlay_options`]).
pub fn mount_overlay(target: &Path, options: &str) -> io::Result<()> {
    let data =
        std::ffi::CString::new(options).map_err(|_| io::Error::from(rustix::io::Errno::INVAL))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        rustix::mount::MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .map_err(io::Error::from)
}

/// Unmounts `target`; a busy mount is detached. Not mounted is success.
pub fn unmount(target: &Path) -> io::Result<()> {
    use rustix::mount::UnmountFlags;
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                .map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is a mount point according to /proc/self/mountinfo.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == want)
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Hugepage sizes the host offers, in the OCI form (`2MB`, `1GB`).
pub fn hugepage_sizes() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/kernel/mm/hugepages") else {
        return Vec::new();
    };
    let mut sizes: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: u64 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            Some(if kb >= 1 << 20 {
                format!("{}GB", kb >> 20)
            } else if kb >= 1 << 10 {
                format!("{}MB", kb >> 10)
            } else {
                format!("{kb}KB")
            })
        })
        .collect();
    sizes.sort();
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_skips_odd_names() {
        let stat =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert!(!is_zombie(stat));
        assert!(is_zombie("5 (x) Z 1"));
    }

    #[test]
    fn own_process_is_alive_and_signals_parse() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("kill"), Some(9));
        assert_eq!(parse_signal("10"), Some(10));
        assert_eq!(parse_signal("NOPE"), None);
    }

    #[test]
    fn wait_gone_sees_exit_and_times_out() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.05")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id() as i32).unwrap();
        assert!(!id.wait_gone(Duration::from_millis(1)));
        let start = Instant::now();
        assert!(id.wait_gone(Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(2));
        child.wait().unwrap();
        // Reaped: the pid is free, the identity is gone.
        assert!(id.wait_gone(Duration::ZERO));
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(other.wait_gone(Duration::from_secs(5)));
    }
}
