//! The PID namespace keeper of a pod that shares one PID namespace between its containers.
//!
//! A PID namespace dies with its init, so a bind mount cannot keep it usable the way it keeps
//! network, IPC and UTS namespaces. Instead of a pause image, the keel binary re-executes
//! itself as `keel __pod-pid`: it unshares a PID namespace, forks, and the child is the
//! namespace's init. That child detaches (setsid, stdio on /dev/null), blocks every signal
//! and loops on `sigwaitinfo`: it reaps the orphans of the pod's containers (what pause does)
//! and exits on SIGTERM/SIGINT. Killing it kills every process of the namespace.
//!
//! It must stay tiny: no allocations in the loop, no threads, no logging.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use crate::container::sys::ProcessId;

/// First argument of a keeper invocation.
pub const KEEPER_ARG: &str = "__pod-pid";

/// The keeper's entry (no arguments). Prints `ok <host pid of the namespace's init>`.
pub fn main(_args: &[String]) -> i32 {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID) {
        println!("error: unshare pid namespace: {e}");
        return 1;
    }
    // SAFETY: this process was just exec'd and has spawned no thread.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ok {child}");
            let _ = out.flush();
            0
        }
        Ok(nix::unistd::ForkResult::Child) => init(),
        Err(e) => {
            println!("error: fork: {e}");
            1
        }
    }
}

fn init() -> i32 {
    let _ = nix::unistd::setsid();
    if let Ok(null) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = std::env::set_current_dir("/");
    let all = SigSet::all();
    let _ = all.thread_block();
    loop {
        match all.wait() {
            Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => return 0,
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Starts a keeper with `exe` and returns the identity of the namespace's init.
pub fn spawn(exe: &Path) -> Result<ProcessId, String> {
    let mut child = Command::new(exe)
        .arg(KEEPER_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        // EOF once the forking parent has exited (the init keeps /dev/null, not the pipe).
        let _ = stdout.read_to_string(&mut out);
    }
    let _ = child.wait();
    let line = out.lines().next().unwrap_or("").trim();
    let pid: i32 = line
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            if line.is_empty() {
                "keeper exited without reporting".to_string()
            } else {
                line.trim_start_matches("error: ").to_string()
            }
        })?;
    ProcessId::of(pid).map_err(|e| format!("keeper pid {pid}: {e}"))
}
