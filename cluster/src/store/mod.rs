//! The control plane's store: one [`Store`] trait and its two backends, embedded redb
//! ([`RedbStore`], the default: one file in the data dir) and etcd ([`EtcdStore`], for several
//! servers sharing state).
//!
//! Owns the data model both backends honour, as Kubernetes' storage layer expects of etcd3:
//!
//! - One global revision per store, raised by every create, update and delete. Each key carries
//!   the revision that created it and the one that last changed it. A resourceVersion is a
//!   store revision.
//! - Writes are compare-and-swap on the key's `mod_revision`; every acknowledged write is durable.
//! - Lists are sorted by key, paged, and can read the state at an older revision until that
//!   revision is compacted away.
//! - A watch delivers every change with a revision above the one it starts from, in revision
//!   order, exactly once; starting below the compaction point yields [`StoreError::Compacted`]
//!   (the API server's "410 Gone: resourceVersion too old").
//!
//! Keys and values are opaque bytes: this module must not know about Kubernetes objects, key
//! layouts or encodings; the API server above it owns those.
//!
//! The trait is object-safe through `async_trait` (each call returns a boxed future) because the
//! API server picks its backend from configuration at run time and holds an `Arc<dyn Store>`;
//! one allocation per call is noise next to an fsync or a network round trip.

pub mod etcd;
pub mod redb;
mod watch_hub;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

pub use self::etcd::{EtcdError, EtcdStore};
pub use self::redb::{RedbError, RedbOptions, RedbStore};

/// One key's state at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// The revision of the create that made this incarnation of the key.
    pub create_revision: i64,
    /// The revision of the last write to the key (the object's resourceVersion).
    pub mod_revision: i64,
}

/// Answer of [`Store::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult {
    /// The key's current state; `None` when absent.
    pub kv: Option<KeyValue>,
    /// The store's revision when it was read.
    pub revision: i64,
}

/// What [`Store::list`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Read the state at this revision; `None` (or a value <= 0) reads the current state.
    /// The pages of one list all pass the revision the first page returned.
    pub revision: Option<i64>,
    /// At most this many items; 0 means no limit.
    pub limit: usize,
    /// Start at this key (inclusive): the [`ListPage::next`] of the previous page.
    pub start: Option<Bytes>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// Sorted by key.
    pub items: Vec<KeyValue>,
    /// The revision the page was read at.
    pub revision: i64,
    /// Where the next page starts (pass it as [`ListOptions::start`] with
    /// `revision: Some(self.revision)`); `None` when this is the last page.
    pub next: Option<Bytes>,
}

impl ListPage {
    /// Whether more items follow this page.
    pub fn more(&self) -> bool {
        self.next.is_some()
    }
}

/// Answer of [`Store::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The key's last state before the delete (Kubernetes returns the deleted object).
    pub kv: KeyValue,
    /// The revision of the delete.
    pub revision: i64,
}

/// One item of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A create (`prev` is `None`) or an update. `kv.mod_revision` is the event's revision.
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// A delete at `revision`; `last` is the key's state just before it.
    Delete { last: KeyValue, revision: i64 },
    /// Every change up to `revision` under the watched prefix has been delivered (a bookmark).
    Progress { revision: i64 },
}

impl WatchEvent {
    /// The revision this event happened at (or, for progress, has reached).
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } | WatchEvent::Progress { revision } => *revision,
        }
    }

    /// The changed key; empty for progress.
    pub fn key(&self) -> &[u8] {
        match self {
            WatchEvent::Put { kv, .. } => &kv.key,
            WatchEvent::Delete { last, .. } => &last.key,
            WatchEvent::Progress { .. } => &[],
        }
    }
}

/// How a watch behaves besides its prefix and start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// Emit [`WatchEvent::Progress`] about this often when the store can vouch for it.
    pub progress_interval: Option<Duration>,
}

/// A watch: events in revision order. The stream ends after its first error, when the store is
/// dropped, or when etcd closes it; the caller watches again from the last revision it saw (or
/// relists on [`StoreError::Compacted`]).
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// The store of the control plane. Both backends pass `tests/store_conformance.rs`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's current state and the store's revision.
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError>;

    /// The keys starting with `prefix`, sorted, one page at a time, at the current or an older
    /// revision. Older than the compaction point: [`StoreError::Compacted`]; newer than the
    /// store: [`StoreError::FutureRevision`].
    async fn list(&self, prefix: &[u8], opts: ListOptions) -> Result<ListPage, StoreError>;

    /// Creates the key; [`StoreError::AlreadyExists`] when it is present.
    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError>;

    /// Replaces the value if the key's `mod_revision` is still `expected_mod_revision`;
    /// otherwise [`StoreError::Conflict`] (with the actual revision), or [`StoreError::NotFound`].
    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected_mod_revision: i64,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes the key, if given only when its `mod_revision` is still `expected_mod_revision`.
    /// Returns its last state.
    async fn delete(
        &self,
        key: &[u8],
        expected_mod_revision: Option<i64>,
    ) -> Result<Deleted, StoreError>;

    /// Every change under `prefix` with a revision above `from_revision` (typically the
    /// revision a list returned), in order, then live. A `from_revision` below the compaction
    /// point makes the stream's first item [`StoreError::Compacted`].
    async fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
        opts: WatchOptions,
    ) -> Result<WatchStream, StoreError>;

    /// Drops the history before `revision`: lists at and watches from `revision` or later keep
    /// working, older ones yield [`StoreError::Compacted`]. Compacting at or below an earlier
    /// compaction is a no-op.
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;

    /// The store's current revision.
    async fn revision(&self) -> Result<i64, StoreError>;
}

/// Which backend to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `<data_dir>/store.redb`, created when missing.
    Redb { data_dir: PathBuf },
    /// An etcd cluster, e.g. `http://127.0.0.1:2379`.
    Etcd { endpoints: Vec<String> },
}

/// Opens the configured backend.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Redb { data_dir } => {
            let dir = data_dir.clone();
            Arc::new(RedbStore::open_async(dir, RedbOptions::default()).await?)
        }
        StoreConfig::Etcd { endpoints } => Arc::new(EtcdStore::connect(endpoints).await?),
    })
}

/// What a store operation can fail with. The first five are answers the API server maps to
/// HTTP statuses; the others are the backend failing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: already exists")]
    AlreadyExists { key: String },
    #[error("{key}: not found")]
    NotFound { key: String },
    #[error("{key}: modified concurrently: expected mod revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: i64,
        actual: i64,
    },
    #[error("revision {requested} is too old: compacted{}", compacted_suffix(*compacted))]
    Compacted {
        requested: i64,
        /// The compaction point, when the backend reports it.
        compacted: Option<i64>,
    },
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision { requested: i64, current: i64 },
    #[error(transparent)]
    Redb(#[from] RedbError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

fn compacted_suffix(compacted: Option<i64>) -> String {
    compacted
        .map(|c| format!(" through {c}"))
        .unwrap_or_default()
}

/// A key for error messages (Kubernetes keys are UTF-8 paths).
pub(crate) fn key_str(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The first key after every key starting with `prefix`, as etcd computes range ends;
/// `None` when no such key exists (empty prefix or all bytes 0xff): the range is unbounded.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The key a list page starts at: `start` when it lies within the prefix's range, else the
/// prefix itself. `None` when `start` lies past the prefix's range (nothing to list).
pub(crate) fn list_start(prefix: &[u8], start: Option<&[u8]>) -> Option<Vec<u8>> {
    match start {
        Some(s) if s > prefix => match prefix_end(prefix) {
            Some(end) if s >= end.as_slice() => None,
            _ => Some(s.to_vec()),
        },
        _ => Some(prefix.to_vec()),
    }
}

/// The start of the next page after `last_key`: its immediate successor.
pub(crate) fn next_key(last_key: &[u8]) -> Bytes {
    let mut next = Vec::with_capacity(last_key.len() + 1);
    next.extend_from_slice(last_key);
    next.push(0);
    Bytes::from(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn list_start_stays_in_prefix() {
        assert_eq!(list_start(b"/a/", None), Some(b"/a/".to_vec()));
        assert_eq!(list_start(b"/a/", Some(b"/a/x")), Some(b"/a/x".to_vec()));
        assert_eq!(list_start(b"/a/", Some(b"/")), Some(b"/a/".to_vec()));
        assert_eq!(list_start(b"/a/", Some(b"/b")), None);
        assert_eq!(list_start(b"", Some(b"zz")), Some(b"zz".to_vec()));
    }

    #[test]
    fn next_key_is_successor() {
        assert_eq!(&next_key(b"/a/1")[..], b"/a/1\0");
    }

    #[test]
    fn compacted_message_says_how_old() {
        let e = StoreError::Compacted {
            requested: 3,
            compacted: Some(7),
        };
        assert_eq!(e.to_string(), "revision 3 is too old: compacted through 7");
        let e = StoreError::Compacted {
            requested: 3,
            compacted: None,
        };
        assert_eq!(e.to_string(), "revision 3 is too old: compacted");
    }
}
