//! The CRI streaming server: the HTTP server the Exec, Attach and PortForward RPCs point
//! clients at (kubelet's `pkg/kubelet/cri/streaming` design). An RPC stores its request
//! under a single-use token ([`tokens`]) and answers `http://<addr>/{exec,attach,portforward}/<token>`;
//! the client connects there and upgrades to a WebSocket speaking the Kubernetes channel
//! protocols ([`channel`]).
//!
//! Served: exec without a tty (stdin, stdout, stderr, exit status; `v4`/`v5.channel.k8s.io`),
//! attach for output only (the container's log followed), port-forward to ports on the pod's
//! loopback (`v4.channel.k8s.io`). Not served: SPDY (what kubelet speaks to the runtime and
//! crictl's default), tty, attach with stdin (keel keeps no stdin of a container: the Attach
//! RPC says so). The WebSocket framing is tokio-tungstenite's, the
//! HTTP server hyper's; only the routing and the channel protocol are written here.

mod attach;
pub(crate) mod channel;
mod exec;
mod port_forward;
pub mod spdy;
mod spdy_serve;
pub(crate) mod tokens;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::Instrument;

use crate::api;
use crate::service::CriService;
use tokens::{TOKEN_TTL, Tokens};

/// Default address of the streaming server: loopback, a free port.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:0";

/// What a token stands for.
#[derive(Debug)]
pub(crate) enum Pending {
    Exec(api::ExecRequest),
    Attach(api::AttachRequest),
    PortForward(api::PortForwardRequest),
}

/// The streaming server's state shared with the RPCs: the tokens and the server's address.
pub(crate) struct Streaming {
    base: String,
    tokens: Tokens<Pending>,
}

impl Streaming {
    pub fn new(addr: SocketAddr) -> Self {
        Streaming {
            base: format!("http://{addr}"),
            tokens: Tokens::new(TOKEN_TTL),
        }
    }

    /// Stores `req` and answers the URL to connect to; None when too many wait.
    pub fn url(&self, req: Pending) -> Option<String> {
        let kind = match req {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        };
        let token = self.tokens.insert(req)?;
        Some(format!("{}/{kind}/{token}", self.base))
    }
}

/// The WebSocket a handler gets.
pub(crate) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Serves streaming connections on `listener` until `stop` turns true. Connections already
/// upgraded run on until their stream ends.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    svc: Arc<CriService>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "streaming server: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = Arc::clone(&svc);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let svc = Arc::clone(&svc);
                async move { Ok::<_, Infallible>(route(svc, req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(error = %e, "streaming server: connection");
            }
        });
    }
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Which endpoint a path names: (kind, token).
fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (kind, token) = rest.split_once('/')?;
    (matches!(kind, "exec" | "attach" | "portforward") && !token.is_empty() && !token.contains('/'))
        .then_some((kind, token))
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> &str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Checks the request, takes its token and answers the upgrade; the stream is served on a
/// task of its own once hyper hands the connection over.
fn route(svc: Arc<CriService>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let Some((kind, token)) = parse_path(req.uri().path()) else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if header_str(&req, header::UPGRADE).eq_ignore_ascii_case(SPDY) {
        let (kind, token) = (kind.to_owned(), token.to_owned());
        return route_spdy(svc, req, &kind, &token);
    }
    let websocket = header_str(&req, header::UPGRADE).eq_ignore_ascii_case("websocket");
    let key = header_str(&req, header::SEC_WEBSOCKET_KEY).to_owned();
    if !websocket || key.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            "upgrade to websocket or SPDY/3.1 (Connection: Upgrade)",
        );
    }
    let supported = match kind {
        "portforward" => channel::PORT_FORWARD_PROTOCOLS,
        _ => channel::EXEC_PROTOCOLS,
    };
    let Some(protocol) = negotiate_header(&req, supported) else {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!("Sec-WebSocket-Protocol: none of {supported:?} offered"),
        );
    };
    let pending = match take_pending(&svc, kind, token) {
        Ok(p) => p,
        Err(why) => return plain(StatusCode::NOT_FOUND, why),
    };
    let ports = query_ports(req.uri().query().unwrap_or(""));
    when_upgraded(&mut req, move |io| async move {
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        match pending {
            Pending::Exec(r) => {
                let span = tracing::info_span!("exec", container = %r.container_id, %protocol);
                exec::serve(svc, r, ws).instrument(span).await
            }
            Pending::Attach(r) => {
                let span = tracing::info_span!("attach", container = %r.container_id, %protocol);
                attach::serve(svc, r, ws).instrument(span).await
            }
            Pending::PortForward(r) => {
                let span = tracing::info_span!("port_forward", pod = %r.pod_sandbox_id);
                port_forward::serve(svc, r, ports, ws)
                    .instrument(span)
                    .await
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    r
}

/// The SPDY upgrade token.
const SPDY: &str = "SPDY/3.1";
/// The header a SPDY client offers its stream protocols in (one value, or several headers).
const STREAM_PROTOCOL: &str = "x-stream-protocol-version";
/// What exec and attach speak over SPDY; port-forward's protocol.
const SPDY_EXEC_PROTOCOLS: &[&str] = &[channel::V4];
const SPDY_PORT_FORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

/// The SPDY side of [`route`]: negotiates `X-Stream-Protocol-Version` as kubelet's
/// `httpstream.Handshake` does, takes the token and answers 101; the session runs on a task of
/// its own.
fn route_spdy(
    svc: Arc<CriService>,
    mut req: Request<Incoming>,
    kind: &str,
    token: &str,
) -> Response<Full<Bytes>> {
    let supported = match kind {
        "portforward" => SPDY_PORT_FORWARD_PROTOCOLS,
        _ => SPDY_EXEC_PROTOCOLS,
    };
    let offered: Vec<String> = req
        .headers()
        .get_all(STREAM_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect();
    let Some(protocol) = offered
        .iter()
        .find_map(|o| supported.iter().copied().find(|s| s == o))
    else {
        return plain(
            StatusCode::FORBIDDEN,
            &format!("X-Stream-Protocol-Version: none of {supported:?} offered (got {offered:?})"),
        );
    };
    let pending = match take_pending(&svc, kind, token) {
        Ok(p) => p,
        Err(why) => return plain(StatusCode::NOT_FOUND, why),
    };
    when_upgraded(&mut req, move |io| async move {
        match pending {
            Pending::Exec(r) => {
                let span = tracing::info_span!("exec", container = %r.container_id, %protocol, transport = "spdy");
                spdy_serve::exec(svc, r, io).instrument(span).await
            }
            Pending::PortForward(r) => {
                let span = tracing::info_span!("port_forward", pod = %r.pod_sandbox_id, transport = "spdy");
                spdy_serve::port_forward(svc, r, io).instrument(span).await
            }
            Pending::Attach(r) => {
                let span = tracing::info_span!("attach", container = %r.container_id, %protocol, transport = "spdy");
                spdy_serve::attach(svc, r, io).instrument(span).await
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static(SPDY));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(STREAM_PROTOCOL, HeaderValue::from_static(protocol));
    r
}

/// The token's request, when it is one for `kind`. Called only once the request could be
/// served: a refused one does not burn the token.
fn take_pending(svc: &CriService, kind: &str, token: &str) -> Result<Pending, &'static str> {
    match (kind, svc.streaming.tokens.take(token)) {
        (_, None) => Err("unknown or expired token"),
        ("exec", Some(p @ Pending::Exec(_)))
        | ("attach", Some(p @ Pending::Attach(_)))
        | ("portforward", Some(p @ Pending::PortForward(_))) => Ok(p),
        _ => Err("token is for another endpoint"),
    }
}

/// Runs `serve` on a task of its own once hyper hands the upgraded connection over.
fn when_upgraded<F, Fut>(req: &mut Request<Incoming>, serve: F)
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => serve(TokioIo::new(io)).await,
            Err(e) => tracing::debug!(error = %e, "streaming server: upgrade"),
        }
    });
}

fn negotiate_header(req: &Request<Incoming>, supported: &[&'static str]) -> Option<&'static str> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| channel::negotiate(v, supported))
}

/// The `port=` query parameters (kubelet's WebSocket port-forward names its ports so).
fn query_ports(query: &str) -> Vec<u16> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_an_endpoint_and_a_token() {
        assert_eq!(parse_path("/exec/abc"), Some(("exec", "abc")));
        assert_eq!(
            parse_path("/portforward/x-y_z"),
            Some(("portforward", "x-y_z"))
        );
        assert_eq!(parse_path("/exec/"), None);
        assert_eq!(parse_path("/exec/a/b"), None);
        assert_eq!(parse_path("/logs/abc"), None);
        assert_eq!(parse_path("/"), None);
    }

    #[test]
    fn ports_come_from_the_query() {
        assert_eq!(query_ports("port=8080&port=9090"), vec![8080, 9090]);
        assert_eq!(query_ports("port=80,443"), vec![80, 443]);
        assert_eq!(query_ports("x=1&port=nope"), Vec::<u16>::new());
    }

    #[test]
    fn urls_name_the_endpoint_and_a_fresh_token() {
        let s = Streaming::new("127.0.0.1:4242".parse().unwrap());
        let a = s.url(Pending::Exec(api::ExecRequest::default())).unwrap();
        let b = s
            .url(Pending::PortForward(api::PortForwardRequest::default()))
            .unwrap();
        assert!(a.starts_with("http://127.0.0.1:4242/exec/"), "{a}");
        assert!(b.starts_with("http://127.0.0.1:4242/portforward/"), "{b}");
        let token = a.rsplit('/').next().unwrap();
        assert!(matches!(s.tokens.take(token), Some(Pending::Exec(_))));
        assert!(s.tokens.take(token).is_none());
    }
}
