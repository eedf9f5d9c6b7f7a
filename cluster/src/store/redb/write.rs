//! What the redb store's writer applies inside its transactions: create, compare-and-swap
//! update and delete (each checking its own precondition first, then recording the new version
//! and the change at the revision it is given), one compaction step, and the table setup at open.
//!
//! Must not begin, commit or publish anything: the writer (`writer.rs`) owns the transactions,
//! hands out the revisions and publishes after the commit. Must not write before a change's
//! precondition holds, so that a refused change leaves the batch's transaction untouched.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};

use super::codec::{self, Version};
use super::{
    CHANGES, COMPACTED, CURRENT, INITIAL_REVISION, Inner, META, REVISION, VERSIONS, storage_error,
};
use crate::store::{KeyValue, StoreError, WatchEvent, key_str};

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

/// A write transaction that is fsynced before its commit returns. `Immediate` is redb's default;
/// it is set here so that no change of default can weaken "acknowledged means durable".
pub(super) fn begin(inner: &Inner, op: &'static str) -> Result<WriteTransaction, StoreError> {
    let mut txn = inner.db.begin_write().map_err(inner.fail(op))?;
    txn.set_durability(Durability::Immediate)
        .map_err(inner.fail(op))?;
    Ok(txn)
}

/// The tables a batch of changes writes, opened once per transaction.
pub(super) struct Tables<'txn> {
    meta: Table<'txn, &'static str, i64>,
    current: Table<'txn, &'static [u8], &'static [u8]>,
    versions: Table<'txn, (&'static [u8], i64), &'static [u8]>,
    changes: Table<'txn, i64, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    pub(super) fn open(inner: &Inner, txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        let fail = inner.fail("open tables");
        Ok(Tables {
            meta: txn.open_table(META).map_err(&fail)?,
            current: txn.open_table(CURRENT).map_err(&fail)?,
            versions: txn.open_table(VERSIONS).map_err(&fail)?,
            changes: txn.open_table(CHANGES).map_err(&fail)?,
        })
    }

    /// The store's revision as of this transaction.
    pub(super) fn revision(&self, inner: &Inner) -> Result<i64, StoreError> {
        Ok(self
            .meta
            .get(REVISION)
            .map_err(inner.fail("read revision"))?
            .map_or(INITIAL_REVISION, |v| v.value()))
    }

    pub(super) fn set_revision(&mut self, inner: &Inner, revision: i64) -> Result<(), StoreError> {
        self.meta
            .insert(REVISION, revision)
            .map_err(inner.fail("write revision"))?;
        Ok(())
    }
}

/// One write as the writer applies it.
#[derive(Debug)]
pub(super) enum Change {
    /// A create (`expected: None`, the key must be absent) or a compare-and-swap update (the
    /// key's mod revision must be `expected`).
    Put {
        key: Bytes,
        value: Bytes,
        expected: Option<i64>,
    },
    /// A delete, compare-and-swap when `expected` is set.
    Delete { key: Bytes, expected: Option<i64> },
}

impl Change {
    pub(super) fn op(&self) -> &'static str {
        match self {
            Change::Put { expected: None, .. } => "create",
            Change::Put { .. } => "update",
            Change::Delete { .. } => "delete",
        }
    }
}

/// What an applied change answers: the key's new state for a put, its last state for a delete;
/// `revision` is the change's revision.
#[derive(Debug)]
pub(super) struct Applied {
    pub(super) kv: KeyValue,
    pub(super) revision: i64,
}

/// The answer a change gets on its own: applied at its revision, or refused by its precondition
/// (AlreadyExists, NotFound, Conflict) having written nothing.
pub(super) type Answer = Result<(Applied, WatchEvent), StoreError>;

/// Applies `change` at `revision` inside the batch's transaction. The outer error is storage
/// failing, which dooms the whole batch; the inner one is this change's precondition failing,
/// which the batch survives because the check comes before any write.
pub(super) fn apply(
    inner: &Inner,
    t: &mut Tables<'_>,
    change: Change,
    revision: i64,
) -> Result<Answer, StoreError> {
    match change {
        Change::Put {
            key,
            value,
            expected: None,
        } => create(inner, t, key, value, revision),
        Change::Put {
            key,
            value,
            expected: Some(expected),
        } => update(inner, t, key, value, expected, revision),
        Change::Delete { key, expected } => delete(inner, t, key, expected, revision),
    }
}

/// Records `key`'s new value at `revision` in the three data tables.
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

/// The current state when it is at `expected` (or any, without expectation); the inner error
/// is the precondition's answer.
fn current_at(
    inner: &Inner,
    t: &Tables<'_>,
    key: &Bytes,
    expected: Option<i64>,
) -> Result<Result<KeyValue, StoreError>, StoreError> {
    let Some(kv) = current(inner, t, key)? else {
        return Ok(Err(StoreError::NotFound { key: key_str(key) }));
    };
    Ok(match expected {
        Some(expected) if expected != kv.mod_revision => Err(StoreError::Conflict {
            key: key_str(key),
            expected,
            actual: kv.mod_revision,
        }),
        _ => Ok(kv),
    })
}

fn create(
    inner: &Inner,
    t: &mut Tables<'_>,
    key: Bytes,
    value: Bytes,
    revision: i64,
) -> Result<Answer, StoreError> {
    if current(inner, t, &key)?.is_some() {
        return Ok(Err(StoreError::AlreadyExists { key: key_str(&key) }));
    }
    put(inner, t, &key, &value, revision, revision)?;
    let kv = KeyValue {
        key,
        value,
        create_revision: revision,
        mod_revision: revision,
    };
    let event = WatchEvent::Put {
        kv: kv.clone(),
        prev: None,
    };
    Ok(Ok((Applied { kv, revision }, event)))
}

fn update(
    inner: &Inner,
    t: &mut Tables<'_>,
    key: Bytes,
    value: Bytes,
    expected: i64,
    revision: i64,
) -> Result<Answer, StoreError> {
    let prev = match current_at(inner, t, &key, Some(expected))? {
        Ok(prev) => prev,
        Err(answer) => return Ok(Err(answer)),
    };
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
    Ok(Ok((Applied { kv, revision }, event)))
}

fn delete(
    inner: &Inner,
    t: &mut Tables<'_>,
    key: Bytes,
    expected: Option<i64>,
    revision: i64,
) -> Result<Answer, StoreError> {
    let last = match current_at(inner, t, &key, expected)? {
        Ok(last) => last,
        Err(answer) => return Ok(Err(answer)),
    };
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
    Ok(Ok((Applied { kv: last, revision }, event)))
}

/// One compaction transaction, covering at most `compact_batch` revisions towards `target`;
/// true while more remain. Runs on the writer thread between batches, so a large compaction
/// lets the writes queued behind it through after each step.
pub(super) fn compact_step(inner: &Inner, target: i64) -> Result<bool, StoreError> {
    let op = "compact";
    let txn = begin(inner, op)?;
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
