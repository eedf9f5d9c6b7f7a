//! exec-sync: runs a command in a running container and returns its output and exit code,
//! killing it when the timeout passes.
//!
//! libcontainer forks without the atfork handlers a multi-threaded caller would need, so the
//! tenant process is started by a short-lived helper, the keel binary re-executed as
//! `keel __exec <run dir> <bundle> <id> <timeout ms> <status file> <tty|-> -- CMD...`. The
//! command runs with the container's own process settings (env, user, cwd, capabilities,
//! rlimits: the init's `process` with other args, as containerd's exec does). Without a tty
//! the helper's stdin/stdout/stderr are the command's. With a tty, libcontainer's init opens a
//! pseudo-terminal in the container's devpts (its controlling terminal) and sends the master
//! over a console socket the helper listens on; the helper passes that master on to its
//! caller over its stdout, a unix socket (`SCM_RIGHTS`). Either way the helper reports exit
//! code and timeout in the status file. The streaming exec (`container_exec_stream.rs`)
//! starts the same helper with pipes or a tty.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use super::state::{read_json, write_json};
use super::tty::{ConsoleSocket, send_fd};
use super::{ContainerError, ContainerRuntime, Status};

/// First argument of an exec helper invocation.
pub const EXEC_ARG: &str = "__exec";

/// The outcome of an exec-sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct HelperStatus {
    pub(super) exit_code: i32,
    pub(super) timed_out: bool,
    pub(super) error: Option<String>,
}

/// Cap on captured output per stream (what CRI's ExecSync allows).
const MAX_OUTPUT: usize = 16 << 20;

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut b) = out.lock()
                && b.len() < MAX_OUTPUT
            {
                b.extend_from_slice(&chunk[..n]);
            }
        }
    });
    buf
}

fn take(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<u8> {
    buf.lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default()
}

impl ContainerRuntime {
    /// Runs `cmd` in the running container `id`. `timeout` None waits forever.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecResult, ContainerError> {
        let (mut child, status_file) =
            self.spawn_exec_helper(id, cmd, timeout, Stdio::null(), None)?;
        let err = |reason: String| ContainerError::Exec {
            id: id.to_string(),
            reason,
        };
        let out = child.stdout.take().map(collect);
        let errb = child.stderr.take().map(collect);
        let status = child.wait().map_err(|e| err(format!("wait helper: {e}")))?;
        let result = take_helper_status(&status_file);
        // Background processes of the command may keep the pipes open: give the readers a
        // moment to drain, then take what they have.
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline
            && (out.as_ref().is_some_and(|b| Arc::strong_count(b) > 1)
                || errb.as_ref().is_some_and(|b| Arc::strong_count(b) > 1))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let result =
            result.ok_or_else(|| err(format!("helper exited with {status} and no status")))?;
        if let Some(e) = result.error {
            return Err(err(e));
        }
        Ok(ExecResult {
            exit_code: result.exit_code,
            stdout: out.as_ref().map(take).unwrap_or_default(),
            stderr: errb.as_ref().map(take).unwrap_or_default(),
            timed_out: result.timed_out,
        })
    }
}

impl ContainerRuntime {
    /// Starts the exec helper for `cmd` in the running container `id`, its stdin `stdin` (the
    /// command gets the helper's stdin) and its stderr piped. Its stdout is piped too, or, with
    /// `tty` (our end of a socket pair), that socket's other end: the helper then runs the
    /// command on a terminal and sends its master there. Returns the helper and the status
    /// file it writes; [`take_helper_status`] reads it once the helper exited.
    pub(super) fn spawn_exec_helper(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
        stdin: Stdio,
        tty: Option<OwnedFd>,
    ) -> Result<(std::process::Child, PathBuf), ContainerError> {
        let info = self.status(id)?;
        if info.status != Status::Running {
            return Err(ContainerError::InvalidState {
                id: id.to_string(),
                op: "exec in",
                status: info.status.to_string(),
            });
        }
        let err = |reason: String| ContainerError::Exec {
            id: id.to_string(),
            reason,
        };
        if cmd.is_empty() {
            return Err(err("empty command".into()));
        }
        let status_file = self
            .paths
            .dir(id)
            .join(format!("exec-{:08x}.json", rand::random::<u32>()));
        let exe = self.monitor_exe()?;
        // The helper's libcontainer moves it into the container's cgroups.
        super::cgroups::start_grace_period();
        let timeout_ms = timeout.map(|t| t.as_millis().max(1) as u64).unwrap_or(0);
        let child = Command::new(&exe)
            .arg(EXEC_ARG)
            .arg(&self.paths.run)
            .arg(self.paths.bundle(id).join("config.json"))
            .arg(id)
            .arg(timeout_ms.to_string())
            .arg(&status_file)
            .arg(if tty.is_some() { "tty" } else { "-" })
            .arg("--")
            .args(cmd)
            .stdin(stdin)
            .stdout(tty.map(Stdio::from).unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", exe.display())))?;
        Ok((child, status_file))
    }
}

/// What the helper reported in `status_file` (None: it wrote nothing), removing the file.
pub(super) fn take_helper_status(status_file: &Path) -> Option<HelperStatus> {
    let result: Option<HelperStatus> = read_json(status_file).ok().flatten();
    let _ = std::fs::remove_file(status_file);
    result
}

/// The helper's entry (see the module doc). Returns its exit code.
pub fn helper_main(args: &[String]) -> i32 {
    let (
        Some(run),
        Some(spec),
        Some(id),
        Some(timeout),
        Some(status_file),
        Some(tty @ ("tty" | "-")),
        Some("--"),
    ) = (
        args.first(),
        args.get(1),
        args.get(2),
        args.get(3).and_then(|t| t.parse::<u64>().ok()),
        args.get(4),
        args.get(5).map(String::as_str),
        args.get(6).map(String::as_str),
    )
    else {
        eprintln!("usage: keel {EXEC_ARG} RUN_DIR SPEC ID TIMEOUT_MS STATUS_FILE tty|- -- CMD...");
        return 2;
    };
    let cmd = args[7..].to_vec();
    let status_file = PathBuf::from(status_file);
    let helper = Helper {
        run: Path::new(run),
        spec: Path::new(spec),
        id,
        timeout_ms: timeout,
        status_file: &status_file,
        tty: tty == "tty",
    };
    let status = match helper.run(cmd) {
        Ok(s) => s,
        Err(e) => HelperStatus {
            error: Some(e),
            ..Default::default()
        },
    };
    match write_json(&status_file, &status) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("exec helper: {e}");
            1
        }
    }
}

fn dup(fd: i32) -> Result<OwnedFd, String> {
    // SAFETY: fds 0, 1 and 2 are open for the whole life of the helper; dup gives an owned copy.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed
        .try_clone_to_owned()
        .map_err(|e| format!("dup fd {fd}: {e}"))
}

/// One exec as the helper runs it.
struct Helper<'a> {
    run: &'a Path,
    spec: &'a Path,
    id: &'a str,
    timeout_ms: u64,
    status_file: &'a Path,
    tty: bool,
}

impl Helper<'_> {
    /// The container's process with `cmd` as its args (and a terminal with `tty`), written
    /// beside the status file for libcontainer to read.
    fn process_file(&self, cmd: Vec<String>) -> Result<PathBuf, String> {
        let spec =
            oci_spec::runtime::Spec::load(self.spec).map_err(|e| format!("load spec: {e}"))?;
        let mut process = spec.process().clone().ok_or("the spec has no process")?;
        process.set_args(Some(cmd));
        process.set_terminal(Some(self.tty));
        process.set_console_size(None);
        if self.tty {
            let env = process.env().clone().unwrap_or_default();
            if !env.iter().any(|e| e.starts_with("TERM=")) {
                let mut env = env;
                env.push("TERM=xterm".into());
                process.set_env(Some(env));
            }
        }
        let path = self.status_file.with_extension("process.json");
        let data = serde_json::to_vec(&process).map_err(|e| format!("process: {e}"))?;
        std::fs::write(&path, data).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path)
    }

    fn run(&self, cmd: Vec<String>) -> Result<HelperStatus, String> {
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let process = self.process_file(cmd)?;
        let result = self.start(&process);
        let _ = std::fs::remove_file(&process);
        let pid = result?;
        self.wait(pid)
    }

    /// Starts the command; with a tty, hands its terminal's master to the caller.
    fn start(&self, process: &Path) -> Result<nix::unistd::Pid, String> {
        // The helper's own stdin: /dev/null for exec-sync, a pipe for a streaming exec.
        let mut builder = ContainerBuilder::new(self.id.to_string(), SyscallType::default())
            .with_root_path(self.run)
            .map_err(|e| format!("run dir: {e}"))?;
        let console = if self.tty {
            let dir = self
                .status_file
                .parent()
                .ok_or("status file has no directory")?;
            let console = ConsoleSocket::bind(dir)?;
            builder = builder.with_console_socket(Some(&console.path));
            Some(console)
        } else {
            builder = builder
                .with_stdin(dup(0)?)
                .with_stdout(dup(1)?)
                .with_stderr(dup(2)?);
            None
        };
        // The container's seccomp filter, compiled by the runtime, beside its spec.
        let bundle = self.spec.parent().ok_or("the spec path has no directory")?;
        if let Some(install) = super::seccomp_bpf::Install::read(bundle)? {
            builder = builder.with_executor(super::seccomp_bpf::FilterExecutor::new(install));
        }
        let pid = builder
            .as_tenant()
            .with_process(Some(process))
            .with_detach(self.tty)
            .as_sibling(false)
            .build()
            .map_err(|e| format!("exec: {e}"))?;
        if let Some(console) = console {
            let master = console.receive();
            if let Err(e) = master.and_then(|m| send_fd(1, m)) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
                return Err(e);
            }
        }
        Ok(pid)
    }

    /// Waits for the command (killing it when the timeout passes) and answers its status.
    fn wait(&self, pid: nix::unistd::Pid) -> Result<HelperStatus, String> {
        let fd = rustix::process::Pid::from_raw(pid.as_raw())
            .ok_or("bad pid")
            .and_then(|p| {
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                    .map_err(|_| "pidfd_open")
            })
            .map_err(|e| e.to_string())?;
        let timeout_ms = self.timeout_ms;
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
        let mut timed_out = false;
        loop {
            let wait_ms: i32 = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        timed_out = true;
                        let _ =
                            rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
                        break;
                    }
                    left.as_millis().min(i32::MAX as u128) as i32
                }
                None => -1,
            };
            let timeout = if wait_ms < 0 {
                nix::poll::PollTimeout::NONE
            } else {
                nix::poll::PollTimeout::try_from(wait_ms).unwrap_or(nix::poll::PollTimeout::MAX)
            };
            let mut pfd = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pfd, timeout) {
                Ok(n) if n > 0 => break,
                _ => continue,
            }
        }
        let status = nix::sys::wait::waitpid(pid, None).map_err(|e| format!("wait: {e}"))?;
        let exit_code = match status {
            nix::sys::wait::WaitStatus::Exited(_, c) => c,
            nix::sys::wait::WaitStatus::Signaled(_, s, _) => 128 + s as i32,
            _ => 255,
        };
        Ok(HelperStatus {
            exit_code,
            timed_out,
            error: None,
        })
    }
}
