//! The agent's HTTPS endpoint, which the API server calls for `kubectl logs`:
//! `GET /containerLogs/<namespace>/<pod>/<container>?podUID=&follow=&previous=&timestamps=&tailLines=&limitBytes=&sinceSeconds=&sinceTime=`
//! (kubelet's path and parameters). Only the node's own credential is accepted (the API server
//! mints it from the join token); the certificate is self-signed per start and pinned in the Node
//! (see keel_cluster::api::pki). A followed log streams until the container stops or the caller
//! leaves. What a log shows is `logs.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use keel_cri::api;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::logs::{self, LogOptions, NoLog};
use crate::pod_spec::{LABEL_CONTAINER_NAME, LABEL_POD_UID};
use crate::{AgentError, Cri};

/// How often a followed log is read for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How often a follow asks the runtime whether the container still runs.
const RUNNING_CHECK: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, Infallible>;

/// A bound, not yet serving, endpoint.
pub(crate) struct LogServer {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    /// The SHA-256 pin of the certificate, for the Node's annotation.
    pub pin: String,
    pub port: u16,
}

/// What the handlers need.
pub(crate) struct Ctx {
    pub credential: String,
    pub pod_log_dir: PathBuf,
    pub cri: Cri,
}

impl LogServer {
    /// Binds `listen` with a fresh certificate for `names` (the node's IP and hostname).
    pub async fn bind(listen: SocketAddr, names: &[String]) -> Result<LogServer, AgentError> {
        let (config, pin) = keel_cluster::api::pki::self_signed_server(names)
            .map_err(|e| AgentError::Endpoint(format!("certificate for {listen}: {e}")))?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| AgentError::Endpoint(format!("listen on {listen}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| AgentError::Endpoint(format!("listen on {listen}: {e}")))?
            .port();
        Ok(LogServer {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            pin,
            port,
        })
    }

    /// Serves until dropped; a failed connection is logged and dropped.
    pub async fn serve(self, ctx: Arc<Ctx>) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("log endpoint accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tls = self.tls.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let stream = match tls.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, "log endpoint TLS: {e}");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, "log endpoint connection: {e}");
                }
            });
        }
    }
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("static response parts")
}

fn authorized(req: &Request<Incoming>, credential: &str) -> bool {
    let Some(got) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant time in the length of the expected credential.
    let (a, b) = (got.trim().as_bytes(), credential.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    if !authorized(&req, &ctx.credential) {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this endpoint accepts only the node's own credential",
        );
    }
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} is not supported", req.method()),
        );
    }
    let path = req.uri().path().to_string();
    let parts: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(logs::percent_decode)
        .collect();
    let [root, ns, pod, container] = parts.as_slice() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {path}"),
        );
    };
    if root != "containerLogs"
        || [ns, pod, container]
            .iter()
            .any(|s| s.is_empty() || s.contains(['/', '\0']) || *s == "..")
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {path}"),
        );
    }
    let opts = match LogOptions::parse(req.uri().query().unwrap_or(""), chrono::Utc::now()) {
        Ok(o) => o,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("invalid log query parameter {e}"),
            );
        }
    };
    if let Some(uid) = &opts.pod_uid
        && !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("invalid log query parameter podUID={uid:?}"),
        );
    }
    let found = logs::pod_dir(&ctx.pod_log_dir, ns, pod, opts.pod_uid.as_deref())
        .and_then(|dir| Ok((logs::log_file(&dir, pod, container, opts.previous)?, dir)));
    let ((file, attempt), dir) = match found {
        Ok(f) => f,
        Err(NoLog::NotFound(m)) => return status(StatusCode::NOT_FOUND, "NotFound", m),
        Err(NoLog::BadRequest(m)) => return status(StatusCode::BAD_REQUEST, "BadRequest", m),
    };
    let uid = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once('_'))
        .map(|(_, uid)| uid.to_string())
        .unwrap_or_default();
    let mut f = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("open {}: {e}", file.display()),
            );
        }
    };
    let start = match opts.tail_lines {
        Some(n) => match logs::tail_offset(&mut f, n) {
            Ok(o) => o,
            Err(e) => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    format!("read {}: {e}", file.display()),
                );
            }
        },
        None => 0,
    };
    // Following the previous attempt makes no sense: it has exited.
    let follow = opts.follow && !opts.previous;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let cri = ctx.cri.clone();
    let container = container.clone();
    tokio::spawn(async move {
        let mut f = tokio::fs::File::from_std(f);
        if let Err(e) = f.seek(std::io::SeekFrom::Start(start)).await {
            tracing::warn!("seek {}: {e}", file.display());
            return;
        }
        let running = || container_running(cri.clone(), &uid, &container, attempt);
        if let Err(e) = stream_log(f, &opts, follow, &tx, running).await {
            tracing::warn!("read {}: {e}", file.display());
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(StreamBody::new(body).boxed())
        .expect("static response parts")
}

/// Sends the log from `f`'s position: what is there, then (with `follow`) what is added until
/// `running` says the container stopped (and its last lines are read) or the receiver leaves.
async fn stream_log<R, F>(
    mut f: tokio::fs::File,
    opts: &LogOptions,
    follow: bool,
    tx: &mpsc::Sender<Bytes>,
    running: R,
) -> std::io::Result<()>
where
    R: Fn() -> F,
    F: std::future::Future<Output = bool>,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut sent = 0u64;
    let mut last_check = Instant::now();
    let mut stopping = false;
    loop {
        let n = f.read(&mut buf).await?;
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            let mut out = Vec::new();
            let mut consumed = 0;
            while let Some(i) = pending[consumed..].iter().position(|b| *b == b'\n') {
                logs::render(&pending[consumed..consumed + i], opts, &mut out);
                consumed += i + 1;
            }
            pending.drain(..consumed);
            let done = logs::apply_limit(&mut out, &mut sent, opts.limit_bytes);
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return Ok(());
            }
            if done {
                return Ok(());
            }
            continue;
        }
        if !follow || stopping || tx.is_closed() {
            return Ok(());
        }
        if last_check.elapsed() >= RUNNING_CHECK {
            last_check = Instant::now();
            if !running().await {
                // One more pass reads what the container wrote last.
                stopping = true;
                continue;
            }
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// Whether attempt `attempt` of `container` in pod `uid` runs (an error counts as running, so a
/// runtime hiccup does not cut a follow short).
async fn container_running(mut cri: Cri, uid: &str, container: &str, attempt: u32) -> bool {
    let filter = api::ContainerFilter {
        label_selector: [
            (LABEL_POD_UID.to_string(), uid.to_string()),
            (LABEL_CONTAINER_NAME.to_string(), container.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    match cri
        .runtime
        .list_containers(api::ListContainersRequest {
            filter: Some(filter),
        })
        .await
    {
        Ok(r) => r.into_inner().containers.iter().any(|c| {
            c.metadata.as_ref().is_some_and(|m| m.attempt == attempt)
                && c.state == api::ContainerState::ContainerRunning as i32
        }),
        Err(e) => {
            tracing::debug!("ListContainers for a followed log: {e}");
            true
        }
    }
}
