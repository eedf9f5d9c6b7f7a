//! The store conformance suite: every case runs against the embedded redb store and against a
//! real etcd (Debian's etcd-server, started per test on loopback by keel-testkit). A backend
//! that passes behaves as Kubernetes' storage layer expects of etcd3.
//!
//! Cases take `&S` with `S: Store + ?Sized`; the etcd runs go through `&dyn Store` so the trait
//! stays object-safe.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use keel_cluster::store::{ListOptions, Store, StoreError, WatchEvent, WatchOptions};
use support::{assert_quiet, b, next_change, next_changes, next_item, summary};

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redb_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = super::support::redb_store(Default::default()).await;
                    super::$case(&store).await;
                }
            )*
        }
        mod etcd_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _etcd) = super::support::etcd_store().await;
                    let store: &dyn keel_cluster::store::Store = &store;
                    super::$case(store).await;
                }
            )*
        }
    };
}

conformance!(
    crud_round_trip,
    failed_writes_answer_and_change_nothing,
    list_pages_with_continue_at_one_revision,
    list_at_an_older_revision,
    prefixes_are_isolated,
    watch_from_a_revision_sees_exactly_the_later_changes,
    watch_resumes_from_the_last_seen_revision,
    compacted_revisions_are_gone,
    concurrent_writers_and_a_watcher_see_every_change_once,
    many_writers_with_conflicting_updates,
    idle_watch_reports_progress,
);

async fn crud_round_trip<S: Store + ?Sized>(s: &S) {
    let start = s.revision().await.expect("revision");
    let created = s.create(b"/r/a", b("one")).await.expect("create");
    assert_eq!(&created.key[..], b"/r/a");
    assert_eq!(created.value, b("one"));
    assert!(created.create_revision > start);
    assert_eq!(created.create_revision, created.mod_revision);

    let got = s.get(b"/r/a").await.expect("get");
    assert_eq!(got.kv.as_ref(), Some(&created));
    assert!(got.revision >= created.mod_revision);

    let updated = s
        .update(b"/r/a", b("two"), created.mod_revision)
        .await
        .expect("update");
    assert_eq!(updated.value, b("two"));
    assert_eq!(updated.create_revision, created.create_revision);
    assert!(updated.mod_revision > created.mod_revision);
    assert_eq!(s.get(b"/r/a").await.expect("get").kv, Some(updated.clone()));

    let deleted = s
        .delete(b"/r/a", Some(updated.mod_revision))
        .await
        .expect("delete");
    assert_eq!(deleted.kv, updated, "delete returns the last state");
    assert!(deleted.revision > updated.mod_revision);
    let gone = s.get(b"/r/a").await.expect("get");
    assert_eq!(gone.kv, None);
    assert_eq!(gone.revision, deleted.revision);

    // A new incarnation gets a new create revision; an unconditional delete works too.
    let again = s.create(b"/r/a", b("three")).await.expect("recreate");
    assert!(again.create_revision > deleted.revision);
    let deleted = s.delete(b"/r/a", None).await.expect("delete");
    assert_eq!(deleted.kv, again);
    assert_eq!(s.revision().await.expect("revision"), deleted.revision);
}

async fn failed_writes_answer_and_change_nothing<S: Store + ?Sized>(s: &S) {
    let kv = s.create(b"/f/a", b("v")).await.expect("create");
    let before = s.revision().await.expect("revision");

    match s.create(b"/f/a", b("w")).await {
        Err(StoreError::AlreadyExists { key }) => assert_eq!(key, "/f/a"),
        other => panic!("create over existing: {other:?}"),
    }
    match s.update(b"/f/a", b("w"), kv.mod_revision - 1).await {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "/f/a");
            assert_eq!(expected, kv.mod_revision - 1);
            assert_eq!(actual, kv.mod_revision);
        }
        other => panic!("stale update: {other:?}"),
    }
    match s.delete(b"/f/a", Some(kv.mod_revision + 100)).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, kv.mod_revision),
        other => panic!("stale delete: {other:?}"),
    }
    match s.update(b"/f/missing", b("w"), kv.mod_revision).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "/f/missing"),
        other => panic!("update of absent key: {other:?}"),
    }
    // An absent key has mod revision 0 in etcd: the compare must still not create it.
    match s.update(b"/f/missing", b("w"), 0).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("update of absent key at 0: {other:?}"),
    }
    for expected in [None, Some(kv.mod_revision)] {
        match s.delete(b"/f/missing", expected).await {
            Err(StoreError::NotFound { .. }) => {}
            other => panic!("delete of absent key: {other:?}"),
        }
    }

    assert_eq!(s.revision().await.expect("revision"), before);
    assert_eq!(s.get(b"/f/a").await.expect("get").kv, Some(kv));
    assert_eq!(s.get(b"/f/missing").await.expect("get").kv, None);
}

async fn list_pages_with_continue_at_one_revision<S: Store + ?Sized>(s: &S) {
    for i in 0..25 {
        s.create(format!("/p/{i:02}").as_bytes(), b(&format!("v{i}")))
            .await
            .expect("create");
    }
    s.create(b"/q/outside", b("x")).await.expect("create");

    let opts = ListOptions {
        limit: 10,
        ..Default::default()
    };
    let first = s.list(b"/p/", opts).await.expect("list");
    assert_eq!(first.items.len(), 10);
    assert!(first.more());
    let revision = first.revision;

    // Written between pages: invisible to the later pages, which read at the first's revision.
    s.create(b"/p/10a", b("late")).await.expect("create");
    s.delete(b"/p/20", None).await.expect("delete");

    let mut keys: Vec<String> = first.items.iter().map(|kv| key(&kv.key)).collect();
    let mut next = first.next;
    let mut pages = 1;
    while let Some(start) = next {
        let page = s
            .list(
                b"/p/",
                ListOptions {
                    revision: Some(revision),
                    limit: 10,
                    start: Some(start),
                },
            )
            .await
            .expect("list page");
        assert_eq!(page.revision, revision);
        keys.extend(page.items.iter().map(|kv| key(&kv.key)));
        next = page.next;
        pages += 1;
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..25).map(|i| format!("/p/{i:02}")).collect();
    assert_eq!(keys, want);

    // Unlimited, current: sorted, sees the late writes.
    let all = s.list(b"/p/", ListOptions::default()).await.expect("list");
    assert!(!all.more());
    assert!(all.revision > revision);
    let keys: Vec<String> = all.items.iter().map(|kv| key(&kv.key)).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert!(keys.contains(&"/p/10a".to_string()));
    assert!(!keys.contains(&"/p/20".to_string()));
    assert_eq!(keys.len(), 25);

    // A page that ends exactly at the last key says so.
    let exact = s
        .list(
            b"/p/",
            ListOptions {
                limit: 25,
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(exact.items.len(), 25);
    assert!(!exact.more(), "no key follows the 25th");
}

async fn list_at_an_older_revision<S: Store + ?Sized>(s: &S) {
    let a = s.create(b"/o/a", b("a1")).await.expect("create");
    let bkv = s.create(b"/o/b", b("b1")).await.expect("create");
    let old = s.revision().await.expect("revision");

    s.update(b"/o/a", b("a2"), a.mod_revision)
        .await
        .expect("update");
    s.delete(b"/o/b", None).await.expect("delete");
    s.create(b"/o/c", b("c1")).await.expect("create");

    let then = s
        .list(
            b"/o/",
            ListOptions {
                revision: Some(old),
                ..Default::default()
            },
        )
        .await
        .expect("list at old revision");
    assert_eq!(then.revision, old);
    assert_eq!(then.items, vec![a.clone(), bkv]);

    let now = s.list(b"/o/", ListOptions::default()).await.expect("list");
    let state: Vec<(String, String)> = now
        .items
        .iter()
        .map(|kv| (key(&kv.key), key(&kv.value)))
        .collect();
    assert_eq!(
        state,
        vec![
            ("/o/a".to_string(), "a2".to_string()),
            ("/o/c".to_string(), "c1".to_string())
        ]
    );

    // Paging at an older revision.
    let page = s
        .list(
            b"/o/",
            ListOptions {
                revision: Some(old),
                limit: 1,
                start: None,
            },
        )
        .await
        .expect("page at old revision");
    assert_eq!(page.items, vec![a]);
    assert!(page.more());

    let future = now.revision + 1000;
    match s
        .list(
            b"/o/",
            ListOptions {
                revision: Some(future),
                ..Default::default()
            },
        )
        .await
    {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!(requested, future);
            assert_eq!(current, now.revision);
        }
        other => panic!("list at a future revision: {other:?}"),
    }
}

async fn prefixes_are_isolated<S: Store + ?Sized>(s: &S) {
    let mut w = s
        .watch(
            b"/a/",
            s.revision().await.expect("revision"),
            WatchOptions::default(),
        )
        .await
        .expect("watch");
    for k in ["/a", "/ab", "/a/1", "/b/1", "/a/2", "/a0", "/"] {
        s.create(k.as_bytes(), b(k)).await.expect("create");
    }
    let listed: Vec<String> = s
        .list(b"/a/", ListOptions::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|kv| key(&kv.key))
        .collect();
    assert_eq!(listed, vec!["/a/1", "/a/2"]);
    let ab: Vec<String> = s
        .list(b"/ab", ListOptions::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|kv| key(&kv.key))
        .collect();
    assert_eq!(ab, vec!["/ab"]);

    let seen: Vec<String> = next_changes(&mut w, 2)
        .await
        .iter()
        .map(|e| summary(e).1)
        .collect();
    assert_eq!(seen, vec!["/a/1", "/a/2"]);
    assert_quiet(&mut w, Duration::from_millis(300)).await;

    // The empty prefix is everything.
    let everything = s.list(b"", ListOptions::default()).await.expect("list");
    assert_eq!(everything.items.len(), 7);
}

async fn watch_from_a_revision_sees_exactly_the_later_changes<S: Store + ?Sized>(s: &S) {
    let x = s.create(b"/w/x", b("x1")).await.expect("create");
    s.create(b"/w/y", b("y1")).await.expect("create");
    let from = s.revision().await.expect("revision");

    let x2 = s
        .update(b"/w/x", b("x2"), x.mod_revision)
        .await
        .expect("update");
    let del = s.delete(b"/w/y", None).await.expect("delete");
    let z = s.create(b"/w/z", b("z1")).await.expect("create");

    let mut w = s
        .watch(b"/w/", from, WatchOptions::default())
        .await
        .expect("watch");
    let events = next_changes(&mut w, 3).await;
    assert_eq!(
        events[0],
        WatchEvent::Put {
            kv: x2.clone(),
            prev: Some(x)
        }
    );
    assert_eq!(
        events[1],
        WatchEvent::Delete {
            last: del.kv.clone(),
            revision: del.revision
        }
    );
    assert_eq!(
        events[2],
        WatchEvent::Put {
            kv: z.clone(),
            prev: None
        }
    );

    // Then live, still in order.
    let z2 = s
        .update(b"/w/z", b("z2"), z.mod_revision)
        .await
        .expect("update");
    let event = next_change(&mut w).await;
    assert_eq!(
        event,
        WatchEvent::Put {
            kv: z2,
            prev: Some(z)
        }
    );
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

async fn watch_resumes_from_the_last_seen_revision<S: Store + ?Sized>(s: &S) {
    let from = s.revision().await.expect("revision");
    let mut w = s
        .watch(b"/res/", from, WatchOptions::default())
        .await
        .expect("watch");
    for i in 0..5 {
        s.create(format!("/res/{i}").as_bytes(), b("v"))
            .await
            .expect("create");
    }
    let seen = next_changes(&mut w, 3).await;
    let last_seen = seen[2].revision();
    drop(w);

    for i in 5..8 {
        s.create(format!("/res/{i}").as_bytes(), b("v"))
            .await
            .expect("create");
    }
    let mut w = s
        .watch(b"/res/", last_seen, WatchOptions::default())
        .await
        .expect("rewatch");
    let rest: Vec<String> = next_changes(&mut w, 5)
        .await
        .iter()
        .map(|e| summary(e).1)
        .collect();
    assert_eq!(rest, vec!["/res/3", "/res/4", "/res/5", "/res/6", "/res/7"]);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

async fn compacted_revisions_are_gone<S: Store + ?Sized>(s: &S) {
    let keep = s.create(b"/c/keep", b("old")).await.expect("create");
    let churn = s.create(b"/c/churn", b("0")).await.expect("create");
    let early = s.revision().await.expect("revision");
    let mut rev = churn.mod_revision;
    for i in 1..=10 {
        rev = s
            .update(b"/c/churn", b(&i.to_string()), rev)
            .await
            .expect("update")
            .mod_revision;
    }
    let gone = s.create(b"/c/gone", b("x")).await.expect("create");
    s.delete(b"/c/gone", None).await.expect("delete");
    let compact_at = s.revision().await.expect("revision");
    let late = s.create(b"/c/late", b("l")).await.expect("create");

    s.compact(compact_at).await.expect("compact");
    s.compact(compact_at)
        .await
        .expect("compacting again is a no-op");
    s.compact(early).await.expect("compacting below is a no-op");

    // The 410 case: watching or listing from before the compaction.
    let mut w = s
        .watch(b"/c/", early, WatchOptions::default())
        .await
        .expect("watch");
    match next_item(&mut w).await {
        Some(Err(StoreError::Compacted {
            requested,
            compacted,
        })) => {
            assert_eq!(requested, early);
            if let Some(c) = compacted {
                assert_eq!(c, compact_at);
            }
        }
        other => panic!("watch from a compacted revision: {other:?}"),
    }
    assert!(
        next_item(&mut w).await.is_none(),
        "the stream ends after the error"
    );
    match s
        .list(
            b"/c/",
            ListOptions {
                revision: Some(early),
                ..Default::default()
            },
        )
        .await
    {
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, early),
        other => panic!("list at a compacted revision: {other:?}"),
    }

    // The compaction point itself still reads, with every key's state at that revision.
    let at = s
        .list(
            b"/c/",
            ListOptions {
                revision: Some(compact_at),
                ..Default::default()
            },
        )
        .await
        .expect("list at the compaction point");
    let state: BTreeMap<String, String> = at
        .items
        .iter()
        .map(|kv| (key(&kv.key), key(&kv.value)))
        .collect();
    assert_eq!(
        state,
        BTreeMap::from([
            ("/c/churn".to_string(), "10".to_string()),
            ("/c/keep".to_string(), "old".to_string()),
        ])
    );
    assert_eq!(at.items.iter().find(|kv| kv.key == keep.key), Some(&keep));

    // Watching from the compaction point sees what came after.
    let mut w = s
        .watch(b"/c/", compact_at, WatchOptions::default())
        .await
        .expect("watch");
    assert_eq!(
        next_change(&mut w).await,
        WatchEvent::Put {
            kv: late,
            prev: None
        }
    );

    // Writes continue on top of the compacted history.
    let churned = s
        .update(b"/c/churn", b("11"), rev)
        .await
        .expect("update after compaction");
    assert_eq!(churned.create_revision, churn.create_revision);
    assert_eq!(next_change(&mut w).await.revision(), churned.mod_revision);
    assert!(gone.mod_revision < compact_at);

    let future = s.revision().await.expect("revision") + 100;
    match s.compact(future).await {
        Err(StoreError::FutureRevision { requested, .. }) => assert_eq!(requested, future),
        other => panic!("compact in the future: {other:?}"),
    }
}

async fn concurrent_writers_and_a_watcher_see_every_change_once<S: Store + ?Sized>(s: &S) {
    const WRITERS: usize = 4;
    const KEYS: usize = 10;
    const UPDATES: usize = 4;
    let from = s.revision().await.expect("revision");
    let mut w = s
        .watch(b"/cc/", from, WatchOptions::default())
        .await
        .expect("watch");

    // Each writer creates its keys, updates them, deletes half; all writers at once.
    let writer = |id: usize| async move {
        let mut acked = Vec::new();
        for k in 0..KEYS {
            let key = format!("/cc/{id}/{k}");
            let kv = s.create(key.as_bytes(), b("0")).await.expect("create");
            acked.push((key.clone(), kv.mod_revision));
            let mut rev = kv.mod_revision;
            for u in 1..=UPDATES {
                rev = s
                    .update(key.as_bytes(), b(&u.to_string()), rev)
                    .await
                    .expect("update")
                    .mod_revision;
                acked.push((key.clone(), rev));
            }
            if k % 2 == 0 {
                let d = s.delete(key.as_bytes(), Some(rev)).await.expect("delete");
                acked.push((key, d.revision));
            }
        }
        acked
    };
    let results = futures::future::join_all((0..WRITERS).map(writer)).await;
    let acked: HashSet<(String, i64)> = results.into_iter().flatten().collect();
    let total = WRITERS * KEYS * (1 + UPDATES) + WRITERS * KEYS / 2;
    assert_eq!(acked.len(), total, "every write has its own revision");

    let events = next_changes(&mut w, total).await;
    let seen: Vec<(String, i64)> = events
        .iter()
        .map(|e| (summary(e).1, e.revision()))
        .collect();
    assert!(
        seen.windows(2).all(|p| p[0].1 < p[1].1),
        "events in strictly increasing revision order"
    );
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), acked);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

/// One acknowledged write of `many_writers_with_conflicting_updates`.
#[derive(Debug, Clone)]
struct Acked {
    key: String,
    revision: i64,
    /// What it wrote: `Some(value)` for a put, `None` for a delete.
    value: Option<String>,
    /// The revision a compare-and-swap expected.
    expected: Option<i64>,
}

/// 64 writers x 50 writes at once: creates and deletes of their own keys, and compare-and-swap
/// updates of 8 shared keys that race each other (half with a fresh read, half with a revision
/// that is stale as soon as anyone else won). Every acknowledged write must be there with its own
/// revision, increasing per writer; every lost race must be a Conflict; the winners on each shared
/// key must form one chain; a watch must see exactly the acknowledged writes, in order.
async fn many_writers_with_conflicting_updates<S: Store + ?Sized>(s: &S) {
    const WRITERS: usize = 64;
    const WRITES: usize = 50;
    const HOT: usize = 8;
    let mut initial = Vec::new();
    for h in 0..HOT {
        let kv = s
            .create(format!("/mw/hot/{h}").as_bytes(), b("init"))
            .await
            .expect("create hot key");
        initial.push(kv.mod_revision);
    }
    let from = s.revision().await.expect("revision");
    let mut w = s
        .watch(b"/mw/", from, WatchOptions::default())
        .await
        .expect("watch");

    let initial = &initial;
    let writer = |id: usize| async move {
        let mut acked: Vec<Acked> = Vec::new();
        let mut conflicts = 0;
        let mut own: Option<(String, i64)> = None;
        for i in 0..WRITES {
            if i % 3 == 2 {
                // A race on a shared key.
                let h = (id + i) % HOT;
                let key = format!("/mw/hot/{h}");
                let expected = if i % 2 == 0 {
                    let got = s.get(key.as_bytes()).await.expect("get hot key");
                    got.kv.expect("hot keys are never deleted").mod_revision
                } else {
                    initial[h]
                };
                let value = format!("{id}/{i}");
                match s.update(key.as_bytes(), b(&value), expected).await {
                    Ok(kv) => acked.push(Acked {
                        key,
                        revision: kv.mod_revision,
                        value: Some(value),
                        expected: Some(expected),
                    }),
                    Err(StoreError::Conflict {
                        expected: e,
                        actual,
                        ..
                    }) => {
                        assert_eq!(e, expected);
                        assert!(actual > expected, "{key}: lost to {actual}, expected {e}");
                        conflicts += 1;
                    }
                    Err(e) => panic!("{key}: a lost race must be a conflict: {e}"),
                }
            } else if let Some((key, rev)) = own.take().filter(|_| i % 3 == 1 && i % 2 == 1) {
                // Delete the key created just before, compare-and-swap.
                let d = s
                    .delete(key.as_bytes(), Some(rev))
                    .await
                    .expect("delete own");
                assert_eq!(d.kv.mod_revision, rev);
                acked.push(Acked {
                    key,
                    revision: d.revision,
                    value: None,
                    expected: Some(rev),
                });
            } else {
                let key = format!("/mw/own/{id}/{i}");
                let value = format!("{id}/{i}");
                let kv = s
                    .create(key.as_bytes(), b(&value))
                    .await
                    .expect("create own");
                assert_eq!(kv.create_revision, kv.mod_revision);
                own = Some((key.clone(), kv.mod_revision));
                acked.push(Acked {
                    key,
                    revision: kv.mod_revision,
                    value: Some(value),
                    expected: None,
                });
            }
        }
        assert!(
            acked.windows(2).all(|p| p[0].revision < p[1].revision),
            "writer {id}: its revisions increase"
        );
        (acked, conflicts)
    };
    let results = futures::future::join_all((0..WRITERS).map(writer)).await;
    let conflicts: usize = results.iter().map(|(_, c)| c).sum();
    let acked: Vec<Acked> = results.into_iter().flat_map(|(a, _)| a).collect();
    let races = WRITERS * (WRITES / 3);
    assert!(conflicts > 0, "stale revisions must lose");
    let hot_wins = acked
        .iter()
        .filter(|a| a.key.starts_with("/mw/hot/"))
        .count();
    assert_eq!(hot_wins + conflicts, races, "every race won or lost");
    let revisions: HashSet<i64> = acked.iter().map(|a| a.revision).collect();
    assert_eq!(
        revisions.len(),
        acked.len(),
        "every write has its own revision"
    );

    // The winners on each shared key chain: each expected the previous winner's revision.
    let mut latest: BTreeMap<String, (i64, Option<String>)> = BTreeMap::new();
    let mut by_revision = acked.clone();
    by_revision.sort_by_key(|a| a.revision);
    for (h, &created) in initial.iter().enumerate() {
        let key = format!("/mw/hot/{h}");
        let mut rev = created;
        for a in by_revision.iter().filter(|a| a.key == key) {
            assert_eq!(
                a.expected,
                Some(rev),
                "{key}: a CAS won against a stale revision"
            );
            rev = a.revision;
        }
    }
    for a in &by_revision {
        latest.insert(a.key.clone(), (a.revision, a.value.clone()));
    }

    // The final state is the last acknowledged write of every key.
    let listed = s.list(b"/mw/", ListOptions::default()).await.expect("list");
    let mut state: BTreeMap<String, (i64, Option<String>)> = listed
        .items
        .iter()
        .map(|kv| {
            let value = String::from_utf8_lossy(&kv.value).into_owned();
            (key(&kv.key), (kv.mod_revision, Some(value)))
        })
        .collect();
    for (h, &created) in initial.iter().enumerate() {
        let key = format!("/mw/hot/{h}");
        if !latest.contains_key(&key) {
            // Nobody won on this key: it still holds its creation.
            let untouched = state.remove(&key).expect("hot key present");
            assert_eq!(untouched, (created, Some("init".to_string())));
        }
    }
    latest.retain(|_, (_, value)| value.is_some());
    assert_eq!(state, latest, "every acknowledged write is there");

    // The watch saw exactly the acknowledged writes, in revision order.
    let events = next_changes(&mut w, acked.len()).await;
    let seen: Vec<(String, i64)> = events
        .iter()
        .map(|e| (summary(e).1, e.revision()))
        .collect();
    let want: Vec<(String, i64)> = by_revision
        .iter()
        .map(|a| (a.key.clone(), a.revision))
        .collect();
    assert_eq!(seen, want);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

async fn idle_watch_reports_progress<S: Store + ?Sized>(s: &S) {
    s.create(b"/elsewhere/1", b("v")).await.expect("create");
    let from = s.revision().await.expect("revision");
    s.create(b"/elsewhere/2", b("v")).await.expect("create");
    let current = s.revision().await.expect("revision");
    let opts = WatchOptions {
        progress_interval: Some(Duration::from_millis(100)),
    };
    let mut w = s.watch(b"/quiet/", from, opts).await.expect("watch");
    loop {
        match next_item(&mut w).await {
            Some(Ok(WatchEvent::Progress { revision })) if revision >= current => break,
            Some(Ok(WatchEvent::Progress { .. })) => continue,
            other => panic!("want progress on an idle prefix, got {other:?}"),
        }
    }
}

fn key(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
