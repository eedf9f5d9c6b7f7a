//! The running proxy: install (load/attach/pin), full resync from the pinned maps, then watch the
//! manifest file and apply only differences; serve /healthz and /metrics.
//!
//! `Proxy::start` does everything that can fail at start synchronously, so the caller sees the
//! error; the loop runs on its own thread with a current-thread tokio runtime. Stopping (or
//! crashing) leaves programs, links and maps installed: traffic keeps flowing until the next
//! start takes over, and `uninstall` removes them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keel_ebpf::SvcKey;

use crate::loader::{self, LoaderError};
use crate::manifests::{ManifestError, read_manifests};
use crate::maps::{MapsError, PinnedMaps};
use crate::model::{NodeContext, desired};
use crate::sync::{Applied, SyncError};

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Multi-document YAML of Services and EndpointSlices.
    pub manifests: PathBuf,
    /// cgroup v2 directory the socket hooks attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for the pins.
    pub bpffs_dir: PathBuf,
    /// /healthz (and /metrics) listener; kube-proxy's default is 0.0.0.0:10256.
    pub healthz_addr: SocketAddr,
    /// /metrics (and /healthz) listener; kube-proxy's default is 127.0.0.1:10249. None: off.
    pub metrics_addr: Option<SocketAddr>,
    /// How often the manifest file is checked for changes.
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
    let (want, skipped) = desired(&m.services, &m.slices, &cfg.node);
    for s in &skipped {
        tracing::warn!(object = %s.object, "skipped: {}", s.reason);
    }
    let mut guard = shared
        .lock()
        .map_err(|_| ProxyError::Sync("state lock poisoned".into()))?;
    let s = &mut *guard;
    let stats = s.applied.apply(&want, &mut s.maps)?;
    s.names = want.iter().map(|(k, d)| (*k, d.name.clone())).collect();
    let secs = start.elapsed().as_secs_f64();
    s.metrics.syncs += 1;
    s.metrics.sync_seconds_sum += secs;
    s.metrics.last_sync_seconds = secs;
    s.metrics.map_writes += stats.writes as u64;
    s.last_synced = Some(SystemTime::now());
    if stats.writes > 0 {
        tracing::info!(
            added = stats.services_added,
            removed = stats.services_removed,
            changed = stats.services_changed,
            writes = stats.writes,
            micros = (secs * 1e6) as u64,
            "service maps synced"
        );
    }
    Ok(stats.writes)
}

impl Proxy {
    /// Installs (or takes over) the programs, resyncs the maps fully, and starts watching.
    pub fn start(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        // Parse first: a typo in the manifests must not touch an installed proxy.
        read_manifests(&cfg.manifests)?;
        loader::install(&cfg.cgroup, &cfg.bpffs_dir)?;
        loader::install_tc(&cfg.bpffs_dir, &cfg.tc_interfaces, cfg.tc_netns.as_deref())?;
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
        let shared = Arc::new(Mutex::new(Shared {
            maps,
            applied,
            names: BTreeMap::new(),
            last_synced: None,
            metrics: Metrics::default(),
        }));
        sync_once(&cfg, &shared)?;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProxyError::Thread)?;
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
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
        let loop_shared = shared.clone();
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
                        let (c, s) = (cfg.clone(), loop_shared.clone());
                        // Map syscalls are blocking: keep them off the runtime's thread.
                        let res = tokio::task::spawn_blocking(move || sync_once(&c, &s)).await;
                        match res {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                tracing::error!("sync failed, keeping the previous state: {e}");
                                if let Ok(mut s) = loop_shared.lock() {
                                    s.metrics.sync_errors += 1;
                                }
                            }
                            Err(e) => tracing::error!("sync task: {e}"),
                        }
                    }
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
    Ok(loader::uninstall(bpffs_dir)?)
}
