//! Attach over the WebSocket, output only: keel keeps no stdio stream of a running container
//! (stdin is /dev/null, stdout and stderr go to the monitor, which writes the CRI log file), so
//! attaching follows the log file from the moment of attaching and sends each entry on
//! channel 1 or 2 (stdin was refused at the RPC). When the container exits the v4 Success
//! status goes out and the socket closes.
//!
//! The follower is keel-runtime's `read_log`, on a thread of its own: a client that left is
//! noticed at the container's next log entry (or its exit), not before.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use keel_runtime::container::crilog::Stream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::Socket;
use super::channel::{self, ERROR, STDERR, STDOUT};
use crate::api;
use crate::service::CriService;

/// Attach over a WebSocket: the channel messages are binary messages; the client closing (or
/// going away) ends the attach, its other messages are dropped.
pub(super) async fn serve(svc: Arc<CriService>, req: api::AttachRequest, ws: Socket) {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let gone = async move {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                return;
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
        _ = async { tokio::join!(run(svc, req, tx), writer) } => {}
        _ = gone => {}
    }
}

/// Follows the container's log, sending its entries (and at its exit the status) as channel
/// messages on `tx`; returns when the container exited or `tx`'s receiver is gone.
pub(super) async fn run(svc: Arc<CriService>, req: api::AttachRequest, tx: mpsc::Sender<Vec<u8>>) {
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
