//! Attach over the WebSocket (and, through [`run`], over SPDY). A container created with stdin
//! or a tty is attached live through its monitor's attach socket (keel-runtime's `attach`):
//! channel 0 goes to its stdin (a v5 CLOSE closes it), channel 4's resize messages size its
//! terminal, its output comes out on channels 1 and 2. Any other container has no live stdio
//! (stdin is /dev/null, stdout and stderr go to the monitor, which writes the CRI log file), so
//! attaching follows the log file from the moment of attaching and sends each entry on
//! channel 1 or 2 (stdin was refused at the RPC). When the container's output ends the v4
//! Success status goes out and the socket closes.
//!
//! The log follower is keel-runtime's `read_log`, on a thread of its own: a client that left
//! is noticed at the container's next log entry (or its exit), not before.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use keel_runtime::container::crilog::Stream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use keel_runtime::container::container_attach as live;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Socket;
use super::channel::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use crate::api;
use crate::service::CriService;

/// Attach over a WebSocket: the channel messages are binary messages; the client closing (or
/// going away) ends the attach.
pub(super) async fn serve(svc: Arc<CriService>, req: api::AttachRequest, ws: Socket) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(32);
    let gone = async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                // Dropped when nothing takes input (a log-following attach).
                Message::Binary(d) => {
                    let _ = in_tx.send(d.to_vec()).await;
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    let writer = async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::binary(m)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        _ = async { tokio::join!(run(svc, req, tx, in_rx), writer) } => {}
        _ = gone => {}
    }
}

/// Attaches: output (and at the end the status) goes out on `tx` as channel messages, the
/// client's channel messages come in on `input`. Live for a container with stdin or a tty,
/// else the log followed. The caller ends it when the client leaves.
pub(super) async fn run(
    svc: Arc<CriService>,
    req: api::AttachRequest,
    tx: mpsc::Sender<Vec<u8>>,
    input: mpsc::Receiver<Vec<u8>>,
) {
    let containers = svc.containers().clone();
    let id = req.container_id.clone();
    let cfg = tokio::task::spawn_blocking(move || containers.status(&id))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|i| i.record.config);
    if cfg.is_some_and(|c| c.stdin || c.tty) {
        return attach_live(svc, req, tx, input).await;
    }
    drop(input);
    follow_log(svc, req, tx).await
}

/// Through the monitor's attach socket, until the container's output ends.
async fn attach_live(
    svc: Arc<CriService>,
    req: api::AttachRequest,
    tx: mpsc::Sender<Vec<u8>>,
    mut input: mpsc::Receiver<Vec<u8>>,
) {
    let containers = svc.containers().clone();
    let id = req.container_id.clone();
    let sock = tokio::task::spawn_blocking(move || containers.attach(&id))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .and_then(|s| {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            tokio::net::UnixStream::from_std(s).map_err(|e| e.to_string())
        });
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            let _ = tx
                .send(channel::frame(ERROR, &channel::error_status(&e)))
                .await;
            return;
        }
    };
    let (mut rd, mut wr) = sock.into_split();
    let out = async {
        let mut buf = vec![0u8; 32 << 10];
        let mut pending = Vec::new();
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                return;
            }
            pending.extend_from_slice(&buf[..n]);
            let Ok(frames) = live::take_frames(&mut pending) else {
                return;
            };
            for (kind, data) in frames {
                let ch = match kind {
                    live::STDOUT if req.stdout => STDOUT,
                    live::STDERR if req.stderr => STDERR,
                    _ => continue,
                };
                if tx.send(channel::frame(ch, &data)).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_container = async {
        while let Some(m) = input.recv().await {
            let f = match (m.first(), m.get(1)) {
                (Some(&STDIN), _) if req.stdin => live::frame(live::STDIN, &m[1..]),
                (Some(&CLOSE), Some(&STDIN)) if req.stdin => live::frame(live::CLOSE_STDIN, &[]),
                (Some(&RESIZE), _) => match parse_size(&m[1..]) {
                    Some((cols, rows)) => live::frame(live::RESIZE, &live::size(cols, rows)),
                    None => continue,
                },
                _ => continue,
            };
            if wr.write_all(&f).await.is_err() {
                break;
            }
        }
        // No more input (the client may still be reading): wait for the output to end.
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = out => {}
        _ = to_container => {}
    }
    let _ = tx
        .send(channel::frame(ERROR, &channel::exit_status(0)))
        .await;
}

/// A resize message's `{"Width":W,"Height":H}`.
fn parse_size(msg: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    serde_json::from_slice::<Size>(msg)
        .ok()
        .map(|s| (s.width, s.height))
}

/// The log followed from now on, until the container exited or `tx`'s receiver is gone.
async fn follow_log(svc: Arc<CriService>, req: api::AttachRequest, tx: mpsc::Sender<Vec<u8>>) {
    let since = Utc::now();
    let containers = svc.containers().clone();
    let id = req.container_id.clone();
    let follower_tx = tx.clone();
    let (want_out, want_err) = (req.stdout, req.stderr);
    let follower = std::thread::Builder::new()
        .name("keel-attach".into())
        .spawn(move || {
            let r = containers.read_log(&id, true, &mut |line| {
                let new = DateTime::parse_from_rfc3339(&line.timestamp)
                    .is_ok_and(|t| t.with_timezone(&Utc) >= since);
                let ch = match line.stream {
                    Stream::Stdout if want_out => STDOUT,
                    Stream::Stderr if want_err => STDERR,
                    _ => return !follower_tx.is_closed(),
                };
                if !new {
                    return true;
                }
                let mut data = line.msg.into_bytes();
                if !line.partial {
                    data.push(b'\n');
                }
                follower_tx.blocking_send(channel::frame(ch, &data)).is_ok()
            });
            let status = match r {
                Ok(()) => channel::exit_status(0),
                Err(e) => channel::error_status(&e.to_string()),
            };
            let _ = follower_tx.blocking_send(channel::frame(ERROR, &status));
        });
    drop(tx);
    if let Err(e) = follower {
        tracing::warn!(error = %e, "attach: spawn log follower");
    }
}
