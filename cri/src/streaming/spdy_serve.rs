//! Exec, attach and port-forward over SPDY (the protocols kubelet's own streaming server serves:
//! `k8s.io/kubelet/pkg/cri/streaming/{remotecommand,portforward}`).
//!
//! Exec (`v4.channel.k8s.io`): the client opens one stream per role (`streamType` error,
//! stdin, stdout, stderr, resize; stderr not with a tty, resize only with one); once all that
//! the request names are there (30 s at most) the command runs through the same code as over a
//! WebSocket ([`super::exec::run`]): stdin's data and FIN become channel 0 and its CLOSE,
//! resize's JSON objects channel 4, channels 1-3 go out on stdout, stderr and error. Then every
//! stream is closed (FIN) and the connection ends (GOAWAY).
//!
//! Attach (`v4.channel.k8s.io`, output only): error, stdout and stderr streams, fed by the same
//! log follower as over a WebSocket ([`super::attach::run`]).
//!
//! Port-forward (`portforward.k8s.io`): the client opens an error and a data stream per
//! forwarded connection, both naming `port` and a `requestID`; the data stream is piped to a
//! connection made to `127.0.0.1:PORT` inside the pod's network namespace; a failure is written
//! on the error stream. The session lasts until the client closes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::channel::{self, CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};
use super::spdy::{Incoming, Session, Writer, header};
use crate::api;
use crate::service::CriService;

/// What kubelet gives a client to open its streams.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The upgraded connection.
pub(super) type Io = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// The streams a client opens for an exec or attach: error always, stdin/stdout as asked,
/// stderr as asked but never with a tty (it merges into stdout), resize with a tty.
fn wanted(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Vec<&'static str> {
    [
        (true, "error"),
        (stdin, "stdin"),
        (stdout, "stdout"),
        (stderr && !tty, "stderr"),
        (tty, "resize"),
    ]
    .into_iter()
    .filter_map(|(on, kind)| on.then_some(kind))
    .collect()
}

/// Waits (30 s at most) for the client to open a stream of each kind in `want`; None when it
/// did not.
async fn gather(
    incoming: &mut mpsc::Receiver<Incoming>,
    want: &[&str],
) -> Option<HashMap<String, Incoming>> {
    let mut streams: HashMap<String, Incoming> = HashMap::new();
    let gathered = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while want.iter().any(|w| !streams.contains_key(*w)) {
            let Some(s) = incoming.recv().await else {
                return false;
            };
            let kind = header(&s.headers, "streamtype").unwrap_or("").to_string();
            if want.contains(&kind.as_str()) {
                streams.insert(kind, s);
            } else {
                tracing::debug!(stream = s.id, kind, "spdy: unexpected stream");
            }
        }
        true
    })
    .await;
    if gathered != Ok(true) {
        tracing::warn!(
            missing = ?want.iter().filter(|w| !streams.contains_key(**w)).collect::<Vec<_>>(),
            "spdy: the client did not open its streams"
        );
        return None;
    }
    Some(streams)
}

/// Sends channel messages from `rx` on the streams of channels 1-3; then closes those streams.
fn output(
    writer: Writer,
    mut rx: mpsc::Receiver<Vec<u8>>,
    streams: &HashMap<String, Incoming>,
) -> tokio::task::JoinHandle<()> {
    let id = |k: &str| streams.get(k).map(|s| s.id);
    let (error, stdout, stderr) = (id("error"), id("stdout"), id("stderr"));
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Some((&ch, data)) = m.split_first() else {
                continue;
            };
            let stream = match ch {
                STDOUT => stdout,
                STDERR => stderr,
                ERROR => error,
                _ => None,
            };
            if let Some(s) = stream
                && !writer.data(s, data).await
            {
                return;
            }
        }
        for s in [error, stdout, stderr].into_iter().flatten() {
            writer.fin(s).await;
        }
    })
}

/// Feeds the stdin and resize streams (when there) into `in_tx` as channel messages: stdin's
/// data and its FIN as channel 0 and its CLOSE, resize's JSON objects as channel 4.
fn inputs(
    streams: &mut HashMap<String, Incoming>,
    in_tx: &mpsc::Sender<Vec<u8>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut inputs = Vec::new();
    if let Some(stdin) = streams.remove("stdin") {
        let in_tx = in_tx.clone();
        inputs.push(tokio::spawn(async move {
            let mut data = stdin.data;
            while let Some(d) = data.recv().await {
                if in_tx.send(channel::frame(STDIN, &d)).await.is_err() {
                    return;
                }
            }
            let _ = in_tx.send(vec![CLOSE, STDIN]).await;
        }));
    }
    if let Some(resize) = streams.remove("resize") {
        let in_tx = in_tx.clone();
        inputs.push(tokio::spawn(async move {
            let mut data = resize.data;
            let mut buf = Vec::new();
            while let Some(d) = data.recv().await {
                buf.extend_from_slice(&d);
                for size in take_json_values(&mut buf) {
                    if in_tx.send(channel::frame(RESIZE, &size)).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    inputs
}

pub(super) async fn exec(svc: Arc<CriService>, req: api::ExecRequest, io: Io) {
    let (mut incoming, writer) = Session::start(io);
    let want = wanted(req.stdin, req.stdout, req.stderr, req.tty);
    let Some(mut streams) = gather(&mut incoming, &want).await else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(32);
    let out = output(writer, rx, &streams);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(32);
    let inputs = inputs(&mut streams, &in_tx);
    drop(in_tx);
    super::exec::run(svc, req, tx, in_rx).await;
    let _ = out.await;
    for i in inputs {
        i.abort();
    }
}

/// Attach over SPDY: the streams as for exec, fed by the same code as over a WebSocket
/// ([`super::attach::run`]); the session ending (the client left) ends it.
pub(super) async fn attach(svc: Arc<CriService>, req: api::AttachRequest, io: Io) {
    let (mut incoming, writer) = Session::start(io);
    let want = wanted(req.stdin, req.stdout, req.stderr, req.tty);
    let Some(mut streams) = gather(&mut incoming, &want).await else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    let out = output(writer, rx, &streams);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(32);
    let inputs = inputs(&mut streams, &in_tx);
    let gone = async move {
        while incoming.recv().await.is_some() {}
        drop(in_tx);
    };
    tokio::select! {
        _ = async {
            super::attach::run(svc, req, tx, in_rx).await;
            let _ = out.await;
        } => {}
        _ = gone => {}
    }
    for i in inputs {
        i.abort();
    }
}

/// Takes the complete JSON values at the front of `buf` (kubelet's resize stream is a
/// sequence of them), leaving a partial one; garbage is dropped.
fn take_json_values(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    let mut used = 0;
    loop {
        match values.next() {
            Some(Ok(v)) => {
                used = values.byte_offset();
                out.push(v.to_string().into_bytes());
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(_)) => {
                used = buf.len();
                break;
            }
            None => {
                used = values.byte_offset();
                break;
            }
        }
    }
    buf.drain(..used);
    out
}

pub(super) async fn port_forward(svc: Arc<CriService>, req: api::PortForwardRequest, io: Io) {
    let (mut incoming, writer) = Session::start(io);
    let netns = super::port_forward::pod_netns(&svc, &req.pod_sandbox_id).await;
    // requestID -> the error stream, until its data stream comes.
    let mut errors: HashMap<String, u32> = HashMap::new();
    while let Some(s) = incoming.recv().await {
        let kind = header(&s.headers, "streamtype").unwrap_or("");
        let request = header(&s.headers, "requestid").unwrap_or("").to_string();
        match kind {
            "error" => {
                errors.insert(request, s.id);
            }
            "data" => {
                let error = errors.remove(&request);
                let port = header(&s.headers, "port").and_then(|p| p.parse::<u16>().ok());
                let writer = writer.clone();
                let netns = netns.clone();
                let pod = req.pod_sandbox_id.clone();
                tokio::spawn(async move {
                    let r = match (port, netns) {
                        (None, _) => Err("the data stream names no valid port".to_string()),
                        (Some(_), Err(e)) => Err(e),
                        (Some(p), Ok(ns)) => forward(s, p, ns, &writer).await,
                    };
                    if let Err(e) = r {
                        let port = port.map(|p| p.to_string()).unwrap_or_default();
                        tracing::warn!(port, error = %e, "port-forward over spdy");
                        if let Some(err) = error {
                            let msg = format!("error forwarding port {port} to pod {pod}: {e}");
                            writer.data(err, msg.as_bytes()).await;
                        }
                    }
                    if let Some(err) = error {
                        writer.fin(err).await;
                    }
                });
            }
            other => tracing::debug!(stream = s.id, kind = other, "port-forward: unknown stream"),
        }
    }
}

/// Pipes the data stream `s` and a connection to `port` in the pod until both sides ended.
async fn forward(
    s: Incoming,
    port: u16,
    netns: std::path::PathBuf,
    writer: &Writer,
) -> Result<(), String> {
    let conn = super::port_forward::connect_in(netns, port).await;
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            writer.fin(s.id).await;
            return Err(e);
        }
    };
    let (mut r, mut w) = conn.into_split();
    let mut data = s.data;
    let to_pod = tokio::spawn(async move {
        while let Some(d) = data.recv().await {
            if w.write_all(&d).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 32 << 10];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || !writer.data(s.id, &buf[..n]).await {
            break;
        }
    }
    writer.fin(s.id).await;
    let _ = to_pod.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_messages_are_cut_from_a_stream_of_json() {
        let mut buf = br#"{"Width":80,"Height":24}{"Width":100,"#.to_vec();
        let v = take_json_values(&mut buf);
        assert_eq!(v.len(), 1);
        assert_eq!(buf, br#"{"Width":100,"#);
        buf.extend_from_slice(br#""Height":40}"#);
        let v = take_json_values(&mut buf);
        let size: serde_json::Value = serde_json::from_slice(&v[0]).unwrap();
        assert_eq!(size["Height"], 40);
        assert!(buf.is_empty());
        let mut junk = b"}}not json".to_vec();
        assert!(take_json_values(&mut junk).is_empty());
        assert!(junk.is_empty());
    }
}
