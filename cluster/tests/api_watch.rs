//! Lists and watches through kube-rs: paging and selectors, a watcher that follows pods across a
//! restart of the server, bookmarks, and 410 Gone for a compacted resourceVersion.

mod api_support;

use std::time::Duration;

use api_support::{TestServer, code};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

fn pod(name: &str, labels: serde_json::Value, node: Option<&str>) -> Pod {
    let mut spec = json!({"containers": [{"name": "c", "image": "busybox"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_and_select() {
    let s = TestServer::redb().await;
    let pods: Api<Pod> = Api::namespaced(s.client().await, "default");
    for i in 0..7 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        let node = (i < 3).then_some("n1");
        pods.create(
            &PostParams::default(),
            &pod(&format!("p{i}"), json!({"tier": tier}), node),
        )
        .await
        .unwrap();
    }
    // limit/continue walks every pod once, all pages at the first page's revision.
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let mut rvs = Vec::new();
    loop {
        let page = pods.list(&lp).await.unwrap();
        rvs.push(page.metadata.resource_version.clone().unwrap());
        names.extend(page.items.iter().map(|p| p.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
        // A write between pages does not show up in this list.
        if names.len() == 3 {
            pods.create(&PostParams::default(), &pod("late", json!({}), None))
                .await
                .unwrap();
        }
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
    assert!(rvs.windows(2).all(|w| w[0] == w[1]), "{rvs:?}");

    let sel = |l: &str| ListParams::default().labels(l);
    let odd = pods.list(&sel("tier=odd")).await.unwrap();
    assert_eq!(odd.items.len(), 3);
    let fields = ListParams::default().fields("spec.nodeName=n1");
    assert_eq!(pods.list(&fields).await.unwrap().items.len(), 3);
    let both = ListParams::default()
        .labels("tier in (even)")
        .fields("spec.nodeName=n1,metadata.name!=p0");
    let got: Vec<String> = pods
        .list(&both)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    assert_eq!(got, ["p2"]);
    // A selected, limited list still fills its pages.
    let page = pods.list(&sel("tier=even").limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(page.metadata.continue_.is_some());
    let all: Api<Pod> = Api::all(s.client().await);
    assert_eq!(
        all.list(&ListParams::default().fields("status.phase=Pending"))
            .await
            .unwrap()
            .items
            .len(),
        8
    );
    assert_eq!(
        code(
            &pods
                .list(&ListParams::default().fields("spec.bogus=1"))
                .await
                .unwrap_err()
        ),
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_watcher_follows_pods_across_restart() {
    let mut s = TestServer::redb().await;
    let client = s.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &pod("before", json!({"app": "w"}), None),
    )
    .await
    .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = pods.clone();
    let task = tokio::spawn(async move {
        let cfg = watcher::Config::default().labels("app=w");
        let mut stream = watcher(watched, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(p) = ev {
                let _ = tx.send(p.metadata.name.unwrap_or_default());
            }
        }
    });
    wait_for(&mut rx, "before")
        .await
        .expect("watcher saw the first pod");

    s.restart().await;
    let pods2: Api<Pod> = Api::namespaced(s.client().await, "default");
    pods2
        .create(
            &PostParams::default(),
            &pod("after", json!({"app": "w"}), None),
        )
        .await
        .unwrap();
    wait_for(&mut rx, "after")
        .await
        .expect("watcher saw a pod created after the restart");
    task.abort();
    // The first pod is still there: the data survived the restart.
    assert!(pods2.get("before").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_send_bookmarks_and_selector_transitions() {
    let s = TestServer::redb().await;
    let pods: Api<Pod> = Api::namespaced(s.client().await, "default");
    let created = pods
        .create(&PostParams::default(), &pod("a", json!({"app": "x"}), None))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();
    let wp = WatchParams::default().labels("app=x").timeout(20);
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    // Relabel out of the selector: the watch reports a DELETED; back in: ADDED.
    pods.patch(
        "a",
        &Default::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    pods.patch(
        "a",
        &Default::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"app": "x"}}})),
    )
    .await
    .unwrap();
    let mut kinds = Vec::new();
    let mut bookmark = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while kinds.len() < 2 || !bookmark {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .expect("watch events in time")
            .unwrap()
            .expect("stream open");
        match ev {
            WatchEvent::Added(_) => kinds.push("ADDED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Bookmark(b) => {
                assert!(
                    b.metadata.resource_version.parse::<i64>().unwrap()
                        >= rv.parse::<i64>().unwrap()
                );
                bookmark = true;
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(kinds, ["DELETED", "ADDED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_resource_version_is_gone() {
    let s = TestServer::redb_with(|c| c.compact_interval = Duration::from_millis(500)).await;
    let pods: Api<Pod> = Api::namespaced(s.client().await, "default");
    let first = pods
        .create(&PostParams::default(), &pod("old", json!({}), None))
        .await
        .unwrap();
    let old_rv = first.metadata.resource_version.unwrap();
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("n{i}"), json!({}), None),
        )
        .await
        .unwrap();
    }
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    let token = page.metadata.continue_.unwrap();
    // Two compaction rounds: the first records the revision, the second compacts to it.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    pods.create(&PostParams::default(), &pod("newer", json!({}), None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut stream = pods
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410, "{e:?}");
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
    let e = pods
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(code(&e), 410, "{e}");
    // kubectl sees the same through a raw watch.
    let out = s
        .kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={old_rv}"),
        ])
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"code\":410"), "{text}");
}

async fn wait_for(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    name: &str,
) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Some(n) if n == name => return,
                Some(_) => {}
                None => panic!("watcher ended"),
            }
        }
    })
    .await
}
