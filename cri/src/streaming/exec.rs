//! Exec over the WebSocket: starts the command through keel-runtime's streaming exec, pumps
//! channel 0 into its stdin and its stdout and stderr out on channels 1 and 2, then sends the
//! exit status on channel 3 and closes. v5 clients close stdin with a CLOSE message; v4
//! clients can only close the whole connection, which closes stdin too.
//!
//! With a tty the command runs on a terminal: channel 0 goes into the terminal's master, what
//! the master yields (stdout and stderr merged, as on any terminal) goes out on channel 1, and
//! channel 4's resize messages (`{"Width":W,"Height":H}`) set the terminal's size. Closing stdin
//! sends the terminal's EOF character (^D), as kubectl's own terminal would.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use keel_runtime::container::{ExecIo, resize_terminal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::Socket;
use super::channel::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use crate::api;
use crate::service::CriService;

/// How long output may still drain after the command exited (its background children may
/// hold the pipes open forever).
const DRAIN: Duration = Duration::from_secs(2);

/// Exec over a WebSocket: the channel messages are the socket's binary messages.
pub(super) async fn serve(svc: Arc<CriService>, req: api::ExecRequest, ws: Socket) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(32);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::binary(m)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(32);
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(d) if in_tx.send(d.to_vec()).await.is_err() => return,
                Message::Close(_) => return,
                _ => {}
            }
        }
    });
    run(svc, req, tx, in_rx).await;
    reader.abort();
    let _ = writer.await;
}

/// Runs the exec: its output and status go out on `tx` as channel messages (channel byte, then
/// data), the client's channel messages come in on `input` (its end: the client left). Returns
/// once the status is sent.
pub(super) async fn run(
    svc: Arc<CriService>,
    req: api::ExecRequest,
    tx: mpsc::Sender<Vec<u8>>,
    input: mpsc::Receiver<Vec<u8>>,
) {
    let containers = svc.containers().clone();
    let (id, cmd) = (req.container_id.clone(), req.cmd.clone());
    let io = ExecIo {
        stdin: req.stdin,
        tty: req.tty,
    };
    let started = tokio::task::spawn_blocking(move || containers.exec_stream(&id, &cmd, io))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let mut process = match started {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "exec failed to start");
            let _ = tx
                .send(channel::frame(ERROR, &channel::error_status(&e)))
                .await;
            return;
        }
    };

    let (stdin_sink, out, err) = match process.pty.take() {
        Some(master) => {
            let master = match Terminal::new(master) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    let _ = tx
                        .send(channel::frame(ERROR, &channel::error_status(&e)))
                        .await;
                    return;
                }
            };
            let out = tokio::spawn(pump_terminal(Arc::clone(&master), tx.clone()));
            let input = Input::Terminal {
                master,
                stdin: req.stdin,
            };
            (input, out, tokio::spawn(async {}))
        }
        None => {
            let stdin = process
                .stdin
                .take()
                .and_then(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)).ok());
            let out = process
                .stdout
                .take()
                .map(|o| pipe::Receiver::from_owned_fd(OwnedFd::from(o)));
            let err = process
                .stderr
                .take()
                .map(|e| pipe::Receiver::from_owned_fd(OwnedFd::from(e)));
            // Output nobody asked for is read all the same, so the command never blocks on it.
            let out = tokio::spawn(pump(out, STDOUT, req.stdout.then(|| tx.clone())));
            let err = tokio::spawn(pump(err, STDERR, req.stderr.then(|| tx.clone())));
            (Input::Pipe(stdin), out, err)
        }
    };
    let reader = tokio::spawn(read_input(input, stdin_sink));

    let exit = tokio::task::spawn_blocking(move || process.wait()).await;
    let _ = tokio::time::timeout(DRAIN, async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    let status = match exit {
        Ok(Ok(code)) => {
            tracing::info!(exit_code = code, "exec exited");
            channel::exit_status(code)
        }
        Ok(Err(e)) => channel::error_status(&e.to_string()),
        Err(e) => channel::error_status(&e.to_string()),
    };
    let _ = tx.send(channel::frame(ERROR, &status)).await;
    reader.abort();
}

/// Sends what `pipe` yields as `channel` messages until EOF (with no `tx`, drops it).
async fn pump(
    pipe: Option<std::io::Result<pipe::Receiver>>,
    channel: u8,
    tx: Option<mpsc::Sender<Vec<u8>>>,
) {
    let Some(Ok(mut pipe)) = pipe else { return };
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(tx) = &tx
                    && tx.send(channel::frame(channel, &buf[..n])).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Where the client's stdin goes.
enum Input {
    Pipe(Option<pipe::Sender>),
    Terminal { master: Arc<Terminal>, stdin: bool },
}

/// The terminal's master, non-blocking, for the reactor; `hangup` tells the output pump the
/// client left, so the last reference goes and the closed master hangs the command up.
struct Terminal(AsyncFd<OwnedFd>, tokio::sync::Notify);

impl Terminal {
    fn new(master: OwnedFd) -> Result<Terminal, String> {
        let flags = rustix::fs::fcntl_getfl(&master).map_err(|e| format!("terminal: {e}"))?;
        rustix::fs::fcntl_setfl(&master, flags | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| format!("terminal: {e}"))?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same
        // for the AsyncFd's whole life.
        unsafe { AsyncFd::register(master) }
            .map(|fd| Terminal(fd, tokio::sync::Notify::new()))
            .map_err(|e| format!("terminal: {e}"))
    }

    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(Into::into)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn resize(&self, msg: &[u8]) {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Size {
            width: u16,
            height: u16,
        }
        match serde_json::from_slice::<Size>(msg) {
            Ok(s) => {
                if let Err(e) = resize_terminal(self.0.get_ref(), s.width, s.height) {
                    tracing::debug!(error = %e, "exec: resize");
                }
            }
            Err(e) => tracing::debug!(error = %e, "exec: malformed resize message"),
        }
    }
}

/// Sends what the terminal yields on channel 1 until the command and everything it started
/// closed the terminal (the master reads EIO then).
async fn pump_terminal(master: Arc<Terminal>, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let read = tokio::select! {
            r = master.read(&mut buf) => r,
            _ = master.1.notified() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(channel::frame(STDOUT, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Routes the client's messages: stdin data into the command (its pipe or its terminal), a
/// v5 CLOSE of stdin (or the end of the connection) closes its stdin (on a terminal: ^D);
/// resize messages size the terminal; unknown channels are dropped.
async fn read_input(mut messages: mpsc::Receiver<Vec<u8>>, mut input: Input) {
    while let Some(data) = messages.recv().await {
        match (data.first(), &mut input) {
            (Some(&STDIN), Input::Pipe(stdin)) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(&data[1..]).await.is_err()
                {
                    *stdin = None;
                }
            }
            (Some(&STDIN), Input::Terminal { master, stdin }) if *stdin => {
                *stdin = master.write_all(&data[1..]).await.is_ok();
            }
            (Some(&CLOSE), Input::Pipe(stdin)) if data.get(1) == Some(&STDIN) => *stdin = None,
            (Some(&CLOSE), Input::Terminal { master, stdin })
                if *stdin && data.get(1) == Some(&STDIN) =>
            {
                let _ = master.write_all(&[4]).await;
                *stdin = false;
            }
            (Some(&RESIZE), Input::Terminal { master, .. }) => master.resize(&data[1..]),
            _ => {}
        }
    }
    if let Input::Terminal { master, .. } = input {
        master.1.notify_one();
    }
}
