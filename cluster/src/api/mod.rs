//! The Kubernetes-compatible API server: HTTPS (rustls, HTTP/1.1 and HTTP/2) in front of the
//! [`Store`](crate::store::Store), serving discovery and the resources of `resources.rs` with the
//! verbs kubectl and client libraries use.
//!
//! Layout by concern: `pki` (CA, serving cert, tokens, kubeconfig), `auth` (who is calling, what a
//! node may write), `discovery`, `handlers` (HTTP to operations), `objects` (generic get, list,
//! create, update, delete), `selectors`, `patch`, `watch`, `table`, `defaults` (per-resource
//! defaults and validation), `alloc` (ClusterIPs and NodePorts), `gc` (owner references,
//! finalizers, namespace deletion), `node_proxy` (`pods/log` streamed from the pod's node agent).
//! This file owns start-up: credentials, the listener, the bootstrap objects, the kubeconfig, and
//! the background tasks (garbage collector, compactor).
//!
//! Must not talk to nodes except to proxy what Kubernetes proxies through the kubelet
//! (`node_proxy`), nor run controllers beyond garbage collection: the scheduler and the
//! workload controllers are API clients of their own.

pub mod alloc;
pub mod auth;
mod defaults;
pub mod discovery;
mod gc;
mod handlers;
mod node_proxy;
mod objects;
pub mod patch;
pub mod pki;
mod protobuf;
pub mod resources;
pub mod selectors;
pub mod status;
pub mod table;
mod watch;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{HeaderMap, Method, Request, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

pub use self::alloc::Cidr;
pub use self::auth::{Identity, node_credential};
pub use self::pki::PkiError;
pub use self::status::ApiError;
use crate::store::Store;

/// How the API server runs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where credentials and the kubeconfig live.
    pub data_dir: PathBuf,
    /// The HTTPS listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// ClusterIPs are allocated from here; its first address is the `kubernetes` Service's.
    pub service_cidr: Cidr,
    pub node_port_range: RangeInclusive<u16>,
    /// Extra names and IPs for the serving certificate (used on first start only).
    pub tls_sans: Vec<String>,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// How often the store's history is compacted (keeping at least one interval of it).
    pub compact_interval: Duration,
    /// How often the garbage collector runs without being woken.
    pub gc_interval: Duration,
}

impl ApiConfig {
    /// The defaults: service CIDR 10.96.0.0/12, node ports 30000-32767, 5-minute compaction.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ApiConfig {
        ApiConfig {
            data_dir,
            listen,
            service_cidr: "10.96.0.0/12".parse().expect("the default CIDR parses"),
            node_port_range: 30000..=32767,
            tls_sans: Vec::new(),
            bookmark_interval: Duration::from_secs(10),
            compact_interval: Duration::from_secs(300),
            gc_interval: Duration::from_secs(30),
        }
    }
}

/// What starting the API server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("create the bootstrap objects: {0}")]
    Bootstrap(ApiError),
}

/// A running API server; its tasks stop when it is dropped.
pub struct ApiServer {
    pub local_addr: SocketAddr,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub admin_token: String,
    pub node_join_token: String,
    /// `keel1.<ca-sha256>.<secret>`, for `keel agent --server URL --token`; also in
    /// `<data dir>/node-token`.
    pub join_token: String,
    pub join_token_file: PathBuf,
    serve: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// Closes every open connection when set (on drop).
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl ApiServer {
    /// Loads or creates the credentials, binds, creates the bootstrap objects, writes the
    /// kubeconfig, then serves in background tasks.
    pub async fn start(config: ApiConfig, store: Arc<dyn Store>) -> Result<ApiServer, ServerError> {
        let mut sans = config.tls_sans.clone();
        if !config.listen.ip().is_unspecified() {
            sans.push(config.listen.ip().to_string());
        }
        sans.push(config.service_cidr.first().to_string());
        let creds = pki::ensure(&config.data_dir, &sans)?;
        let tls = pki::server_config(&creds, &config.data_dir)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let url = pki::server_url(local_addr);

        let state = Arc::new(objects::State {
            store: store.clone(),
            tokens: auth::Tokens {
                admin: creds.admin_token.clone(),
                node_join: creds.node_join_token.clone(),
            },
            alloc: alloc::Allocator::new(
                store.clone(),
                config.service_cidr,
                config.node_port_range.clone(),
            ),
            gc_wake: Arc::new(Notify::new()),
            bookmark_interval: config.bookmark_interval,
            active_namespaces: Default::default(),
        });
        objects::bootstrap(&state, local_addr.port())
            .await
            .map_err(ServerError::Bootstrap)?;
        let kubeconfig = config.data_dir.join("kubeconfig");
        pki::write_secure(&kubeconfig, pki::kubeconfig(&creds, &url).as_bytes(), 0o600)?;
        let join_token = crate::join::JoinToken::new(&creds.ca_pem, &creds.node_join_token)
            .map_err(|e| PkiError::Pem {
                path: config.data_dir.join("pki/ca.crt"),
                what: "certificate",
                reason: e.to_string(),
            })?
            .to_string();
        let join_token_file = config.data_dir.join("node-token");
        pki::write_secure(
            &join_token_file,
            format!("{join_token}\n").as_bytes(),
            0o600,
        )?;

        let app = axum::Router::new()
            .fallback(entry)
            .layer(DefaultBodyLimit::max(3 * 1024 * 1024))
            .with_state(state.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (shutdown, closed) = tokio::sync::watch::channel(false);
        let serve = tokio::spawn(accept_loop(listener, acceptor, app, closed));
        let background = vec![
            tokio::spawn(gc::run(state.clone(), config.gc_interval)),
            tokio::spawn(compactor(store, config.compact_interval)),
        ];
        tracing::info!(%url, kubeconfig = %kubeconfig.display(), "API server serving");
        Ok(ApiServer {
            local_addr,
            url,
            kubeconfig,
            admin_token: creds.admin_token,
            node_join_token: creds.node_join_token,
            join_token,
            join_token_file,
            serve,
            background,
            shutdown,
        })
    }

    /// Serves until the listener fails (it does not on its own).
    pub async fn wait(mut self) {
        let _ = (&mut self.serve).await;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.serve.abort();
        for t in &self.background {
            t.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    closed: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move { app.oneshot(req.map(Body::new)).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                // Dropping the connection closes it, with its watches.
                _ = closed.wait_for(|c| *c) => {}
            }
        });
    }
}

/// Authenticates, then hands the request to the handlers. Health endpoints are public.
async fn entry(
    AxState(state): AxState<Arc<objects::State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let public = matches!(uri.path(), "/healthz" | "/readyz" | "/livez");
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let who = match state.tokens.authenticate(auth) {
        Ok(w) => w,
        Err(_) if public => Identity::Node(String::new()),
        Err(e) => return e.into_response(),
    };
    tracing::debug!(%method, %uri, ?who, "request");
    handlers::handle(state, who, method, uri, headers, body).await
}

/// Compacts the store to the revision seen one interval ago, as kube-apiserver does.
async fn compactor(store: Arc<dyn Store>, interval: Duration) {
    let mut previous: Option<i64> = None;
    loop {
        tokio::time::sleep(interval).await;
        if let Some(rev) = previous
            && let Err(e) = store.compact(rev).await
        {
            tracing::warn!(revision = rev, error = %e, "compaction failed");
        }
        match store.revision().await {
            Ok(rev) => previous = Some(rev),
            Err(e) => tracing::warn!(error = %e, "compaction: read revision"),
        }
    }
}
