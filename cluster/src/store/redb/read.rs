//! Reads of the redb store: get, list (current or at an older revision), the change log for
//! watch catch-up, and the consistency check. Each runs in one read transaction, a snapshot.
//!
//! Must not write, and must stay on the blocking thread the caller put it on.

use std::ops::Bound;

use bytes::Bytes;
use redb::{ReadOnlyTable, ReadTransaction, ReadableDatabase};

use super::codec::{self, Version};
use super::{CHANGES, COMPACTED, CURRENT, INITIAL_REVISION, Inner, META, REVISION, VERSIONS};
use crate::store::watch_hub::Catchup;
use crate::store::{
    GetResult, KeyValue, ListOptions, ListPage, StoreError, WatchEvent, key_str, list_start,
    next_key, prefix_end,
};

type VersionsTable = ReadOnlyTable<(&'static [u8], i64), &'static [u8]>;

/// The revision and compaction point of a snapshot.
struct Meta {
    revision: i64,
    compacted: i64,
}

fn begin(inner: &Inner) -> Result<(ReadTransaction, Meta), StoreError> {
    let txn = inner.db.begin_read().map_err(inner.fail("begin read"))?;
    let meta = txn.open_table(META).map_err(inner.fail("open meta"))?;
    let get = |name: &str, default: i64| -> Result<i64, StoreError> {
        Ok(meta
            .get(name)
            .map_err(inner.fail("read meta"))?
            .map_or(default, |v| v.value()))
    };
    let m = Meta {
        revision: get(REVISION, INITIAL_REVISION)?,
        compacted: get(COMPACTED, 0)?,
    };
    drop(meta);
    Ok((txn, m))
}

pub(super) fn revision(inner: &Inner) -> Result<i64, StoreError> {
    Ok(begin(inner)?.1.revision)
}

pub(super) fn get(inner: &Inner, key: &[u8]) -> Result<GetResult, StoreError> {
    let (txn, meta) = begin(inner)?;
    let current = txn
        .open_table(CURRENT)
        .map_err(inner.fail("open current"))?;
    let kv = match current.get(key).map_err(inner.fail("get"))? {
        Some(record) => Some(current_kv(inner, key, record.value())?),
        None => None,
    };
    Ok(GetResult {
        kv,
        revision: meta.revision,
    })
}

pub(super) fn list(
    inner: &Inner,
    prefix: &[u8],
    opts: &ListOptions,
) -> Result<ListPage, StoreError> {
    let (txn, meta) = begin(inner)?;
    let at = match opts.revision {
        Some(r) if r > 0 => r,
        _ => meta.revision,
    };
    if at > meta.revision {
        return Err(StoreError::FutureRevision {
            requested: at,
            current: meta.revision,
        });
    }
    if at < meta.compacted {
        return Err(StoreError::Compacted {
            requested: at,
            compacted: Some(meta.compacted),
        });
    }
    let mut page = ListPage {
        items: Vec::new(),
        revision: at,
        next: None,
    };
    let Some(start) = list_start(prefix, opts.start.as_deref()) else {
        return Ok(page);
    };
    let end = prefix_end(prefix);
    let limit = if opts.limit == 0 {
        usize::MAX
    } else {
        opts.limit
    };
    let more = if at == meta.revision {
        list_current(inner, &txn, &start, end.as_deref(), limit, &mut page.items)?
    } else {
        list_at(
            inner,
            &txn,
            &start,
            end.as_deref(),
            at,
            limit,
            &mut page.items,
        )?
    };
    if more {
        page.next = page.items.last().map(|kv| next_key(&kv.key));
    }
    Ok(page)
}

/// Fills `items` from the `current` table; true when more keys follow.
fn list_current(
    inner: &Inner,
    txn: &ReadTransaction,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
    items: &mut Vec<KeyValue>,
) -> Result<bool, StoreError> {
    let current = txn
        .open_table(CURRENT)
        .map_err(inner.fail("open current"))?;
    let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
    let range = current
        .range::<&[u8]>((Bound::Included(start), upper))
        .map_err(inner.fail("list"))?;
    for entry in range {
        let (key, record) = entry.map_err(inner.fail("list"))?;
        if items.len() == limit {
            return Ok(true);
        }
        items.push(current_kv(inner, key.value(), record.value())?);
    }
    Ok(false)
}

/// Fills `items` with the state at revision `at` from the `versions` table; true when more
/// keys follow. Two seeks per key whatever its number of versions: the key's first version,
/// then its last one at or below `at`.
fn list_at(
    inner: &Inner,
    txn: &ReadTransaction,
    start: &[u8],
    end: Option<&[u8]>,
    at: i64,
    limit: usize,
    items: &mut Vec<KeyValue>,
) -> Result<bool, StoreError> {
    let versions = txn
        .open_table(VERSIONS)
        .map_err(inner.fail("open versions"))?;
    let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded((e, i64::MIN)));
    let mut key: Vec<u8> = start.to_vec();
    let mut lower_inclusive = true;
    loop {
        let lower = if lower_inclusive {
            Bound::Included((key.as_slice(), i64::MIN))
        } else {
            // Past every version of `key`.
            Bound::Excluded((key.as_slice(), i64::MAX))
        };
        let next = versions
            .range::<(&[u8], i64)>((lower, upper))
            .map_err(inner.fail("list at revision"))?
            .next();
        let Some(entry) = next else {
            return Ok(false);
        };
        let (found, _) = entry.map_err(inner.fail("list at revision"))?;
        key = found.value().0.to_vec();
        lower_inclusive = false;
        if let Some(kv) = version_at(inner, &versions, &key, at)? {
            if items.len() == limit {
                return Ok(true);
            }
            items.push(kv);
        }
    }
}

/// The key's state at revision `at`: its last version at or below `at`, unless a tombstone.
fn version_at(
    inner: &Inner,
    versions: &VersionsTable,
    key: &[u8],
    at: i64,
) -> Result<Option<KeyValue>, StoreError> {
    let last = versions
        .range::<(&[u8], i64)>((key, i64::MIN)..=(key, at))
        .map_err(inner.fail("read versions"))?
        .next_back();
    match last {
        None => Ok(None),
        Some(entry) => {
            let (k, record) = entry.map_err(inner.fail("read versions"))?;
            version_kv(inner, key, k.value().1, record.value())
        }
    }
}

/// The key's state just before `revision`.
fn version_before(
    inner: &Inner,
    versions: &VersionsTable,
    key: &[u8],
    revision: i64,
) -> Result<Option<KeyValue>, StoreError> {
    version_at(inner, versions, key, revision.saturating_sub(1))
}

/// The changes under `prefix` after `after`, covering at most `limit` revisions.
pub(super) fn changes_after(
    inner: &Inner,
    prefix: &[u8],
    after: i64,
    limit: usize,
) -> Result<Catchup, StoreError> {
    let (txn, meta) = begin(inner)?;
    if after < meta.compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted: Some(meta.compacted),
        });
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let through = meta.revision.min(after.saturating_add(limit)).max(after);
    let mut catchup = Catchup {
        events: Vec::new(),
        through,
        complete: through >= meta.revision,
    };
    if through == after {
        return Ok(catchup);
    }
    let changes = txn
        .open_table(CHANGES)
        .map_err(inner.fail("open changes"))?;
    let versions = txn
        .open_table(VERSIONS)
        .map_err(inner.fail("open versions"))?;
    let range = changes
        .range((after + 1)..=through)
        .map_err(inner.fail("read changes"))?;
    for entry in range {
        let (revision, key) = entry.map_err(inner.fail("read changes"))?;
        let key = key.value();
        if key.starts_with(prefix) {
            catchup
                .events
                .push(change_event(inner, &versions, key, revision.value())?);
        }
    }
    Ok(catchup)
}

/// The watch event of the change to `key` at `revision`.
fn change_event(
    inner: &Inner,
    versions: &VersionsTable,
    key: &[u8],
    revision: i64,
) -> Result<WatchEvent, StoreError> {
    let record = versions
        .get((key, revision))
        .map_err(inner.fail("read versions"))?
        .ok_or_else(|| {
            inner.corrupt(format!(
                "change {revision} of {} has no version",
                key_str(key)
            ))
        })?;
    let prev = version_before(inner, versions, key, revision)?;
    match version_kv(inner, key, revision, record.value())? {
        Some(kv) => Ok(WatchEvent::Put { kv, prev }),
        None => {
            let last = prev.ok_or_else(|| {
                inner.corrupt(format!(
                    "delete {revision} of {} follows no version",
                    key_str(key)
                ))
            })?;
            Ok(WatchEvent::Delete { last, revision })
        }
    }
}

fn current_kv(inner: &Inner, key: &[u8], record: &[u8]) -> Result<KeyValue, StoreError> {
    let c = codec::decode_current(record)
        .ok_or_else(|| inner.corrupt(format!("current record of {}", key_str(key))))?;
    Ok(KeyValue {
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(c.value),
        create_revision: c.create_revision,
        mod_revision: c.mod_revision,
    })
}

/// A put version as the key's state; `None` for a tombstone.
fn version_kv(
    inner: &Inner,
    key: &[u8],
    revision: i64,
    record: &[u8],
) -> Result<Option<KeyValue>, StoreError> {
    match codec::decode_version(record) {
        Some(Version::Put {
            create_revision,
            value,
        }) => Ok(Some(KeyValue {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            create_revision,
            mod_revision: revision,
        })),
        Some(Version::Tombstone) => Ok(None),
        None => Err(inner.corrupt(format!("version {revision} of {}", key_str(key)))),
    }
}

pub(super) fn verify(inner: &Inner) -> Result<(), StoreError> {
    let (txn, meta) = begin(inner)?;
    if meta.compacted > meta.revision {
        return Err(inner.corrupt(format!(
            "compacted through {} beyond revision {}",
            meta.compacted, meta.revision
        )));
    }
    let changes = txn
        .open_table(CHANGES)
        .map_err(inner.fail("open changes"))?;
    let versions = txn
        .open_table(VERSIONS)
        .map_err(inner.fail("open versions"))?;
    let mut want = meta.compacted.max(INITIAL_REVISION) + 1;
    for entry in changes.range::<i64>(..).map_err(inner.fail("verify"))? {
        let (revision, key) = entry.map_err(inner.fail("verify"))?;
        if revision.value() != want {
            return Err(inner.corrupt(format!(
                "change log has revision {} where {want} belongs",
                revision.value()
            )));
        }
        change_event(inner, &versions, key.value(), want)?;
        want += 1;
    }
    if want != meta.revision + 1 {
        return Err(inner.corrupt(format!(
            "change log ends at {} but the revision is {}",
            want - 1,
            meta.revision
        )));
    }
    let current = txn
        .open_table(CURRENT)
        .map_err(inner.fail("open current"))?;
    for entry in current.range::<&[u8]>(..).map_err(inner.fail("verify"))? {
        let (key, record) = entry.map_err(inner.fail("verify"))?;
        let kv = current_kv(inner, key.value(), record.value())?;
        if version_at(inner, &versions, key.value(), meta.revision)? != Some(kv) {
            return Err(inner.corrupt(format!(
                "current state of {} differs from its latest version",
                key_str(key.value())
            )));
        }
    }
    Ok(())
}
