//! Fan-out of an embedded store's changes to its watchers, with catch-up from the store's
//! change history.
//!
//! Owns the watch protocol for a single-process store: the writer publishes each change, in
//! revision order, into a bounded broadcast buffer after it is durable; every watcher first
//! replays the history after its start revision, then follows the buffer, skipping what it
//! already delivered by revision. A watcher that falls out of the buffer (a slow consumer)
//! returns to the history, so a writer never waits for a watcher and no event is lost or
//! repeated; one whose position has been compacted gets [`StoreError::Compacted`].
//! Publishing costs one buffer slot; each event is then looked at once per watcher.
//!
//! Must not read storage itself: the history comes from the [`Source`] (the redb backend, or a
//! fake in the tests below), and it must not hold the store alive: watchers keep a weak
//! reference, and their streams end when the store is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{StoreError, WatchEvent, WatchOptions, WatchStream};

/// How many history revisions one catch-up step reads.
const CATCHUP_CHUNK: usize = 1024;

/// The publishing side: one per store.
#[derive(Debug)]
pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<WatchEvent>>,
    /// The revision of the last published change (or the store's revision at open).
    published: AtomicI64,
}

impl Hub {
    /// A hub buffering `capacity` changes, for a store now at `revision`.
    pub(crate) fn new(capacity: usize, revision: i64) -> Hub {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Hub {
            tx,
            published: AtomicI64::new(revision),
        }
    }

    /// Hands a durable change to the watchers. The caller serializes calls in revision order.
    /// Never blocks: watchers that fell behind find out when they next receive.
    pub(crate) fn publish(&self, event: WatchEvent) {
        let revision = event.revision();
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(event));
        // After the send: a watcher that reads `published` and then finds its buffer empty has
        // seen every change up to it (see `Watcher::progress`).
        self.published.store(revision, Ordering::SeqCst);
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.tx.subscribe()
    }

    fn published(&self) -> i64 {
        self.published.load(Ordering::SeqCst)
    }
}

/// Changes read from the store's history.
#[derive(Debug, Default)]
pub(crate) struct Catchup {
    /// The changes under the prefix with revisions in `(after, through]`, in order.
    pub(crate) events: Vec<WatchEvent>,
    /// The last revision the read covered.
    pub(crate) through: i64,
    /// Whether `through` is the store's revision at the time of the read.
    pub(crate) complete: bool,
}

/// The store a hub belongs to.
pub(crate) trait Source: Send + Sync + 'static {
    fn hub(&self) -> &Hub;

    /// The changes under `prefix` after revision `after`, covering at most `limit` revisions;
    /// [`StoreError::Compacted`] when `after` is below the compaction point.
    fn changes_after(
        self: Arc<Self>,
        prefix: Bytes,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Catchup, StoreError>>;
}

/// A watch on `source`: changes under `prefix` above `from_revision`.
pub(crate) fn watch<S: Source>(
    source: &Arc<S>,
    prefix: Bytes,
    from_revision: i64,
    opts: &WatchOptions,
) -> WatchStream {
    let progress = opts.progress_interval.map(|period| {
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    });
    let watcher = Watcher {
        source: Arc::downgrade(source),
        prefix,
        last: from_revision.max(0),
        rx: None,
        live: false,
        pending: VecDeque::new(),
        progress,
        done: false,
    };
    Box::pin(futures::stream::unfold(watcher, |mut w| async move {
        w.next().await.map(|item| (item, w))
    }))
}

struct Watcher<S: Source> {
    source: Weak<S>,
    prefix: Bytes,
    /// Every change up to this revision has been delivered (or was not under the prefix).
    last: i64,
    /// Subscribed before each history read, so nothing published after the read is missed.
    rx: Option<broadcast::Receiver<Arc<WatchEvent>>>,
    /// Following the buffer (true) or replaying history (false).
    live: bool,
    pending: VecDeque<WatchEvent>,
    progress: Option<Interval>,
    done: bool,
}

/// What one step of a watcher did.
enum Step {
    Continue,
    End,
}

impl<S: Source> Watcher<S> {
    async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            let step = if self.live {
                self.receive().await
            } else {
                self.catch_up().await
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::End) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }

    async fn catch_up(&mut self) -> Result<Step, StoreError> {
        let Some(source) = self.source.upgrade() else {
            return Ok(Step::End);
        };
        if self.rx.is_none() {
            self.rx = Some(source.hub().subscribe());
        }
        let read = source.changes_after(self.prefix.clone(), self.last, CATCHUP_CHUNK);
        let catchup = read.await?;
        self.pending.extend(catchup.events);
        self.last = self.last.max(catchup.through);
        self.live = catchup.complete;
        Ok(Step::Continue)
    }

    async fn receive(&mut self) -> Result<Step, StoreError> {
        let Some(rx) = self.rx.as_mut() else {
            self.live = false;
            return Ok(Step::Continue);
        };
        let received = match self.progress.as_mut() {
            Some(interval) => tokio::select! {
                r = rx.recv() => Some(r),
                _ = interval.tick() => None,
            },
            None => Some(rx.recv().await),
        };
        match received {
            None => self.progress(),
            Some(Ok(event)) => {
                let revision = event.revision();
                // Changes up to `last` came from the history already.
                if revision > self.last {
                    self.last = revision;
                    if event.key().starts_with(&self.prefix) {
                        self.pending.push_back(WatchEvent::clone(&event));
                    }
                }
            }
            Some(Err(RecvError::Lagged(missed))) => {
                tracing::debug!(
                    missed,
                    after = self.last,
                    "watcher fell behind the buffer; replaying history"
                );
                self.rx = None;
                self.live = false;
            }
            Some(Err(RecvError::Closed)) => return Ok(Step::End),
        }
        Ok(Step::Continue)
    }

    /// Queues a bookmark when every published change has been consumed.
    fn progress(&mut self) {
        let (Some(source), Some(rx)) = (self.source.upgrade(), self.rx.as_ref()) else {
            return;
        };
        // Read before looking at the buffer: changes up to `published` were sent before it
        // was stored, so an empty buffer means all of them have been received.
        let published = source.hub().published();
        if rx.is_empty() && published >= self.last {
            self.last = published;
            self.pending.push_back(WatchEvent::Progress {
                revision: published,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::store::KeyValue;

    /// An in-memory store with a change log, publishing like the redb backend does.
    struct Fake {
        hub: Hub,
        log: Mutex<FakeLog>,
    }

    #[derive(Default)]
    struct FakeLog {
        events: Vec<WatchEvent>,
        compacted: i64,
    }

    impl Fake {
        fn new(capacity: usize) -> Arc<Fake> {
            Arc::new(Fake {
                hub: Hub::new(capacity, 0),
                log: Mutex::new(FakeLog::default()),
            })
        }

        fn put(&self, key: &str) -> i64 {
            let mut log = self.log.lock().expect("log lock");
            let revision = log.events.len() as i64 + 1;
            let event = WatchEvent::Put {
                kv: KeyValue {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    value: Bytes::from_static(b"v"),
                    create_revision: revision,
                    mod_revision: revision,
                },
                prev: None,
            };
            log.events.push(event.clone());
            self.hub.publish(event);
            revision
        }

        fn compact(&self, revision: i64) {
            self.log.lock().expect("log lock").compacted = revision;
        }
    }

    impl Source for Fake {
        fn hub(&self) -> &Hub {
            &self.hub
        }

        fn changes_after(
            self: Arc<Self>,
            prefix: Bytes,
            after: i64,
            limit: usize,
        ) -> BoxFuture<'static, Result<Catchup, StoreError>> {
            Box::pin(async move {
                let log = self.log.lock().expect("log lock");
                if after < log.compacted {
                    return Err(StoreError::Compacted {
                        requested: after,
                        compacted: Some(log.compacted),
                    });
                }
                let current = log.events.len() as i64;
                let through = current.min(after.saturating_add(limit as i64));
                let events = log
                    .events
                    .iter()
                    .filter(|e| e.revision() > after && e.revision() <= through)
                    .filter(|e| e.key().starts_with(&prefix))
                    .cloned()
                    .collect();
                Ok(Catchup {
                    events,
                    through,
                    complete: through == current,
                })
            })
        }
    }

    fn revisions(events: &[Result<WatchEvent, StoreError>]) -> Vec<i64> {
        events
            .iter()
            .map(|e| e.as_ref().map(WatchEvent::revision).expect("event"))
            .collect()
    }

    #[tokio::test]
    async fn replays_history_then_follows_live() {
        let fake = Fake::new(16);
        for i in 0..5 {
            fake.put(&format!("/a/{i}"));
        }
        let mut w = watch(
            &fake,
            Bytes::from_static(b"/a/"),
            2,
            &WatchOptions::default(),
        );
        let first: Vec<_> = (&mut w).take(3).collect().await;
        assert_eq!(revisions(&first), vec![3, 4, 5]);
        fake.put("/a/live");
        fake.put("/b/other");
        fake.put("/a/again");
        let next: Vec<_> = w.take(2).collect().await;
        assert_eq!(revisions(&next), vec![6, 8]);
    }

    #[tokio::test]
    async fn slow_watcher_falls_back_to_history_and_loses_nothing() {
        let fake = Fake::new(2);
        let mut w = watch(&fake, Bytes::new(), 0, &WatchOptions::default());
        fake.put("/k/0");
        let first = w.next().await.expect("first").expect("ok");
        assert_eq!(first.revision(), 1);
        // 3000 changes overflow the 2-slot buffer many times and span several catch-up chunks.
        for i in 1..3000 {
            fake.put(&format!("/k/{i}"));
        }
        let rest: Vec<_> = w.take(2999).collect().await;
        assert_eq!(revisions(&rest), (2..=3000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn compacted_start_is_an_error_then_the_end() {
        let fake = Fake::new(4);
        for i in 0..10 {
            fake.put(&format!("/a/{i}"));
        }
        fake.compact(6);
        let mut w = watch(&fake, Bytes::new(), 3, &WatchOptions::default());
        match w.next().await {
            Some(Err(StoreError::Compacted {
                requested: 3,
                compacted: Some(6),
            })) => {}
            other => panic!("want Compacted, got {other:?}"),
        }
        assert!(w.next().await.is_none());
        let mut ok = watch(&fake, Bytes::new(), 6, &WatchOptions::default());
        let got: Vec<_> = (&mut ok).take(4).collect().await;
        assert_eq!(revisions(&got), vec![7, 8, 9, 10]);
    }

    #[tokio::test]
    async fn idle_watcher_gets_progress_at_the_published_revision() {
        let fake = Fake::new(4);
        fake.put("/b/1");
        fake.put("/b/2");
        let opts = WatchOptions {
            progress_interval: Some(Duration::from_millis(20)),
        };
        let mut w = watch(&fake, Bytes::from_static(b"/a/"), 0, &opts);
        let p = w.next().await.expect("item").expect("ok");
        assert_eq!(p, WatchEvent::Progress { revision: 2 });
        fake.put("/a/1");
        let e = w.next().await.expect("item").expect("ok");
        assert_eq!(e.revision(), 3);
    }

    #[tokio::test]
    async fn stream_ends_when_the_store_goes_away() {
        let fake = Fake::new(4);
        let mut w = watch(&fake, Bytes::new(), 0, &WatchOptions::default());
        fake.put("/a");
        assert_eq!(w.next().await.expect("item").expect("ok").revision(), 1);
        drop(fake);
        let end = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
}
