//! Exec over the WebSocket: starts the command through keel-runtime's streaming exec, pumps
//! channel 0 into its stdin and its stdout and stderr out on channels 1 and 2, then sends the
//! exit status on channel 3 and closes. v5 clients close stdin with a CLOSE message; v4
//! clients can only close the whole connection, which closes stdin too. Resize messages are
//! ignored: there is no tty.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
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

pub(super) async fn serve(svc: Arc<CriService>, req: api::ExecRequest, ws: Socket) {
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(32);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::binary(m)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });

    let containers = svc.containers().clone();
    let (id, cmd, want_stdin) = (req.container_id.clone(), req.cmd.clone(), req.stdin);
    let started =
        tokio::task::spawn_blocking(move || containers.exec_stream(&id, &cmd, want_stdin))
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
            drop(tx);
            let _ = writer.await;
            return;
        }
    };

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
    let reader = tokio::spawn(read_input(stream, stdin));

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
    drop(tx);
    reader.abort();
    let _ = writer.await;
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

/// Routes the client's messages: stdin data into the command, a v5 CLOSE of stdin (or the end
/// of the connection) closes its stdin; resize and unknown channels are dropped.
async fn read_input(
    mut stream: futures::stream::SplitStream<Socket>,
    mut stdin: Option<pipe::Sender>,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let data = match msg {
            Message::Binary(d) => d,
            Message::Close(_) => break,
            _ => continue,
        };
        match data.first() {
            Some(&STDIN) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(&data[1..]).await.is_err()
                {
                    stdin = None;
                }
            }
            Some(&CLOSE) if data.get(1) == Some(&STDIN) => stdin = None,
            Some(&RESIZE) | Some(_) | None => {}
        }
    }
    drop(stdin);
}
