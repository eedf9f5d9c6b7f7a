//! `keel ctr exec -i` / `-t` / `-it`: an interactive command in a running container. With
//! `-t` the command runs on a terminal of the container's own (keel-runtime's streaming exec
//! with a tty); this terminal is put in raw mode, so every key (^C, ^D, arrows) reaches that
//! terminal, which interprets them as a local one would; its size follows this one's (SIGWINCH).
//! With `-i` only, stdin, stdout and stderr are plain pipes. `keel ctr run -it` and `keel ctr
//! attach` relay the same way to a container created with stdin or a tty ([`relay_attached`]).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use keel_runtime::container::container_attach as attach;
use keel_runtime::container::{ContainerRuntime, ExecIo, resize_terminal};
use nix::sys::termios::{self, SetArg, Termios};

/// How long output may still drain after the command exited (its background children may
/// keep the terminal or the pipes open forever).
const DRAIN: Duration = Duration::from_secs(1);

/// Runs `cmd` in container `id`; answers its exit code.
pub fn interactive(
    rt: &ContainerRuntime,
    id: &str,
    cmd: &[String],
    stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    if tty {
        // Blocked before any thread of ours starts, so the watcher below is the one to get it.
        let winch = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGWINCH);
        let _ = winch.thread_block();
    }
    let mut p = rt.exec_stream(id, cmd, ExecIo { stdin, tty })?;
    let mut drained = Vec::new();
    match p.pty.take() {
        Some(master) => {
            let size = local_size();
            if let Some((cols, rows)) = size {
                let _ = resize_terminal(&master, cols, rows);
            }
            let _raw = RawMode::enter();
            let out = std::fs::File::from(master.try_clone().context("dup the terminal")?);
            drained.push(copy_in_thread(out, std::io::stdout()));
            if size.is_some() {
                let m = master.try_clone().context("dup the terminal")?;
                std::thread::spawn(move || follow_size(m));
            }
            if stdin {
                let input = std::fs::File::from(master);
                std::thread::spawn(move || copy(std::io::stdin(), input));
            }
            let code = p.wait()?;
            wait_drained(drained);
            Ok(code)
        }
        None => {
            if let Some(input) = p.stdin.take() {
                // Dropped at our EOF: the command's stdin closes.
                std::thread::spawn(move || copy(std::io::stdin(), input));
            }
            if let Some(out) = p.stdout.take() {
                drained.push(copy_in_thread(out, std::io::stdout()));
            }
            if let Some(err) = p.stderr.take() {
                drained.push(copy_in_thread(err, std::io::stderr()));
            }
            let code = p.wait()?;
            wait_drained(drained);
            Ok(code)
        }
    }
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() || to.flush().is_err() {
            return;
        }
    }
}

/// Copies on a thread of its own; the receiver hears when it is done.
fn copy_in_thread(
    from: impl Read + Send + 'static,
    to: impl Write + Send + 'static,
) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        copy(from, to);
        let _ = tx.send(());
    });
    rx
}

fn wait_drained(copies: Vec<mpsc::Receiver<()>>) {
    let deadline = std::time::Instant::now() + DRAIN;
    for c in copies {
        let _ = c.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// This terminal's size (columns, rows), when stdout is one.
fn local_size() -> Option<(u16, u16)> {
    let mut ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which lives across the call.
    let r = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Copies this terminal's size to the container's on every SIGWINCH (blocked in every thread
/// of ours, taken here with sigwait).
fn follow_size(master: OwnedFd) {
    let winch = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGWINCH);
    while winch.wait().is_ok() {
        if let Some((cols, rows)) = local_size() {
            let _ = resize_terminal(&master, cols, rows);
        }
    }
}

/// This terminal in raw mode until dropped (nothing when stdin is not a terminal).
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, saved);
        }
    }
}

/// Relays this terminal to an attached container (`sock`, keel-runtime's attach socket)
/// until the container's output ends: stdin (with `stdin`) as stdin frames and its EOF as
/// close-stdin, output frames to stdout and stderr; with `tty`, this terminal in raw mode and
/// its size (now and on SIGWINCH) sent as resize frames.
pub fn relay_attached(sock: UnixStream, stdin: bool, tty: bool) -> anyhow::Result<()> {
    let _raw = tty.then(RawMode::enter);
    if tty {
        if let Some((cols, rows)) = local_size() {
            let _ = (&sock).write_all(&attach::frame(attach::RESIZE, &attach::size(cols, rows)));
        }
        let s = sock.try_clone().context("dup the attach socket")?;
        std::thread::spawn(move || {
            let winch = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGWINCH);
            while winch.wait().is_ok() {
                if let Some((cols, rows)) = local_size() {
                    let f = attach::frame(attach::RESIZE, &attach::size(cols, rows));
                    if (&s).write_all(&f).is_err() {
                        return;
                    }
                }
            }
        });
    }
    if stdin {
        let s = sock.try_clone().context("dup the attach socket")?;
        std::thread::spawn(move || {
            let mut input = std::io::stdin();
            let mut buf = [0u8; 16 << 10];
            while let Ok(n) = input.read(&mut buf) {
                let f = match n {
                    0 => attach::frame(attach::CLOSE_STDIN, &[]),
                    n => attach::frame(attach::STDIN, &buf[..n]),
                };
                if (&s).write_all(&f).is_err() || n == 0 {
                    return;
                }
            }
        });
    }
    let mut sock = sock;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut pending = Vec::new();
    let mut buf = [0u8; 32 << 10];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        for (kind, data) in attach::take_frames(&mut pending).map_err(anyhow::Error::msg)? {
            let w: &mut dyn Write = if kind == attach::STDERR {
                &mut err
            } else {
                &mut out
            };
            w.write_all(&data)?;
            w.flush()?;
        }
    }
}
