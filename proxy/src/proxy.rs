//! The running proxy: install (load/attach/pin), full resync from the pinned maps, then follow the
//! source (the manifest file, or the API server's watches) and apply only differences; serve
//! /healthz and /metrics.
//!
//! `Proxy::start` (file) and `Proxy::start_api` (API server) do everything that can fail at start
//! synchronously, so the caller sees the error; the loop runs on its own thread with a
//! current-thread tokio runtime. Stopping (or crashing) leaves programs, links and maps
//! installed: traffic keeps flowing until the next start takes over, and `uninstall` removes
//! them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keel_ebpf::SvcKey;

use futures::{FutureExt, StreamExt};

use crate::kube_source::{self, ApiSource, Index, KubeSourceError, SourceEvent, Update};
use crate::loader::{self, LoaderError};
use crate::manifests::{ManifestError, read_manifests};
use crate::maps::{MapsError, PinnedMaps};
use crate::model::{NodeContext, desired_with_pods};
use crate::sync::{Applied, SyncError};

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Multi-document YAML of Services, EndpointSlices and Pods (the file source, `Proxy::start`;
    /// `Proxy::start_api` does not read it).
    pub manifests: PathBuf,
    /// cgroup v2 directory the socket hooks attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for the pins.
    pub bpffs_dir: PathBuf,
    /// /healthz (and /metrics) listener; kube-proxy's default is 0.0.0.0:10256.
    pub healthz_addr: SocketAddr,
    /// /metrics (and /healthz) listener; kube-proxy's default is 127.0.0.1:10249. None: off.
    pub metrics_addr: Option<SocketAddr>,
    /// How often the manifest file is checked for changes (file source).
    pub poll_interval: Duration,
    pub node: NodeContext,
    /// Interfaces whose ingress gets the tc NodePort program (external interface, pod veths).
    pub tc_interfaces: Vec<String>,
    /// Network namespace those interfaces live in (None: the proxy's own).
    pub tc_netns: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    #[error(transparent)]
    Api(#[from] KubeSourceError),
    #[error("sync the service maps: {0}")]
    Sync(String),
    #[error("listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("start the proxy thread: {0}")]
    Thread(std::io::Error),
}

impl From<SyncError<MapsError>> for ProxyError {
    fn from(e: SyncError<MapsError>) -> Self {
        ProxyError::Sync(e.to_string())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub syncs: u64,
    pub sync_errors: u64,
    /// Failed lists/watches of the API source (the watcher retries each).
    pub watch_errors: u64,
    pub sync_seconds_sum: f64,
    pub last_sync_seconds: f64,
    pub map_writes: u64,
}

/// State shared by the sync loop and the HTTP handlers.
pub struct Shared {
    pub maps: PinnedMaps,
    pub applied: Applied,
    pub names: BTreeMap<SvcKey, String>,
    pub last_synced: Option<SystemTime>,
    pub metrics: Metrics,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Mutex<Shared>>,
    healthz: SocketAddr,
    metrics: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Reads the manifests and applies them; returns the number of map writes.
fn sync_once(cfg: &ProxyConfig, shared: &Mutex<Shared>) -> Result<usize, ProxyError> {
    let start = Instant::now();
    let m = read_manifests(&cfg.manifests)?;
    let (want, skipped) = desired_with_pods(&m.services, &m.slices, &m.pods, &cfg.node);
    for s in &skipped {
        tracing::warn!(object = %s.object, "skipped: {}", s.reason);
    }
    apply_update(shared, Update::Full(want), start)
}

/// Applies a full desired state or a list of changed frontends; records metrics. `start` is
/// when the work for this sync began (reading the source included).
fn apply_update(
    shared: &Mutex<Shared>,
    update: Update,
    start: Instant,
) -> Result<usize, ProxyError> {
    let mut guard = shared
        .lock()
        .map_err(|_| ProxyError::Sync("state lock poisoned".into()))?;
    let s = &mut *guard;
    let (writes, changed) = match update {
        Update::Full(want) => {
            let stats = s.applied.apply(&want, &mut s.maps)?;
            s.names = want.iter().map(|(k, d)| (*k, d.name.clone())).collect();
            let changed = stats.services_added + stats.services_changed + stats.services_removed;
            (stats.writes, changed)
        }
        Update::Changes(changes) => {
            let (mut writes, mut changed) = (0, 0);
            for (key, want) in &changes {
                let w = s.applied.apply_one(key, want.as_ref(), &mut s.maps)?;
                match want {
                    Some(d) => s.names.insert(*key, d.name.clone()),
                    None => s.names.remove(key),
                };
                writes += w;
                changed += usize::from(w > 0);
            }
            (writes, changed)
        }
    };
    let secs = start.elapsed().as_secs_f64();
    s.metrics.syncs += 1;
    s.metrics.sync_seconds_sum += secs;
    s.metrics.last_sync_seconds = secs;
    s.metrics.map_writes += writes as u64;
    s.last_synced = Some(SystemTime::now());
    if writes > 0 {
        tracing::info!(
            frontends = changed,
            writes,
            micros = (secs * 1e6) as u64,
            "service maps synced"
        );
    }
    Ok(writes)
}

/// Installs (or takes over) the programs and rebuilds the applied state from the pinned maps.
fn install(cfg: &ProxyConfig) -> Result<Arc<Mutex<Shared>>, ProxyError> {
    loader::install(&cfg.cgroup, &cfg.bpffs_dir)?;
    loader::install_tc(&cfg.bpffs_dir, &cfg.tc_interfaces, cfg.tc_netns.as_deref())?;
    if !cfg.tc_interfaces.is_empty()
        && let Err(e) = crate::snat::ensure(cfg.tc_netns.as_deref())
    {
        tracing::warn!(
            "the masquerade rule for NodePort flows is missing ({e}): NodePorts reach only \
             backends on this node (install iptables)"
        );
    }
    let mut maps = PinnedMaps::open(&cfg.bpffs_dir)?;
    let (applied, garbage) = maps.dump()?;
    maps.collect_garbage(&garbage)?;
    let stale = maps.gc_affinity(&applied.backend_ids())?;
    tracing::info!(
        services = applied.services.len(),
        backends = applied.backend_count(),
        stale_affinity = stale,
        "resuming from pinned maps"
    );
    Ok(Arc::new(Mutex::new(Shared {
        maps,
        applied,
        names: BTreeMap::new(),
        last_synced: None,
        metrics: Metrics::default(),
    })))
}

fn runtime() -> Result<tokio::runtime::Runtime, ProxyError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ProxyError::Thread)
}

fn count_error(shared: &Mutex<Shared>) {
    if let Ok(mut s) = shared.lock() {
        s.metrics.sync_errors += 1;
    }
}

/// The file source: polls the manifests and resyncs fully when they change.
async fn file_loop(
    cfg: ProxyConfig,
    shared: Arc<Mutex<Shared>>,
    mut stop_rx: tokio::sync::oneshot::Receiver<()>,
) {
    let mut last = std::fs::read(&cfg.manifests).ok();
    loop {
        tokio::select! {
            _ = &mut stop_rx => break,
            _ = tokio::time::sleep(cfg.poll_interval) => {}
        }
        let now = std::fs::read(&cfg.manifests).ok();
        if now.is_none() || now == last {
            continue;
        }
        last = now;
        let (c, s) = (cfg.clone(), shared.clone());
        // Map syscalls are blocking: keep them off the runtime's thread.
        match tokio::task::spawn_blocking(move || sync_once(&c, &s)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!("sync failed, keeping the previous state: {e}");
                count_error(&shared);
            }
            Err(e) => tracing::error!("sync task: {e}"),
        }
    }
}

/// Events taken in one batch at most: a burst (a relist) is applied in few syncs, and the
/// stop signal is still seen.
const MAX_BATCH: usize = 4096;

/// After a failed write, a full resync is tried again this much later even if no event comes.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The API source: watcher events into the index; each batch of events becomes one update (a
/// full diff after a (re)list, the changed frontends otherwise).
async fn api_loop(
    client: kube::Client,
    node: crate::model::NodeContext,
    shared: Arc<Mutex<Shared>>,
    mut stop_rx: tokio::sync::oneshot::Receiver<()>,
) {
    let pod_fields = kube_source::pod_field_selector(&node);
    let mut events = kube_source::events(client, pod_fields.as_deref());
    let mut index = Index::new(node);
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            _ = &mut stop_rx => break,
            ev = events.next() => match ev {
                Some(ev) => Some(ev),
                None => {
                    // kube-rs watchers retry for ever; an end means the client is gone.
                    tracing::error!("the API watches ended; the maps keep their last state");
                    break;
                }
            },
            _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)),
                if retry.is_some() => None,
        };
        let start = Instant::now();
        let mut batch: Vec<SourceEvent> = first.into_iter().collect();
        // Whatever else has arrived goes into the same sync.
        while batch.len() < MAX_BATCH {
            match events.next().now_or_never() {
                Some(Some(ev)) => batch.push(ev),
                _ => break,
            }
        }
        if retry.take().is_some() {
            index.request_full();
        }
        for ev in batch {
            match ev {
                SourceEvent::Service(e) => index.on_service(*e),
                SourceEvent::Slice(e) => index.on_slice(*e),
                SourceEvent::Pod(e) => index.on_pod(*e),
                SourceEvent::Error { kind, error } => {
                    if kind == "Pod"
                        && kube_source::is_forbidden(&error)
                        && index.pods_unavailable()
                    {
                        tracing::warn!(
                            "this node's Pods cannot be listed ({error}): hostPorts are not \
                             served until list/watch on pods is granted; Services are"
                        );
                    }
                    tracing::warn!(kind, "watch failed, the watcher retries: {error}");
                    if let Ok(mut s) = shared.lock() {
                        s.metrics.watch_errors += 1;
                    }
                }
            }
        }
        let (update, skipped) = index.take_update();
        for s in &skipped {
            tracing::warn!(object = %s.object, "skipped: {}", s.reason);
        }
        let Some(update) = update else {
            continue;
        };
        let s = shared.clone();
        // Map syscalls are blocking: keep them off the runtime's thread.
        let failed =
            match tokio::task::spawn_blocking(move || apply_update(&s, update, start)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("sync task: {e}")),
            };
        if let Some(e) = failed {
            // The maps may now hold part of the update: the next sync is a full diff.
            tracing::error!("sync failed, full resync in {RETRY_AFTER:?}: {e}");
            count_error(&shared);
            retry = Some(tokio::time::Instant::now() + RETRY_AFTER);
        }
    }
}

impl Proxy {
    /// File source: installs (or takes over) the programs, resyncs the maps fully from the
    /// manifests, and starts watching the file.
    pub fn start(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        // Parse first: a typo in the manifests must not touch an installed proxy.
        read_manifests(&cfg.manifests)?;
        let shared = install(&cfg)?;
        sync_once(&cfg, &shared)?;
        let rt = runtime()?;
        let (c, s) = (cfg.clone(), shared.clone());
        Self::serve(&cfg, shared, rt, move |stop| file_loop(c, s, stop))
    }

    /// API source: builds the client (a bad kubeconfig or refused credentials fail here, before
    /// the installed proxy is touched), installs (or takes over) the programs and starts the
    /// watchers. The maps keep what they hold until Services, EndpointSlices and (with a node
    /// name) this node's Pods are listed (Pods the credentials may not list are left out);
    /// then a full resync, then only the frontends each event changes. /healthz
    /// answers 503 until that first sync (`syncs()` counts it).
    pub fn start_api(cfg: ProxyConfig, source: &ApiSource) -> Result<Proxy, ProxyError> {
        let rt = runtime()?;
        let client = rt.block_on(async {
            let (client, url) = kube_source::client(source).await?;
            kube_source::probe(&client, &url).await?;
            match kube_source::pod_field_selector(&cfg.node) {
                Some(f) => {
                    tracing::info!(%url, pods = %f, "watching Services, EndpointSlices and Pods")
                }
                None => tracing::info!(
                    %url,
                    "watching Services and EndpointSlices (no node name: no hostPorts)"
                ),
            }
            Ok::<_, KubeSourceError>(client)
        })?;
        let shared = install(&cfg)?;
        let (node, s) = (cfg.node.clone(), shared.clone());
        Self::serve(&cfg, shared, rt, move |stop| {
            api_loop(client, node, s, stop)
        })
    }

    /// Binds the HTTP listeners and runs `main_loop` with them on the proxy's thread.
    fn serve<F, Fut>(
        cfg: &ProxyConfig,
        shared: Arc<Mutex<Shared>>,
        rt: tokio::runtime::Runtime,
        main_loop: F,
    ) -> Result<Proxy, ProxyError>
    where
        F: FnOnce(tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (healthz, healthz_srv) = rt
            .block_on(crate::server::bind(cfg.healthz_addr, shared.clone()))
            .map_err(|source| ProxyError::Listen {
                addr: cfg.healthz_addr,
                source,
            })?;
        let (metrics, metrics_srv) = match cfg.metrics_addr {
            Some(addr) => {
                let (a, srv) = rt
                    .block_on(crate::server::bind(addr, shared.clone()))
                    .map_err(|source| ProxyError::Listen { addr, source })?;
                (Some(a), Some(srv))
            }
            None => (None, None),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("keel-proxy".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(async move {
                        if let Err(e) = healthz_srv.await {
                            tracing::error!("healthz server: {e}");
                        }
                    });
                    if let Some(srv) = metrics_srv {
                        tokio::spawn(async move {
                            if let Err(e) = srv.await {
                                tracing::error!("metrics server: {e}");
                            }
                        });
                    }
                    main_loop(stop_rx).await;
                });
            })
            .map_err(ProxyError::Thread)?;
        Ok(Proxy {
            shared,
            healthz,
            metrics,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The bound /healthz address (useful when configured with port 0).
    pub fn healthz_addr(&self) -> SocketAddr {
        self.healthz
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Number of successful syncs so far (tests wait on it after editing the manifests).
    pub fn syncs(&self) -> u64 {
        self.shared.lock().map(|s| s.metrics.syncs).unwrap_or(0)
    }

    /// Stops watching and serving. Programs, links and maps stay installed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `keel proxy uninstall`: removes every program, link and pin. Returns what was removed.
pub fn uninstall(bpffs_dir: &Path) -> Result<Vec<PathBuf>, ProxyError> {
    let removed = loader::uninstall(bpffs_dir)?;
    if removed.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("tc"))
    }) {
        crate::snat::remove();
    }
    Ok(removed)
}
