//! Runs the CRI endpoint: opens the image store and the pod and container runtime, binds the unix socket (0660, stale sockets
//! replaced, a live one refused), serves RuntimeService and ImageService on it with tonic, serves
//! Prometheus metrics over HTTP, runs the streaming server (exec, port-forward), and on shutdown stops accepting, gives in-flight RPCs
//! [`DRAIN_TIMEOUT`] to finish and removes the socket.
//!
//! It owns process-level plumbing only: RPC behaviour lives in the per-RPC files, metrics in
//! [`crate::instrument`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use keel_runtime::container::{ContainerRuntime, RuntimeOptions};
use keel_runtime::image::RegistryOptions;
use keel_runtime::pod::PodRuntime;
use keel_runtime::{ImageError, ImageStore};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::image_service_server::ImageServiceServer;
use crate::api::runtime_service_server::RuntimeServiceServer;
use crate::client::MAX_MESSAGE_SIZE;
use crate::container_events;
use crate::instrument::Metrics;
use crate::service::{CriService, Settings};
use crate::streaming::{self, Streaming};

/// Default socket path (kubelet: `--container-runtime-endpoint=unix:///run/keel/keel.sock`).
pub const DEFAULT_SOCKET: &str = "/run/keel/keel.sock";
/// Socket permissions: root and the socket's group may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// How long in-flight RPCs (a pull, typically) may run on after the shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `keel cri` needs to run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// State root (images under `<root>/images`).
    pub root: PathBuf,
    pub socket: PathBuf,
    pub registry: RegistryOptions,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// Where to serve `GET /metrics`; None disables the endpoint.
    pub metrics_address: Option<SocketAddr>,
    /// Run dir for container state (libcontainer's); pods' pins go beside it
    /// (`/run/keel/containers` -> `/run/keel/pods`).
    pub run_dir: PathBuf,
    /// cgroup parent of pods that name none (relative to each hierarchy's root).
    pub cgroup_parent: String,
    /// Where the streaming server (exec, port-forward) listens; port 0 picks a free one.
    /// Default [`crate::streaming::DEFAULT_ADDRESS`].
    pub stream_address: SocketAddr,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("open image store under {root}: {source}")]
    Store {
        root: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("{op} {path}: {source}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {path} is in use by a running server; stop it first")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("open pod and container state under {root}: {reason}")]
    Runtime { root: PathBuf, reason: String },
    #[error("streaming server {addr}: {source}")]
    Streaming {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server on {path}: {source}")]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves CRI until `shutdown` completes, then drains and removes the socket.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let images = ImageStore::open(&config.root, config.registry.clone()).map_err(|source| {
        ServerError::Store {
            root: config.root.clone(),
            source,
        }
    })?;
    let mut opts = RuntimeOptions::new(&config.root);
    opts.run_dir = config.run_dir.clone();
    opts.cgroup_parent = config.cgroup_parent.clone();
    let runtime_err = |reason: String| ServerError::Runtime {
        root: config.root.clone(),
        reason,
    };
    let containers = ContainerRuntime::open(opts).map_err(|e| runtime_err(e.to_string()))?;
    let pods = PodRuntime::open_default(containers).map_err(|e| runtime_err(e.to_string()))?;
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);

    let metrics_task = match config.metrics_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Metrics { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServerError::Metrics { addr, source })?;
            tracing::info!(address = %local, "serving metrics on http://{local}/metrics");
            Some(tokio::spawn(serve_metrics(
                listener,
                metrics.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };

    let stream_err = |source| ServerError::Streaming {
        addr: config.stream_address,
        source,
    };
    let stream_listener = tokio::net::TcpListener::bind(config.stream_address)
        .await
        .map_err(stream_err)?;
    let stream_local = stream_listener.local_addr().map_err(stream_err)?;
    tracing::info!(address = %stream_local, "streaming server (exec, port-forward) on http://{stream_local}");

    let (listener, _socket) = bind_socket(&config.socket)?;
    let svc = Arc::new(CriService::new(
        images,
        pods,
        metrics,
        Settings {
            root: config.root.clone(),
            socket: config.socket.clone(),
            cni_conf_dir: config.cni_conf_dir.clone(),
            cni_bin_dir: config.cni_bin_dir.clone(),
            metrics_address: config.metrics_address,
            registry: config.registry.clone(),
        },
        Streaming::new(stream_local),
    ));
    let streaming_task = tokio::spawn(streaming::serve(
        stream_listener,
        Arc::clone(&svc),
        stop_rx.clone(),
    ));
    let events_task = tokio::spawn(container_events::watch(Arc::clone(&svc), stop_rx.clone()));
    let runtime = RuntimeServiceServer::from_arc(Arc::clone(&svc))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let image = ImageServiceServer::from_arc(svc)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let mut grpc_stop = stop_rx.clone();
    let grpc = tonic::transport::Server::builder()
        .add_service(runtime)
        .add_service(image)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
    tracing::info!(socket = %config.socket.display(), "serving CRI v1");

    tokio::pin!(grpc);
    let transport = |source: tonic::transport::Error| ServerError::Transport {
        path: config.socket.clone(),
        source,
    };
    let result = tokio::select! {
        r = &mut grpc => r.map_err(transport),
        () = shutdown => {
            tracing::info!("shutting down: no new connections, draining in-flight RPCs");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut grpc).await {
                Ok(r) => r.map_err(transport),
                Err(_) => {
                    tracing::warn!(timeout = ?DRAIN_TIMEOUT, "RPCs still running; stopping anyway");
                    Ok(())
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    let _ = events_task.await;
    let _ = streaming_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    result
    // `_socket` drops here and removes the socket.
}

/// Removes the socket it bound when dropped, unless something else replaced it meanwhile.
#[derive(Debug)]
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "remove socket");
                }
            }
            _ => {}
        }
    }
}

/// Binds `path` as a unix socket with [`SOCKET_MODE`]: creates the parent (0711, as containerd
/// does), replaces a stale socket left by a killed server, refuses a live one or a non-socket.
/// Must run inside a tokio runtime.
fn bind_socket(path: &Path) -> Result<(tokio::net::UnixListener, SocketGuard), ServerError> {
    let io = |op: &'static str| {
        move |source| ServerError::Socket {
            op,
            path: path.to_owned(),
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(|source| ServerError::Socket {
                op: "create socket directory",
                path: parent.to_owned(),
                source,
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(ServerError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(io("remove stale socket"))?;
            }
            Err(e) => return Err(io("probe existing socket")(e)),
        },
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("stat socket")(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("bind"))?;
    let meta = std::fs::symlink_metadata(path).map_err(io("stat socket"))?;
    let guard = SocketGuard {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // Until this chmod the socket has the umask's mode; the default umask (022) leaves no write
    // bit for others, and connecting needs it, so nobody else can connect in between.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io("set permissions of"))?;
    Ok((listener, guard))
}

/// Serves `GET /metrics` until `stop` turns true. One HTTP/1 connection per scrape.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
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
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = metrics_response(&metrics, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics endpoint: connection");
            }
        });
    }
}

fn metrics_response(
    metrics: &Metrics,
    method: &hyper::Method,
    path: &str,
) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&hyper::Method::GET, "/metrics") => (
            hyper::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&hyper::Method::GET, _) => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/keel/keel.sock");
        let (listener, guard) = bind_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(
            dir_mode & 0o022,
            0,
            "socket dir {dir_mode:o} writable by others"
        );
        assert!(matches!(
            bind_socket(&path),
            Err(ServerError::SocketInUse { .. })
        ));
        // Closing the listener without the guard leaves a stale socket, as a killed server does.
        drop(listener);
        std::mem::forget(guard);
        assert!(path.exists());
        let (_listener, guard) = bind_socket(&path).unwrap();
        drop(guard);
        assert!(!path.exists(), "the guard removes its socket");
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.sock");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind_socket(&path),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn metrics_are_served_at_slash_metrics_only() {
        let m = Metrics::new();
        let r = metrics_response(&m, &hyper::Method::GET, "/metrics");
        assert_eq!(r.status(), hyper::StatusCode::OK);
        let r = metrics_response(&m, &hyper::Method::GET, "/");
        assert_eq!(r.status(), hyper::StatusCode::NOT_FOUND);
        let r = metrics_response(&m, &hyper::Method::POST, "/metrics");
        assert_eq!(r.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);
    }
}
