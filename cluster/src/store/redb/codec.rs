//! Record layouts of the redb store's tables. Pure: bytes in, bytes out, no storage access.
//!
//! Integers are little-endian i64. A `current` record is `create_revision, mod_revision, value`;
//! a `versions` record is a tag byte (0 put, 1 tombstone) and, for a put, `create_revision,
//! value`. The layouts are part of the file format: change them only with a migration.

/// Tag of a put in a `versions` record.
const PUT: u8 = 0;
/// Tag of a tombstone (a delete) in a `versions` record.
const TOMBSTONE: u8 = 1;

/// A key's current state as stored in the `current` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Current<'a> {
    pub(super) create_revision: i64,
    pub(super) mod_revision: i64,
    pub(super) value: &'a [u8],
}

pub(super) fn encode_current(create_revision: i64, mod_revision: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// `None` when the record is too short to be one.
pub(super) fn decode_current(record: &[u8]) -> Option<Current<'_>> {
    let (create, rest) = split_i64(record)?;
    let (modified, value) = split_i64(rest)?;
    Some(Current {
        create_revision: create,
        mod_revision: modified,
        value,
    })
}

/// One version of a key as stored in the `versions` table (its revision is in the table key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version<'a> {
    Put {
        create_revision: i64,
        value: &'a [u8],
    },
    Tombstone,
}

pub(super) fn encode_put(create_revision: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + value.len());
    out.push(PUT);
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub(super) fn encode_tombstone() -> [u8; 1] {
    [TOMBSTONE]
}

/// `None` when the record is not a version record.
pub(super) fn decode_version(record: &[u8]) -> Option<Version<'_>> {
    match record.split_first()? {
        (&PUT, rest) => {
            let (create, value) = split_i64(rest)?;
            Some(Version::Put {
                create_revision: create,
                value,
            })
        }
        (&TOMBSTONE, []) => Some(Version::Tombstone),
        _ => None,
    }
}

fn split_i64(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    Some((i64::from_le_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_round_trips() {
        let rec = encode_current(3, 9, b"value");
        assert_eq!(
            decode_current(&rec),
            Some(Current {
                create_revision: 3,
                mod_revision: 9,
                value: b"value"
            })
        );
        assert_eq!(
            decode_current(&encode_current(1, 2, b"")).map(|c| c.value),
            Some(&b""[..])
        );
        assert_eq!(decode_current(&rec[..15]), None);
    }

    #[test]
    fn versions_round_trip() {
        assert_eq!(
            decode_version(&encode_put(4, b"x")),
            Some(Version::Put {
                create_revision: 4,
                value: b"x"
            })
        );
        assert_eq!(
            decode_version(&encode_tombstone()),
            Some(Version::Tombstone)
        );
        assert_eq!(decode_version(&[]), None);
        assert_eq!(decode_version(&[PUT, 1, 2]), None);
        assert_eq!(decode_version(&[TOMBSTONE, 0]), None);
        assert_eq!(decode_version(&[7]), None);
    }
}
