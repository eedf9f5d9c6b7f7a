//! The etcd backend, for control planes whose servers share one etcd cluster.
//!
//! Owns the mapping of the [`Store`] contract onto etcd's v3 API through the `etcd-client`
//! crate: etcd's revision is the store revision; create, update and delete are single
//! transactions comparing `create_revision`/`mod_revision`, whose failure branch reads the key
//! so a Conflict carries the actual revision; lists are ranges with a limit and a revision;
//! watches start at `from_revision + 1` with previous values, and etcd's compaction answer
//! becomes [`StoreError::Compacted`]. Kubernetes' own etcd3 storage works the same way.
//!
//! Must not add state of its own: everything lives in etcd, so several servers can share it.
//! One difference remains at the compaction boundary: after `compact(r)` etcd still serves a
//! watch from `r - 1` (it keeps the changes at `r`), where the embedded store answers Compacted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, ResponseHeader, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{
    Deleted, GetResult, KeyValue, ListOptions, ListPage, Store, StoreError, WatchEvent,
    WatchOptions, WatchStream, key_str, list_start, next_key, prefix_end,
};

/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings keep idle watch streams alive through NATs and detect dead servers.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// A store in an etcd cluster (etcd 3.4 or later).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// For error messages.
    endpoints: Arc<str>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// What etcd's error means for the store.
enum Known {
    Compacted,
    FutureRevision,
    Other,
}

fn known(e: &etcd_client::Error) -> Known {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message();
            if msg.contains("required revision has been compacted") {
                Known::Compacted
            } else if msg.contains("required revision is a future revision") {
                Known::FutureRevision
            } else {
                Known::Other
            }
        }
        _ => Known::Other,
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port`) and checks that etcd answers.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let joined: Arc<str> = endpoints.join(",").into();
        let opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| EtcdError::Connect {
                endpoints: joined.to_string(),
                source: Box::new(source),
            })?;
        let store = EtcdStore {
            client,
            endpoints: joined,
        };
        store.revision().await?;
        Ok(store)
    }

    fn request_error(
        &self,
        op: &'static str,
        key: &[u8],
        source: etcd_client::Error,
    ) -> StoreError {
        StoreError::Etcd(EtcdError::Request {
            endpoints: self.endpoints.to_string(),
            op,
            key: key_str(key),
            source: Box::new(source),
        })
    }

    fn protocol_error(&self, op: &'static str, key: &[u8], what: &str) -> StoreError {
        StoreError::Etcd(EtcdError::Protocol {
            endpoints: self.endpoints.to_string(),
            op,
            key: key_str(key),
            what: what.to_string(),
        })
    }

    /// Maps a failed read at `requested` to Compacted or FutureRevision where it is one.
    async fn read_error(
        &self,
        op: &'static str,
        key: &[u8],
        requested: i64,
        source: etcd_client::Error,
    ) -> StoreError {
        match known(&source) {
            Known::Compacted => StoreError::Compacted {
                requested,
                compacted: None,
            },
            Known::FutureRevision => match self.revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            },
            Known::Other => self.request_error(op, key, source),
        }
    }

    fn header_revision(
        &self,
        op: &'static str,
        key: &[u8],
        header: Option<&ResponseHeader>,
    ) -> Result<i64, StoreError> {
        header
            .map(ResponseHeader::revision)
            .ok_or_else(|| self.protocol_error(op, key, "response without header"))
    }

    async fn txn(&self, op: &'static str, key: &[u8], txn: Txn) -> Result<TxnResponse, StoreError> {
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| self.request_error(op, key, e))
    }

    /// The key's state from the failure branch of a compare-and-swap transaction (a get).
    fn failed_compare(
        &self,
        op: &'static str,
        key: &[u8],
        resp: &TxnResponse,
    ) -> Result<Option<KeyValue>, StoreError> {
        match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(get)) => Ok(get.kvs().first().map(convert)),
            _ => Err(self.protocol_error(op, key, "failed compare without the key's state")),
        }
    }

    /// NotFound or Conflict from the key's state after a failed compare.
    fn cas_failure(
        &self,
        key: &[u8],
        expected: Option<i64>,
        state: Option<KeyValue>,
    ) -> StoreError {
        match (state, expected) {
            (None, _) => StoreError::NotFound { key: key_str(key) },
            (Some(kv), Some(expected)) => StoreError::Conflict {
                key: key_str(key),
                expected,
                actual: kv.mod_revision,
            },
            // Without expectation only absence fails the compare; the key was recreated
            // between the two: report what was found.
            (Some(kv), None) => StoreError::Conflict {
                key: key_str(key),
                expected: 0,
                actual: kv.mod_revision,
            },
        }
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: Bytes::copy_from_slice(kv.key()),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    }
}

fn convert_owned(kv: etcd_client::KeyValue) -> KeyValue {
    let (create_revision, mod_revision) = (kv.create_revision(), kv.mod_revision());
    let (key, value) = kv.into_key_value();
    KeyValue {
        key: Bytes::from(key),
        value: Bytes::from(value),
        create_revision,
        mod_revision,
    }
}

/// etcd rejects empty keys; `\0` is the smallest key there is.
fn nonempty(key: Vec<u8>) -> Vec<u8> {
    if key.is_empty() { vec![0] } else { key }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        let mut resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| self.request_error("get", key, e))?;
        let revision = self.header_revision("get", key, resp.header())?;
        let kv = resp.take_kvs().into_iter().next().map(convert_owned);
        Ok(GetResult { kv, revision })
    }

    async fn list(&self, prefix: &[u8], opts: ListOptions) -> Result<ListPage, StoreError> {
        let requested = opts.revision.filter(|r| *r > 0);
        let Some(start) = list_start(prefix, opts.start.as_deref()) else {
            let revision = match requested {
                Some(r) => r,
                None => self.revision().await?,
            };
            return Ok(ListPage {
                items: Vec::new(),
                revision,
                next: None,
            });
        };
        // `\0` as the end means "every key from the start on".
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let limit = i64::try_from(opts.limit).unwrap_or(i64::MAX);
        let mut get = GetOptions::new().with_range(end).with_limit(limit);
        if let Some(r) = requested {
            get = get.with_revision(r);
        }
        let mut resp = match self
            .client
            .kv_client()
            .get(nonempty(start), Some(get))
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                return Err(self
                    .read_error("list", prefix, requested.unwrap_or(0), e)
                    .await);
            }
        };
        // The header carries the current revision, also when reading an older one.
        let revision = match requested {
            Some(r) => r,
            None => self.header_revision("list", prefix, resp.header())?,
        };
        let more = resp.more();
        let items: Vec<KeyValue> = resp.take_kvs().into_iter().map(convert_owned).collect();
        let next = if more {
            items.last().map(|kv| next_key(&kv.key))
        } else {
            None
        };
        Ok(ListPage {
            items,
            revision,
            next,
        })
    }

    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, Vec::from(value.clone()), None)]);
        let resp = self.txn("create", key, txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists { key: key_str(key) });
        }
        let revision = self.header_revision("create", key, resp.header())?;
        Ok(KeyValue {
            key: Bytes::copy_from_slice(key),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected_mod_revision: i64,
    ) -> Result<KeyValue, StoreError> {
        let txn = Txn::new()
            .when([
                Compare::create_revision(key, CompareOp::Greater, 0),
                Compare::mod_revision(key, CompareOp::Equal, expected_mod_revision),
            ])
            .and_then([TxnOp::put(
                key,
                Vec::from(value.clone()),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("update", key, txn).await?;
        if !resp.succeeded() {
            let state = self.failed_compare("update", key, &resp)?;
            return Err(self.cas_failure(key, Some(expected_mod_revision), state));
        }
        let revision = self.header_revision("update", key, resp.header())?;
        let create_revision = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Put(put)) => {
                put.prev_key().map(etcd_client::KeyValue::create_revision)
            }
            _ => None,
        }
        .ok_or_else(|| self.protocol_error("update", key, "put without previous value"))?;
        Ok(KeyValue {
            key: Bytes::copy_from_slice(key),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(
        &self,
        key: &[u8],
        expected_mod_revision: Option<i64>,
    ) -> Result<Deleted, StoreError> {
        let mut when = vec![Compare::create_revision(key, CompareOp::Greater, 0)];
        if let Some(expected) = expected_mod_revision {
            when.push(Compare::mod_revision(key, CompareOp::Equal, expected));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("delete", key, txn).await?;
        if !resp.succeeded() {
            let state = self.failed_compare("delete", key, &resp)?;
            return Err(self.cas_failure(key, expected_mod_revision, state));
        }
        let revision = self.header_revision("delete", key, resp.header())?;
        let kv = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Delete(del)) => del.prev_kvs().first().map(convert),
            _ => None,
        }
        .ok_or_else(|| self.protocol_error("delete", key, "delete without previous value"))?;
        Ok(Deleted { kv, revision })
    }

    async fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
        opts: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        let from = from_revision.max(0);
        let watch_opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1)
            .with_prev_key();
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(watch_opts))
            .await
            .map_err(|e| self.request_error("watch", prefix, e))?;
        let progress = opts.progress_interval.map(|period| {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        let watcher = Watcher {
            stream,
            store: self.clone(),
            prefix: Bytes::copy_from_slice(prefix),
            requested: from,
            last: from,
            pending: VecDeque::new(),
            progress,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watcher,
            |mut w| async move { w.next().await.map(|item| (item, w)) },
        )))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let opts = CompactionOptions::new().with_physical();
        match self.client.kv_client().compact(revision, Some(opts)).await {
            Ok(_) => Ok(()),
            Err(e) => match known(&e) {
                // Already compacted at or past `revision`: nothing to do.
                Known::Compacted => Ok(()),
                _ => Err(self.read_error("compact", b"", revision, e).await),
            },
        }
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        // Any single-key read carries the store revision in its header.
        let probe = [0u8];
        let resp = self
            .client
            .kv_client()
            .get(probe, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.request_error("read revision", &probe, e))?;
        self.header_revision("read revision", &probe, resp.header())
    }
}

/// One etcd watch stream turned into store events.
struct Watcher {
    stream: etcd_client::WatchStream,
    store: EtcdStore,
    prefix: Bytes,
    requested: i64,
    /// Every change up to here has been delivered.
    last: i64,
    pending: VecDeque<WatchEvent>,
    progress: Option<Interval>,
    done: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            let step = self.step().await;
            match step {
                Ok(true) => {}
                Ok(false) => {
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

    /// Waits for one response (or asks for progress); false when etcd closed the stream.
    async fn step(&mut self) -> Result<bool, StoreError> {
        let received = match self.progress.as_mut() {
            Some(interval) => tokio::select! {
                r = self.stream.message() => Some(r),
                _ = interval.tick() => None,
            },
            None => Some(self.stream.message().await),
        };
        let resp = match received {
            // etcd answers with an empty response at its revision once this watch is synced.
            None => {
                return self
                    .stream
                    .request_progress()
                    .await
                    .map(|()| true)
                    .map_err(|e| self.store.request_error("watch progress", &self.prefix, e));
            }
            Some(Err(e)) => return Err(self.store.request_error("watch", &self.prefix, e)),
            Some(Ok(None)) => return Ok(false),
            Some(Ok(Some(resp))) => resp,
        };
        if resp.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: self.requested,
                compacted: Some(resp.compact_revision()),
            });
        }
        if resp.canceled() {
            return Err(StoreError::Etcd(EtcdError::WatchCanceled {
                endpoints: self.store.endpoints.to_string(),
                prefix: key_str(&self.prefix),
                reason: resp.cancel_reason().to_string(),
            }));
        }
        if resp.created() && resp.events().is_empty() {
            return Ok(true);
        }
        if resp.events().is_empty() {
            if let Some(revision) = resp.header().map(ResponseHeader::revision)
                && revision >= self.last
            {
                self.last = revision;
                self.pending.push_back(WatchEvent::Progress { revision });
            }
            return Ok(true);
        }
        for event in resp.events() {
            let converted = self.convert(event)?;
            self.last = converted.revision();
            self.pending.push_back(converted);
        }
        Ok(true)
    }

    fn convert(&self, event: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let kv = event.kv().ok_or_else(|| {
            self.store
                .protocol_error("watch", &self.prefix, "event without key")
        })?;
        match event.event_type() {
            EventType::Put => Ok(WatchEvent::Put {
                kv: convert(kv),
                prev: event.prev_kv().map(convert),
            }),
            EventType::Delete => {
                let last = event.prev_kv().map(convert).ok_or_else(|| {
                    self.store.protocol_error(
                        "watch",
                        kv.key(),
                        "delete event without the previous value (compacted meanwhile?)",
                    )
                })?;
                Ok(WatchEvent::Delete {
                    last,
                    revision: kv.mod_revision(),
                })
            }
        }
    }
}

/// How the etcd backend fails besides the answers every store gives.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("connect to etcd {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: Box<etcd_client::Error>,
    },
    #[error("etcd {endpoints}: {op} {key}: {source}")]
    Request {
        endpoints: String,
        op: &'static str,
        key: String,
        source: Box<etcd_client::Error>,
    },
    #[error("etcd {endpoints}: {op} {key}: unexpected answer: {what}")]
    Protocol {
        endpoints: String,
        op: &'static str,
        key: String,
        what: String,
    },
    #[error("etcd {endpoints}: watch on {prefix} canceled: {reason}")]
    WatchCanceled {
        endpoints: String,
        prefix: String,
        reason: String,
    },
}
