//! Behaviour of the embedded redb store beyond the conformance suite: persistence across
//! reopen, slow watchers, and the end of watches when the store closes.

mod support;

use std::time::Duration;

use futures::StreamExt;
use keel_cluster::store::{ListOptions, RedbOptions, RedbStore, Store, WatchEvent, WatchOptions};
use support::{b, next_change, next_changes, next_item, redb_store, summary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_state_history_and_revision() {
    let (store, dir) = redb_store(RedbOptions::default()).await;
    let a = store.create(b"/x/a", b("1")).await.expect("create");
    store
        .update(b"/x/a", b("2"), a.mod_revision)
        .await
        .expect("update");
    store.create(b"/x/b", b("1")).await.expect("create");
    let del = store.delete(b"/x/b", None).await.expect("delete");
    store.compact(a.mod_revision).await.expect("compact");
    let revision = store.revision().await.expect("revision");
    assert_eq!(revision, del.revision);
    drop(store);

    let store = RedbStore::open_async(dir.path().to_path_buf(), RedbOptions::default())
        .await
        .expect("reopen");
    store.verify().await.expect("consistent after reopen");
    assert_eq!(store.revision().await.expect("revision"), revision);
    let listed = store
        .list(b"/x/", ListOptions::default())
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].value, b("2"));

    // History after the compaction point survived, and so did the compaction point.
    let mut w = store
        .watch(b"/x/", a.mod_revision, WatchOptions::default())
        .await
        .expect("watch");
    let events: Vec<_> = next_changes(&mut w, 3)
        .await
        .iter()
        .map(|e| summary(e).0)
        .collect();
    assert_eq!(events, vec!["update", "create", "delete"]);
    let mut old = store
        .watch(b"/x/", a.mod_revision - 1, WatchOptions::default())
        .await
        .expect("watch");
    assert!(matches!(
        next_item(&mut old).await,
        Some(Err(keel_cluster::StoreError::Compacted { .. }))
    ));

    // Revisions continue from where they were.
    let c = store.create(b"/x/c", b("1")).await.expect("create");
    assert_eq!(c.mod_revision, revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_never_blocks_writers_and_misses_nothing() {
    let (store, _dir) = redb_store(RedbOptions {
        watch_buffer: 4,
        ..Default::default()
    })
    .await;
    let from = store.revision().await.expect("revision");
    let mut slow = store
        .watch(b"/s/", from, WatchOptions::default())
        .await
        .expect("watch");
    // Start following, then stop reading while 300 writes go through a 4-slot buffer.
    let first = store.create(b"/s/first", b("v")).await.expect("create");
    assert_eq!(next_change(&mut slow).await.revision(), first.mod_revision);
    let writes = async {
        for i in 0..300 {
            store
                .create(format!("/s/{i:03}").as_bytes(), b("v"))
                .await
                .expect("create");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), writes)
        .await
        .expect("writers finish without the watcher reading");
    let events = next_changes(&mut slow, 300).await;
    let revisions: Vec<i64> = events.iter().map(WatchEvent::revision).collect();
    let want: Vec<i64> = (first.mod_revision + 1..=first.mod_revision + 300).collect();
    assert_eq!(revisions, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_store_ends_watches_and_frees_the_file() {
    let (store, dir) = redb_store(RedbOptions::default()).await;
    let mut w = store
        .watch(b"", 0, WatchOptions::default())
        .await
        .expect("watch");
    store.create(b"/a", b("v")).await.expect("create");
    next_change(&mut w).await;
    drop(store);
    let end = tokio::time::timeout(Duration::from_secs(10), w.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "watch ends with the store: {end:?}"
    );
    let reopened = RedbStore::open_async(dir.path().to_path_buf(), RedbOptions::default())
        .await
        .expect("reopen after drop");
    assert!(reopened.get(b"/a").await.expect("get").kv.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_compaction_spans_several_transactions() {
    let opts = RedbOptions {
        compact_batch: 100,
        ..Default::default()
    };
    let (store, _dir) = redb_store(opts).await;
    let kv = store.create(b"/big/k", b("0")).await.expect("create");
    let mut rev = kv.mod_revision;
    // One key rewritten 250 times: compaction takes three 100-revision transactions.
    let value = b("x");
    for _ in 0..250 {
        rev = store
            .update(b"/big/k", value.clone(), rev)
            .await
            .expect("update")
            .mod_revision;
    }
    store.create(b"/big/other", b("o")).await.expect("create");
    store.compact(rev).await.expect("compact");
    store.verify().await.expect("consistent after compaction");
    let at = store
        .list(
            b"/big/",
            ListOptions {
                revision: Some(rev),
                ..Default::default()
            },
        )
        .await
        .expect("list at compaction point");
    assert_eq!(at.items.len(), 1);
    assert_eq!(at.items[0].mod_revision, rev);
    assert_eq!(
        store
            .list(b"/big/", ListOptions::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_opens_the_redb_file_in_the_data_dir() {
    let dir = tempfile::Builder::new()
        .prefix("keel-store-")
        .tempdir()
        .expect("temp dir");
    let data_dir = dir.path().join("server");
    let config = keel_cluster::StoreConfig::Redb {
        data_dir: data_dir.clone(),
    };
    let store = keel_cluster::store::open(&config).await.expect("open");
    store.create(b"/k", b("v")).await.expect("create");
    assert!(
        data_dir
            .join(keel_cluster::store::redb::FILE_NAME)
            .is_file()
    );
}
