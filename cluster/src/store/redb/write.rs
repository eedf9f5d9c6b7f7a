//! Writes of the redb store: create, compare-and-swap update and delete, compaction, and the
//! table setup at open. Each change is one durable write transaction that raises the revision,
//! records the new version and the change, then is published to the watchers.
//!
//! Must not publish anything that was not committed, nor publish out of revision order: both
//! follow from committing and publishing under the `writer` lock.

use std::collections::HashMap;
use std::path::Path;
use std::sync::PoisonError;

use bytes::Bytes;
use redb::{Database, ReadableTable, Table, WriteTransaction};

use super::codec::{self, Version};
use super::{
    CHANGES, COMPACTED, CURRENT, INITIAL_REVISION, Inner, META, REVISION, VERSIONS, storage_error,
};
use crate::store::{Deleted, KeyValue, StoreError, WatchEvent, key_str};

/// Creates the tables of a new file and returns the store's revision.
pub(super) fn init(db: &Database, path: &Path) -> Result<i64, StoreError> {
    let txn = db
        .begin_write()
        .map_err(|e| storage_error(path, "begin init", e))?;
    let revision = {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| storage_error(path, "create meta", e))?;
        let existing = meta
            .get(REVISION)
            .map_err(|e| storage_error(path, "read meta", e))?
            .map(|v| v.value());
        match existing {
            Some(r) => r,
            None => {
                for (name, value) in [(REVISION, INITIAL_REVISION), (COMPACTED, 0)] {
                    meta.insert(name, value)
                        .map_err(|e| storage_error(path, "init meta", e))?;
                }
                INITIAL_REVISION
            }
        }
    };
    txn.open_table(CURRENT)
        .map_err(|e| storage_error(path, "create current", e))?;
    txn.open_table(VERSIONS)
        .map_err(|e| storage_error(path, "create versions", e))?;
    txn.open_table(CHANGES)
        .map_err(|e| storage_error(path, "create changes", e))?;
    txn.commit()
        .map_err(|e| storage_error(path, "commit init", e))?;
    Ok(revision)
}

/// The tables a change writes.
struct Tables<'txn> {
    current: Table<'txn, &'static [u8], &'static [u8]>,
    versions: Table<'txn, (&'static [u8], i64), &'static [u8]>,
    changes: Table<'txn, i64, &'static [u8]>,
}

/// Runs `change` at the next revision in one durable transaction, then publishes its event.
/// `change` returns the caller's answer and the event, or an answer such as Conflict, which
/// aborts the transaction.
fn write<T>(
    inner: &Inner,
    op: &'static str,
    change: impl FnOnce(&mut Tables<'_>, i64) -> Result<(T, WatchEvent), StoreError>,
) -> Result<T, StoreError> {
    // The guarded state is in redb, and a panicking writer's transaction was aborted, so a
    // poisoned lock protects nothing broken.
    let _writer = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
    let txn = inner.db.begin_write().map_err(inner.fail(op))?;
    let outcome = apply(inner, op, &txn, change);
    let (answer, event) = match outcome {
        Ok(done) => done,
        Err(e) => {
            // Nothing was committed; an abort failure would only repeat the cause.
            let _ = txn.abort();
            return Err(e);
        }
    };
    txn.commit().map_err(inner.fail(op))?;
    inner.hub.publish(event);
    Ok(answer)
}

fn apply<T>(
    inner: &Inner,
    op: &'static str,
    txn: &WriteTransaction,
    change: impl FnOnce(&mut Tables<'_>, i64) -> Result<(T, WatchEvent), StoreError>,
) -> Result<(T, WatchEvent), StoreError> {
    let mut meta = txn.open_table(META).map_err(inner.fail(op))?;
    let revision = meta
        .get(REVISION)
        .map_err(inner.fail(op))?
        .map_or(INITIAL_REVISION, |v| v.value());
    let next = revision + 1;
    let mut tables = Tables {
        current: txn.open_table(CURRENT).map_err(inner.fail(op))?,
        versions: txn.open_table(VERSIONS).map_err(inner.fail(op))?,
        changes: txn.open_table(CHANGES).map_err(inner.fail(op))?,
    };
    let done = change(&mut tables, next)?;
    meta.insert(REVISION, next).map_err(inner.fail(op))?;
    Ok(done)
}

/// Records `key`'s new value at `revision` in all three tables.
fn put(
    inner: &Inner,
    t: &mut Tables<'_>,
    key: &[u8],
    value: &[u8],
    create_revision: i64,
    revision: i64,
) -> Result<(), StoreError> {
    let fail = inner.fail("write");
    t.current
        .insert(
            key,
            codec::encode_current(create_revision, revision, value).as_slice(),
        )
        .map_err(&fail)?;
    t.versions
        .insert(
            (key, revision),
            codec::encode_put(create_revision, value).as_slice(),
        )
        .map_err(&fail)?;
    t.changes.insert(revision, key).map_err(&fail)?;
    Ok(())
}

/// The key's current state, if any.
fn current(inner: &Inner, t: &Tables<'_>, key: &Bytes) -> Result<Option<KeyValue>, StoreError> {
    let Some(record) = t.current.get(key.as_ref()).map_err(inner.fail("read"))? else {
        return Ok(None);
    };
    let c = codec::decode_current(record.value())
        .ok_or_else(|| inner.corrupt(format!("current record of {}", key_str(key))))?;
    Ok(Some(KeyValue {
        key: key.clone(),
        value: Bytes::copy_from_slice(c.value),
        create_revision: c.create_revision,
        mod_revision: c.mod_revision,
    }))
}

/// The current state when it is at `expected` (or any, without expectation).
fn current_at(
    inner: &Inner,
    t: &Tables<'_>,
    key: &Bytes,
    expected: Option<i64>,
) -> Result<KeyValue, StoreError> {
    let kv = current(inner, t, key)?.ok_or_else(|| StoreError::NotFound { key: key_str(key) })?;
    match expected {
        Some(expected) if expected != kv.mod_revision => Err(StoreError::Conflict {
            key: key_str(key),
            expected,
            actual: kv.mod_revision,
        }),
        _ => Ok(kv),
    }
}

pub(super) fn create(inner: &Inner, key: Bytes, value: Bytes) -> Result<KeyValue, StoreError> {
    write(inner, "create", |t, revision| {
        if current(inner, t, &key)?.is_some() {
            return Err(StoreError::AlreadyExists { key: key_str(&key) });
        }
        put(inner, t, &key, &value, revision, revision)?;
        let kv = KeyValue {
            key,
            value,
            create_revision: revision,
            mod_revision: revision,
        };
        Ok((kv.clone(), WatchEvent::Put { kv, prev: None }))
    })
}

pub(super) fn update(
    inner: &Inner,
    key: Bytes,
    value: Bytes,
    expected: i64,
) -> Result<KeyValue, StoreError> {
    write(inner, "update", |t, revision| {
        let prev = current_at(inner, t, &key, Some(expected))?;
        put(inner, t, &key, &value, prev.create_revision, revision)?;
        let kv = KeyValue {
            key,
            value,
            create_revision: prev.create_revision,
            mod_revision: revision,
        };
        let event = WatchEvent::Put {
            kv: kv.clone(),
            prev: Some(prev),
        };
        Ok((kv, event))
    })
}

pub(super) fn delete(
    inner: &Inner,
    key: Bytes,
    expected: Option<i64>,
) -> Result<Deleted, StoreError> {
    write(inner, "delete", |t, revision| {
        let last = current_at(inner, t, &key, expected)?;
        let fail = inner.fail("delete");
        t.current.remove(key.as_ref()).map_err(&fail)?;
        t.versions
            .insert(
                (key.as_ref(), revision),
                codec::encode_tombstone().as_slice(),
            )
            .map_err(&fail)?;
        t.changes.insert(revision, key.as_ref()).map_err(&fail)?;
        let event = WatchEvent::Delete {
            last: last.clone(),
            revision,
        };
        Ok((Deleted { kv: last, revision }, event))
    })
}

/// Compacts through `target`, one transaction per `compact_batch` revisions.
pub(super) fn compact(inner: &Inner, target: i64) -> Result<(), StoreError> {
    while compact_step(inner, target)? {}
    Ok(())
}

/// One compaction transaction; true while more remain.
fn compact_step(inner: &Inner, target: i64) -> Result<bool, StoreError> {
    let _writer = inner.writer.lock().unwrap_or_else(PoisonError::into_inner);
    let op = "compact";
    let txn = inner.db.begin_write().map_err(inner.fail(op))?;
    let step = (|| {
        let mut meta = txn.open_table(META).map_err(inner.fail(op))?;
        let read = |name| -> Result<i64, StoreError> {
            Ok(meta
                .get(name)
                .map_err(inner.fail(op))?
                .map_or(0, |v| v.value()))
        };
        let (revision, compacted) = (read(REVISION)?, read(COMPACTED)?);
        if target > revision {
            return Err(StoreError::FutureRevision {
                requested: target,
                current: revision,
            });
        }
        if target <= compacted {
            return Ok(None);
        }
        let upto = target.min(compacted.saturating_add(inner.compact_batch));
        let mut versions = txn.open_table(VERSIONS).map_err(inner.fail(op))?;
        let mut changes = txn.open_table(CHANGES).map_err(inner.fail(op))?;
        compact_range(inner, &mut versions, &mut changes, compacted, upto)?;
        meta.insert(COMPACTED, upto).map_err(inner.fail(op))?;
        Ok(Some(upto < target))
    })();
    match step {
        Ok(Some(more)) => {
            txn.commit().map_err(inner.fail(op))?;
            Ok(more)
        }
        other => {
            // Nothing changed (already compacted, or an error): no commit, no fsync.
            let _ = txn.abort();
            other.map(|_| false)
        }
    }
}

/// Drops what no read at or after `upto` needs, for the changes in `(from, upto]`: every
/// version a later change at or below `upto` superseded, the tombstones that are a key's last
/// version at `upto`, and the change log entries themselves.
fn compact_range(
    inner: &Inner,
    versions: &mut Table<'_, (&'static [u8], i64), &'static [u8]>,
    changes: &mut Table<'_, i64, &'static [u8]>,
    from: i64,
    upto: i64,
) -> Result<(), StoreError> {
    let fail = inner.fail("compact");
    let mut log: Vec<(i64, Vec<u8>)> = Vec::new();
    for entry in changes.range((from + 1)..=upto).map_err(&fail)? {
        let (revision, key) = entry.map_err(&fail)?;
        log.push((revision.value(), key.value().to_vec()));
    }
    let mut last: HashMap<&[u8], i64> = HashMap::new();
    for (revision, key) in &log {
        // In revision order, so this is at most the previous change's version, or the one the
        // previous compaction kept.
        let mut older = Vec::new();
        for entry in versions
            .range::<(&[u8], i64)>((key.as_slice(), i64::MIN)..(key.as_slice(), *revision))
            .map_err(&fail)?
        {
            older.push(entry.map_err(&fail)?.0.value().1);
        }
        for old in older {
            versions.remove((key.as_slice(), old)).map_err(&fail)?;
        }
        last.insert(key.as_slice(), *revision);
    }
    for (key, revision) in last {
        let tombstone = match versions.get((key, revision)).map_err(&fail)? {
            Some(record) => codec::decode_version(record.value()) == Some(Version::Tombstone),
            None => false,
        };
        if tombstone {
            versions.remove((key, revision)).map_err(&fail)?;
        }
    }
    for (revision, _) in &log {
        changes.remove(*revision).map_err(&fail)?;
    }
    Ok(())
}
