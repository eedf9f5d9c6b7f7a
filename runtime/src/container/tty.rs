//! Terminals: the console socket libcontainer's init sends a pseudo-terminal's master to (for
//! an exec with a tty, `container_exec.rs`, and a container created with one, the monitor), and
//! passing that master on over a unix socket (`SCM_RIGHTS`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The unix socket libcontainer's init sends the terminal's master to. Bound under a short
/// relative name in `dir` (a socket path may not exceed 107 bytes; a container directory may
/// be longer), then given to libcontainer by its full path. Only for single-threaded callers
/// (the exec helper, the monitor): binding changes the process's directory for a moment.
pub(super) struct ConsoleSocket {
    listener: std::os::unix::net::UnixListener,
    pub(super) path: PathBuf,
}

impl ConsoleSocket {
    pub(super) fn bind(dir: &Path) -> Result<ConsoleSocket, String> {
        let name = format!("tty-{:08x}.sock", rand::random::<u32>());
        let listener = bind_in(dir, &name)?;
        Ok(ConsoleSocket {
            listener,
            path: dir.join(name),
        })
    }

    /// The master the init sent (it did before libcontainer's `build` returned; a short wait
    /// covers a lost race all the same).
    pub(super) fn receive(&self) -> Result<OwnedFd, String> {
        let _ = self.listener.set_nonblocking(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("the container sent no terminal within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("console socket: {e}")),
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        recv_fd(stream.as_fd()).map_err(|e| format!("receive the terminal: {e}"))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a unix listener at `dir/name` through a relative name (see [`ConsoleSocket`]).
pub(super) fn bind_in(dir: &Path, name: &str) -> Result<std::os::unix::net::UnixListener, String> {
    let prev = std::env::current_dir().map_err(|e| format!("current dir: {e}"))?;
    std::env::set_current_dir(dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
    let bound = std::os::unix::net::UnixListener::bind(name);
    let _ = std::env::set_current_dir(prev);
    bound.map_err(|e| format!("socket {name} in {}: {e}", dir.display()))
}

/// Sends `fd` over the unix socket `sock` (a raw descriptor number the caller owns).
pub(super) fn send_fd(sock: i32, fd: OwnedFd) -> Result<(), String> {
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"pty")];
    nix::sys::socket::sendmsg::<()>(
        sock,
        &iov,
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("send the terminal to the caller: {e}"))
}

/// Receives one fd sent with `SCM_RIGHTS` on `sock`.
pub(super) fn recv_fd(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed `fd` in this process for us; nobody else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "no file descriptor in the message (the sender went away)",
    ))
}
