//! Attach: the stdio of a container created with `stdin` or `tty`, live. Its monitor keeps the
//! write end of the container's stdin (or the terminal's master) and listens on
//! `<container dir>/attach.sock`; every attached client gets what the container writes from
//! then on and may write its stdin, close it, and size its terminal. (The CRI log is written
//! all the same.) Containers created without either have no socket: their output is the log.
//!
//! The socket speaks frames: one kind byte, a 4-byte big-endian length, the data.
//! Client to monitor: [`STDIN`] data, [`CLOSE_STDIN`], [`RESIZE`] (columns then rows, two
//! big-endian u16s). Monitor to client: [`STDOUT`] / [`STDERR`] data (a terminal's output is
//! stdout). The monitor closes the socket when the container's output ended.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::{ContainerError, ContainerRuntime, Status};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const CLOSE_STDIN: u8 = 3;
pub const RESIZE: u8 = 4;
/// The socket's name in the container's directory.
pub const SOCKET: &str = "attach.sock";
/// Largest frame accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// One frame on the wire.
pub fn frame(kind: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + data.len());
    f.push(kind);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// The resize frame's data.
pub fn size(cols: u16, rows: u16) -> [u8; 4] {
    let (c, r) = (cols.to_be_bytes(), rows.to_be_bytes());
    [c[0], c[1], r[0], r[1]]
}

/// Takes the complete frames at the front of `buf`; Err when one is larger than allowed.
pub fn take_frames(buf: &mut Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 5 {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if len > MAX_FRAME {
            return Err(format!("attach frame of {len} bytes"));
        }
        if buf.len() < at + 5 + len {
            break;
        }
        out.push((buf[at], buf[at + 5..at + 5 + len].to_vec()));
        at += 5 + len;
    }
    buf.drain(..at);
    Ok(out)
}

impl ContainerRuntime {
    /// Connects to the stdio of container `id`, created or running (see the module doc). Err
    /// when it was created without stdin or tty, or has exited.
    pub fn attach(&self, id: &str) -> Result<UnixStream, ContainerError> {
        let info = self.status(id)?;
        let err = |reason: String| ContainerError::Exec {
            id: id.to_string(),
            reason,
        };
        let cfg = &info.record.config;
        if !(cfg.stdin || cfg.tty) {
            return Err(err(
                "created without stdin or tty: there is no live stdio to attach to (its output is the log)".into(),
            ));
        }
        // Created too: attaching before the start misses none of the output.
        if !matches!(info.status, Status::Running | Status::Created) {
            return Err(ContainerError::InvalidState {
                id: id.to_string(),
                op: "attach to",
                status: info.status.to_string(),
            });
        }
        // Through /proc/self/fd: the directory's path may be longer than a socket path may be.
        let dir = std::fs::File::open(self.paths.dir(id))
            .map_err(|e| err(format!("open the container's directory: {e}")))?;
        let path = PathBuf::from(format!("/proc/self/fd/{}/{SOCKET}", dir.as_raw_fd()));
        UnixStream::connect(&path).map_err(|e| err(format!("connect to its monitor: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_whole() {
        let mut buf = frame(STDOUT, b"hello");
        buf.extend(frame(RESIZE, &size(80, 24)));
        buf.extend_from_slice(&frame(STDIN, b"partial")[..6]);
        let got = take_frames(&mut buf).unwrap();
        assert_eq!(
            got,
            vec![(STDOUT, b"hello".to_vec()), (RESIZE, vec![0, 80, 0, 24])]
        );
        assert_eq!(buf.len(), 6);
        let mut huge = vec![STDIN, 0xff, 0xff, 0xff, 0xff];
        assert!(take_frames(&mut huge).is_err());
    }
}
