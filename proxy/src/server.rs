//! `/healthz` (kube-proxy's contract: 200 with lastUpdated/currentTime once the maps are in sync,
//! 503 before) and `/metrics` in the Prometheus text format.
//!
//! The metrics text is written by hand: the per-service counters are read from the per-CPU map at
//! scrape time, which a registry of pre-declared metric objects does not model.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use keel_ebpf::proto_name;

use crate::proxy::Shared;

pub fn router(shared: Arc<Mutex<Shared>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

async fn healthz(State(shared): State<Arc<Mutex<Shared>>>) -> impl IntoResponse {
    let last = shared.lock().map(|s| s.last_synced).unwrap_or(None);
    let body = serde_json::json!({
        "lastUpdated": last.map(rfc3339),
        "currentTime": rfc3339(SystemTime::now()),
    })
    .to_string();
    let code = if last.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [("content-type", "application/json")], body)
}

async fn metrics(State(shared): State<Arc<Mutex<Shared>>>) -> impl IntoResponse {
    let text = match shared.lock() {
        Ok(s) => render(&s),
        Err(_) => String::from("# proxy state poisoned\n"),
    };
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}

fn render(s: &Shared) -> String {
    let mut o = String::new();
    let m = &s.metrics;
    let _ = writeln!(
        o,
        "# HELP keel_proxy_syncs_total Syncs of the service maps."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_syncs_total counter");
    let _ = writeln!(o, "keel_proxy_syncs_total {}", m.syncs);
    let _ = writeln!(
        o,
        "# HELP keel_proxy_sync_errors_total Syncs that failed (bad manifests, map errors)."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_sync_errors_total counter");
    let _ = writeln!(o, "keel_proxy_sync_errors_total {}", m.sync_errors);
    let _ = writeln!(
        o,
        "# HELP keel_proxy_watch_errors_total Failed lists and watches of the API source (each retried)."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_watch_errors_total counter");
    let _ = writeln!(o, "keel_proxy_watch_errors_total {}", m.watch_errors);
    let _ = writeln!(
        o,
        "# HELP keel_proxy_sync_duration_seconds Time from reading the source to the last map write."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_sync_duration_seconds summary");
    let _ = writeln!(
        o,
        "keel_proxy_sync_duration_seconds_sum {}",
        m.sync_seconds_sum
    );
    let _ = writeln!(o, "keel_proxy_sync_duration_seconds_count {}", m.syncs);
    let _ = writeln!(
        o,
        "# HELP keel_proxy_last_sync_duration_seconds Duration of the last sync."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_last_sync_duration_seconds gauge");
    let _ = writeln!(
        o,
        "keel_proxy_last_sync_duration_seconds {}",
        m.last_sync_seconds
    );
    let _ = writeln!(
        o,
        "# HELP keel_proxy_map_writes_total Map updates and deletes done by syncs."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_map_writes_total counter");
    let _ = writeln!(o, "keel_proxy_map_writes_total {}", m.map_writes);
    let _ = writeln!(o, "# HELP keel_proxy_map_entries Entries in each BPF map.");
    let _ = writeln!(o, "# TYPE keel_proxy_map_entries gauge");
    for (map, n) in s.maps.fill().entries {
        let _ = writeln!(o, "keel_proxy_map_entries{{map=\"{map}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP keel_proxy_service_connections_total connect() calls sent to a backend, per frontend."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_service_connections_total counter");
    let mut datagrams = String::new();
    let mut refused = String::new();
    for (key, svc) in &s.applied.services {
        let Ok(st) = s.maps.stats(svc.val.svc_id) else {
            continue;
        };
        let name = s.names.get(key).map(String::as_str).unwrap_or("");
        let ip = key.ip().map(|i| i.to_string()).unwrap_or_default();
        let labels = format!(
            "service=\"{name}\",frontend=\"{ip}:{}\",protocol=\"{}\"",
            key.host_port(),
            proto_name(key.proto)
        );
        let _ = writeln!(
            o,
            "keel_proxy_service_connections_total{{{labels}}} {}",
            st.connects
        );
        let _ = writeln!(
            datagrams,
            "keel_proxy_service_datagrams_total{{{labels}}} {}",
            st.datagrams
        );
        let _ = writeln!(
            refused,
            "keel_proxy_service_refused_total{{{labels}}} {}",
            st.refused
        );
    }
    let _ = writeln!(
        o,
        "# HELP keel_proxy_service_datagrams_total Unconnected UDP datagrams sent to a backend."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_service_datagrams_total counter");
    o.push_str(&datagrams);
    let _ = writeln!(
        o,
        "# HELP keel_proxy_service_refused_total Connections refused for lack of a backend."
    );
    let _ = writeln!(o, "# TYPE keel_proxy_service_refused_total counter");
    o.push_str(&refused);
    o
}

/// Binds `addr` (port 0 picks one) and returns the bound address with the serving future.
pub async fn bind(
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        async move { axum::serve(listener, router(shared)).await },
    ))
}
