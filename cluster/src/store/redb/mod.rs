//! The embedded store: one redb file, `<data_dir>/store.redb`, the default backend.
//!
//! Owns the file, its tables and their invariants, the store revision, the MVCC history that
//! answers lists at older revisions and watch catch-up, compaction, and the watch hub that fans
//! changes out. Tables:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | `"revision"`, `"compacted"` | i64 |
//! | `current` | key | create revision, mod revision, value (the latest state) |
//! | `versions` | (key, revision) | put (create revision, value) or tombstone |
//! | `changes` | revision | key changed at that revision (the watch log) |
//!
//! Writes go through one writer thread (`writer.rs`) that commits whatever is queued as one
//! redb write transaction with `Durability::Immediate` (group commit: one fsync for all the
//! writes that arrived during the previous one), publishes their changes in revision order, and
//! only then answers, so an acknowledged write survives a crash; redb repairs an uncleanly closed
//! file on open. Each write touches O(log n) entries; nothing scans a table on the write path.
//!
//! Must not block the async runtime: reads run on `spawn_blocking`, writes on the writer thread.

mod codec;
mod read;
mod write;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use redb::{Database, TableDefinition};
use tokio::task::JoinError;

use self::write::Change;
use self::writer::Writer;
use super::watch_hub::{self, Catchup, Hub, Source};
use super::{
    Deleted, GetResult, KeyValue, ListOptions, ListPage, Store, StoreError, WatchOptions,
    WatchStream,
};

/// The file inside the data dir.
pub const FILE_NAME: &str = "store.redb";

const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const CURRENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("current");
const VERSIONS: TableDefinition<(&[u8], i64), &[u8]> = TableDefinition::new("versions");
const CHANGES: TableDefinition<i64, &[u8]> = TableDefinition::new("changes");

/// `meta` key: the store's revision.
const REVISION: &str = "revision";
/// `meta` key: the compaction point (0: never compacted).
const COMPACTED: &str = "compacted";
/// The revision of an empty store, as etcd's.
const INITIAL_REVISION: i64 = 1;

/// Tuning of the embedded store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedbOptions {
    /// Changes buffered for watchers; one that falls further behind re-reads the history. Also
    /// caps the writes one transaction takes (at most 512), so a batch's events fit the buffer.
    pub watch_buffer: usize,
    /// Revisions one compaction transaction covers, so a large compaction does not hold up
    /// writers for long.
    pub compact_batch: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            watch_buffer: 1024,
            compact_batch: 10_000,
        }
    }
}

/// The embedded store. Dropping it ends its watches and closes the file once in-flight calls
/// and queued writes finish.
#[derive(Debug)]
pub struct RedbStore {
    inner: Arc<Inner>,
    writer: Writer,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
    hub: Hub,
    compact_batch: i64,
}

impl RedbStore {
    /// Opens (creating when missing) `<data_dir>/store.redb`. Blocking: redb repairs a file that
    /// was not closed cleanly, which reads all of it; async callers use [`RedbStore::open_async`].
    pub fn open(data_dir: &Path, opts: RedbOptions) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RedbError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        let mut builder = Database::builder();
        builder.set_repair_callback(|session| {
            tracing::info!(
                progress = session.progress(),
                "repairing store after an unclean shutdown"
            );
        });
        let db = builder.create(&path).map_err(|source| RedbError::Open {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let revision = write::init(&db, &path)?;
        tracing::debug!(path = %path.display(), revision, "opened redb store");
        let inner = Arc::new(Inner {
            db,
            path,
            hub: Hub::new(opts.watch_buffer, revision),
            compact_batch: i64::try_from(opts.compact_batch.max(1)).unwrap_or(i64::MAX),
        });
        let writer = Writer::start(Arc::clone(&inner), opts.watch_buffer)?;
        Ok(RedbStore { inner, writer })
    }

    /// [`RedbStore::open`] on a blocking thread.
    pub async fn open_async(data_dir: PathBuf, opts: RedbOptions) -> Result<RedbStore, StoreError> {
        let path = data_dir.join(FILE_NAME);
        tokio::task::spawn_blocking(move || RedbStore::open(&data_dir, opts))
            .await
            .map_err(|source| RedbError::Worker {
                path,
                op: "open",
                source,
            })?
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Checks the tables against each other (a full scan, for tests and repair tooling): the
    /// change log is contiguous above the compaction point and below the revision, and every
    /// current key matches its latest version.
    pub async fn verify(&self) -> Result<(), StoreError> {
        self.blocking("verify", read::verify).await
    }

    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|source| RedbError::Worker {
                path: self.inner.path.clone(),
                op,
                source,
            })?
    }
}

impl Inner {
    /// Maps a redb failure during `op` to the store's error.
    fn fail<E: Into<redb::Error>>(&self, op: &'static str) -> impl Fn(E) -> StoreError + '_ {
        move |e| storage_error(&self.path, op, e)
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Redb(RedbError::Corrupt {
            path: self.path.clone(),
            what,
        })
    }
}

impl Source for Inner {
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
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || read::changes_after(&self, &prefix, after, limit))
                .await
                .map_err(|source| RedbError::Worker {
                    path,
                    op: "read changes",
                    source,
                })?
        })
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &[u8]) -> Result<GetResult, StoreError> {
        let key = key.to_vec();
        self.blocking("get", move |inner| read::get(inner, &key))
            .await
    }

    async fn list(&self, prefix: &[u8], opts: ListOptions) -> Result<ListPage, StoreError> {
        let prefix = prefix.to_vec();
        self.blocking("list", move |inner| read::list(inner, &prefix, &opts))
            .await
    }

    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError> {
        let change = Change::Put {
            key: Bytes::copy_from_slice(key),
            value,
            expected: None,
        };
        Ok(self.writer.write(change).await?.kv)
    }

    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected_mod_revision: i64,
    ) -> Result<KeyValue, StoreError> {
        let change = Change::Put {
            key: Bytes::copy_from_slice(key),
            value,
            expected: Some(expected_mod_revision),
        };
        Ok(self.writer.write(change).await?.kv)
    }

    async fn delete(
        &self,
        key: &[u8],
        expected_mod_revision: Option<i64>,
    ) -> Result<Deleted, StoreError> {
        let change = Change::Delete {
            key: Bytes::copy_from_slice(key),
            expected: expected_mod_revision,
        };
        let applied = self.writer.write(change).await?;
        Ok(Deleted {
            kv: applied.kv,
            revision: applied.revision,
        })
    }

    async fn watch(
        &self,
        prefix: &[u8],
        from_revision: i64,
        opts: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        Ok(watch_hub::watch(
            &self.inner,
            Bytes::copy_from_slice(prefix),
            from_revision,
            &opts,
        ))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.writer.compact(revision).await
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        self.blocking("revision", read::revision).await
    }
}

/// A redb failure during `op` on the file at `path`.
fn storage_error(path: &Path, op: &'static str, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(RedbError::Storage {
        path: path.to_path_buf(),
        op,
        source: Box::new(e.into()),
    })
}

/// How the embedded store fails besides the answers every store gives.
#[derive(Debug, thiserror::Error)]
pub enum RedbError {
    #[error("create store dir {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error("store {}: {op}: {source}", path.display())]
    Storage {
        path: PathBuf,
        op: &'static str,
        source: Box<redb::Error>,
    },
    #[error("store {}: corrupt: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("store {}: start the writer thread: {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {}: {op}: the writer thread stopped; the write may not have been committed", path.display())]
    WriterStopped { path: PathBuf, op: &'static str },
    #[error("store {}: the write transaction this write was batched into failed: {source}", path.display())]
    Batch {
        path: PathBuf,
        source: Arc<StoreError>,
    },
    #[error("store {}: {op}: worker thread failed: {source}", path.display())]
    Worker {
        path: PathBuf,
        op: &'static str,
        source: JoinError,
    },
}
