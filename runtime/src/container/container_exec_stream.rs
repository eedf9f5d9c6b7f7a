//! Streaming exec: runs a command in a running container with its stdin, stdout and stderr
//! piped to the caller (CRI Exec, served by keel-cri's streaming server), instead of
//! collecting the output as exec-sync does. The command is started by the same helper as
//! exec-sync (`container_exec.rs`); only the helper's stdin differs (a pipe, not /dev/null).
//!
//! Not yet: a terminal (tty) for the command. A command that ignores its closed stdin runs on
//! after the caller went away, as with exec-sync without a timeout.

use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Stdio};

use super::container_exec::take_helper_status;
use super::{ContainerError, ContainerRuntime};

/// A running streaming exec: take the pipes, then [`ExecProcess::wait`]. Dropping the stdin
/// end closes the command's stdin.
#[derive(Debug)]
pub struct ExecProcess {
    id: String,
    helper: Child,
    status_file: std::path::PathBuf,
    /// The command's stdin (None when not asked for: it reads /dev/null).
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl ContainerRuntime {
    /// Starts `cmd` in the running container `id`; with `stdin` false the command reads
    /// /dev/null. [`ExecProcess::wait`] answers its exit code.
    pub fn exec_stream(
        &self,
        id: &str,
        cmd: &[String],
        stdin: bool,
    ) -> Result<ExecProcess, ContainerError> {
        let input = if stdin { Stdio::piped() } else { Stdio::null() };
        let (mut helper, status_file) = self.spawn_exec_helper(id, cmd, None, input)?;
        Ok(ExecProcess {
            id: id.to_string(),
            stdin: helper.stdin.take(),
            stdout: helper.stdout.take(),
            stderr: helper.stderr.take(),
            helper,
            status_file,
        })
    }
}

impl ExecProcess {
    /// Waits for the command to exit and answers its exit code (128 + signal when killed).
    /// Blocking.
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
