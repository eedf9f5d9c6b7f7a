//! Port-forward over the WebSocket (kubelet's `portforward/websocket.go` protocol on
//! `v4.channel.k8s.io`): port i of the request gets data channel 2i and error channel 2i+1;
//! the server first sends the port (uint16, little endian) on both, then connects to
//! `127.0.0.1:PORT` inside the pod's network namespace and pipes bytes between the data
//! channel and the connection. A connection that fails is reported as text on the error
//! channel. The WebSocket closes when the client leaves or every port's connection ended.

use std::path::PathBuf;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::Socket;
use super::channel;
use crate::api;
use crate::service::CriService;

pub(super) async fn serve(
    svc: Arc<CriService>,
    req: api::PortForwardRequest,
    query_ports: Vec<u16>,
    ws: Socket,
) {
    // The URL's ports when it names some (what kubectl sends), else the RPC's.
    let ports: Vec<u16> = if query_ports.is_empty() {
        req.port
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect()
    } else {
        query_ports
    };
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

    let netns = pod_netns(&svc, &req.pod_sandbox_id).await;
    let mut conns: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut readers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let _ = tx.send(channel::frame(data, &port.to_le_bytes())).await;
        let _ = tx.send(channel::frame(error, &port.to_le_bytes())).await;
        let connected = match &netns {
            Ok(ns) => connect_in(ns.clone(), *port).await,
            Err(e) => Err(e.clone()),
        };
        match connected {
            Ok(conn) => {
                let (mut r, w) = conn.into_split();
                conns.push(Some(w));
                let tx = tx.clone();
                readers.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 << 10];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || tx.send(channel::frame(data, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "port-forward: connect");
                let msg = format!(
                    "error forwarding port {port} to pod {}: {e}",
                    req.pod_sandbox_id
                );
                let _ = tx.send(channel::frame(error, msg.as_bytes())).await;
                conns.push(None);
            }
        }
    }

    // As kubelet: the stream ends when the client leaves or every port's connection has
    // ended (the pod side closed it, or it could not be made).
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let mut all_done = futures::future::join_all(readers);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = &mut all_done => break,
        };
        let data = match msg {
            Some(Ok(Message::Binary(d))) => d,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        let Some((&ch, payload)) = data.split_first() else {
            continue;
        };
        // Only data channels carry bytes to the pod; what a client sends on an error channel
        // is dropped.
        if ch % 2 != 0 {
            continue;
        }
        if let Some(slot) = conns.get_mut(usize::from(ch / 2))
            && let Some(w) = slot
            && w.write_all(payload).await.is_err()
        {
            *slot = None;
        }
    }
    for a in aborts {
        a.abort();
    }
    drop(conns);
    drop(tx);
    let _ = writer.await;
}

/// The pod's pinned network namespace.
pub(super) async fn pod_netns(svc: &CriService, pod: &str) -> Result<PathBuf, String> {
    let pods = svc.pods.clone();
    let id = pod.to_owned();
    let info = tokio::task::spawn_blocking(move || pods.status(&id))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    info.record
        .netns()
        .map(PathBuf::from)
        .ok_or_else(|| format!("pod {pod} has no network namespace of its own"))
}

/// Connects to 127.0.0.1:`port` from inside the namespace pinned at `netns`: on a thread of its
/// own that enters the namespace and ends after the connect (a socket stays in the namespace
/// it was made in; the thread's namespace must not leak into a pool thread).
pub(super) async fn connect_in(netns: PathBuf, port: u16) -> Result<TcpStream, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keel-portfwd".into())
        .spawn(move || {
            let r = (|| -> Result<std::net::TcpStream, String> {
                let ns = std::fs::File::open(&netns)
                    .map_err(|e| format!("open {}: {e}", netns.display()))?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| format!("enter {}: {e}", netns.display()))?;
                let conn = std::net::TcpStream::connect(("127.0.0.1", port))
                    .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
                conn.set_nonblocking(true)
                    .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
                Ok(conn)
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("spawn thread: {e}"))?;
    let conn = rx.await.map_err(|_| "connect thread died".to_owned())??;
    TcpStream::from_std(conn).map_err(|e| format!("register 127.0.0.1:{port}: {e}"))
}
