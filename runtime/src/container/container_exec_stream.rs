//! Streaming exec: runs a command in a running container with its stdin, stdout and stderr
//! piped to the caller, or on a terminal whose master the caller gets (CRI Exec, served by
//! keel-cri's streaming server; `keel ctr exec -it`), instead of collecting the output as
//! exec-sync does. The command is started by the same helper as exec-sync
//! (`container_exec.rs`); only the helper's stdin and stdout differ.
//!
//! A command that ignores its closed stdin runs on after the caller went away, as with
//! exec-sync without a timeout; on a terminal, closing the master hangs it up (SIGHUP).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use super::container_exec::take_helper_status;
use super::tty::recv_fd;
use super::{ContainerError, ContainerRuntime};

/// How an exec's stdio is connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecIo {
    /// The caller writes the command's stdin (else it reads /dev/null).
    pub stdin: bool,
    /// The command runs on a terminal: [`ExecProcess::pty`] is its master, which carries
    /// stdin and the merged stdout/stderr.
    pub tty: bool,
}

/// A running streaming exec: take the pipes (or the terminal), then [`ExecProcess::wait`].
/// Dropping the stdin end closes the command's stdin.
#[derive(Debug)]
pub struct ExecProcess {
    id: String,
    helper: Child,
    status_file: std::path::PathBuf,
    /// The command's stdin (None when not asked for, or with a tty).
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    /// With a tty: the terminal's master (read: the command's output; write: its input;
    /// [`resize_terminal`] sizes it).
    pub pty: Option<OwnedFd>,
}

impl ContainerRuntime {
    /// Starts `cmd` in the running container `id`, connected as `io` says.
    /// [`ExecProcess::wait`] answers its exit code.
    pub fn exec_stream(
        &self,
        id: &str,
        cmd: &[String],
        io: ExecIo,
    ) -> Result<ExecProcess, ContainerError> {
        let err = |reason: String| ContainerError::Exec {
            id: id.to_string(),
            reason,
        };
        let input = if io.stdin && !io.tty {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let (ours, theirs) = if io.tty {
            let (a, b) = UnixStream::pair().map_err(|e| err(format!("socket pair: {e}")))?;
            (Some(a), Some(OwnedFd::from(b)))
        } else {
            (None, None)
        };
        let (mut helper, status_file) = self.spawn_exec_helper(id, cmd, None, input, theirs)?;
        let pty = match ours {
            None => None,
            Some(sock) => {
                let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
                match recv_fd(sock.as_fd()) {
                    Ok(master) => Some(master),
                    Err(e) => {
                        // The helper failed before the terminal existed: its status says why.
                        let _ = helper.wait();
                        let why = take_helper_status(&status_file)
                            .and_then(|s| s.error)
                            .unwrap_or_else(|| format!("no terminal from the exec helper: {e}"));
                        return Err(err(why));
                    }
                }
            }
        };
        Ok(ExecProcess {
            id: id.to_string(),
            stdin: helper.stdin.take(),
            stdout: helper.stdout.take(),
            stderr: helper.stderr.take(),
            pty,
            helper,
            status_file,
        })
    }
}

impl ExecProcess {
    /// Waits for the command to exit and answers its exit code (128 + signal when killed).
    /// Blocking. The terminal (when there is one) stays open for the caller to drain.
    pub fn wait(mut self) -> Result<i32, ContainerError> {
        drop(self.stdin.take());
        let err = |reason: String| ContainerError::Exec {
            id: self.id.clone(),
            reason,
        };
        let status = self
            .helper
            .wait()
            .map_err(|e| err(format!("wait helper: {e}")))?;
        let result = take_helper_status(&self.status_file)
            .ok_or_else(|| err(format!("helper exited with {status} and no status")))?;
        match result.error {
            Some(e) => Err(err(e)),
            None => Ok(result.exit_code),
        }
    }
}

/// `TIOCSWINSZ` on a terminal (master or slave) fd.
pub fn resize_terminal(fd: &impl AsRawFd, cols: u16, rows: u16) -> std::io::Result<()> {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    let r = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
