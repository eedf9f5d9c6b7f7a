//! Helpers shared by the store tests: backends on temp storage, bounded waits on watches.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_cluster::store::{EtcdStore, RedbOptions, RedbStore, StoreError, WatchEvent, WatchStream};
use keel_testkit::etcd::Etcd;

/// How long a test waits for one watch event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A redb store in a temp dir (removed when the dir guard drops, after the store).
pub async fn redb_store(opts: RedbOptions) -> (RedbStore, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("keel-store-")
        .tempdir()
        .expect("temp dir");
    let store = RedbStore::open_async(dir.path().to_path_buf(), opts)
        .await
        .expect("open redb store");
    (store, dir)
}

/// A fresh etcd (Debian's etcd-server on loopback) and a store connected to it.
pub async fn etcd_store() -> (EtcdStore, Etcd) {
    let etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd start task")
        .expect("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)");
    let store = EtcdStore::connect(&[etcd.endpoint()])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}\netcd log:\n{}",
                etcd.endpoint(),
                etcd.log()
            )
        });
    (store, etcd)
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The next item of the watch, progress included; panics after [`EVENT_TIMEOUT`].
pub async fn next_item(w: &mut WatchStream) -> Option<Result<WatchEvent, StoreError>> {
    tokio::time::timeout(EVENT_TIMEOUT, w.next())
        .await
        .unwrap_or_else(|_| panic!("no watch item within {EVENT_TIMEOUT:?}"))
}

/// The next change (skipping progress); panics on errors, the end, or a timeout.
pub async fn next_change(w: &mut WatchStream) -> WatchEvent {
    loop {
        match next_item(w).await {
            Some(Ok(WatchEvent::Progress { .. })) => continue,
            Some(Ok(event)) => return event,
            Some(Err(e)) => panic!("watch failed: {e}"),
            None => panic!("watch ended"),
        }
    }
}

/// The next `n` changes.
pub async fn next_changes(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_change(w).await);
    }
    out
}

/// Asserts that no change arrives within `wait`.
pub async fn assert_quiet(w: &mut WatchStream, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Err(_) => return,
            Ok(Some(Ok(WatchEvent::Progress { .. }))) => continue,
            Ok(other) => panic!("unexpected watch item: {other:?}"),
        }
    }
}

/// `(kind, key, revision)` of a change, for compact assertions.
pub fn summary(e: &WatchEvent) -> (&'static str, String, i64) {
    let kind = match e {
        WatchEvent::Put { prev: None, .. } => "create",
        WatchEvent::Put { prev: Some(_), .. } => "update",
        WatchEvent::Delete { .. } => "delete",
        WatchEvent::Progress { .. } => "progress",
    };
    (
        kind,
        String::from_utf8_lossy(e.key()).into_owned(),
        e.revision(),
    )
}
