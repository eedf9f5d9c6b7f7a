//! Image records: which images the node has, under which names, made of which blobs.
//!
//! One JSON file per image (`<root>/images/meta/<config hex>.json`, written atomically), and one
//! lock file serializing every change across processes. A tag names exactly one image: recording
//! a tag on an image takes it off whichever image held it before (as `docker pull` moves
//! `latest`). Records are the roots of garbage collection: a blob or snapshot no record names is
//! garbage.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ImageError, reference};
use crate::fsutil::{self, FileLock, FsError, IoContext};

/// One layer of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as stored (compressed, usually).
    pub digest: String,
    /// Digest of the uncompressed tar: the snapshot's key.
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
}

/// An image the node has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image id: the digest of its config blob.
    pub id: String,
    /// Normalized `registry/repository:tag` names.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:...` names of the manifests this image was pulled by.
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// The index (manifest list) digest when the reference resolved through one.
    pub index_digest: Option<String>,
    pub layers: Vec<LayerRecord>,
    /// Sum of the stored layer blob sizes (what CRI reports as the image size).
    pub size: u64,
    /// When the image arrived on this node (RFC 3339).
    pub added: String,
}

impl ImageRecord {
    /// Every blob digest this image needs kept.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        [self.id.as_str(), self.manifest_digest.as_str()]
            .into_iter()
            .chain(self.index_digest.as_deref())
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }

    /// `sha256:` stripped and cut to 12 characters, as `docker images` shows ids.
    pub fn short_id(&self) -> &str {
        let hex = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        &hex[..hex.len().min(12)]
    }
}

#[derive(Debug, Clone)]
pub struct MetaStore {
    dir: PathBuf,
    lock_path: PathBuf,
}

impl MetaStore {
    pub fn open(dir: &Path) -> Result<Self, FsError> {
        fsutil::mkdir_all(dir)?;
        Ok(MetaStore {
            dir: dir.to_owned(),
            lock_path: dir.join(".lock"),
        })
    }

    /// Serializes read-modify-write of records (and GC) across processes.
    pub fn lock(&self) -> Result<FileLock, ImageError> {
        Ok(FileLock::acquire(&self.lock_path)?)
    }

    fn path(&self, id: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .dir
            .join(format!("{}.json", reference::check_digest(id)?)))
    }

    /// All records. A record file that cannot be parsed is reported by name rather than
    /// silently skipped: it means the disk was tampered with.
    pub fn load_all(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).ctx("list images", &self.dir)?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let data = match std::fs::read(&p) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(FsError::new("read image record", &p, e).into()),
            };
            let rec: ImageRecord =
                serde_json::from_slice(&data).map_err(|e| ImageError::CorruptRecord {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
            out.push(rec);
        }
        out.sort_by(|a, b| {
            a.repo_tags
                .first()
                .cmp(&b.repo_tags.first())
                .then(a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// Writes `rec`, merging names with an existing record of the same id and moving its tags
    /// off other images. The caller holds [`Self::lock`].
    pub fn upsert(&self, mut rec: ImageRecord) -> Result<ImageRecord, ImageError> {
        let all = self.load_all()?;
        let mut unchanged = false;
        for mut other in all {
            if other.id == rec.id {
                merge_names(&mut rec.repo_tags, &other.repo_tags);
                merge_names(&mut rec.repo_digests, &other.repo_digests);
                rec.added = other.added.clone();
                // a re-pull that changes nothing writes (and fsyncs) nothing
                if same_names(&rec, &other)
                    && rec.manifest_digest == other.manifest_digest
                    && rec.index_digest == other.index_digest
                {
                    rec = other;
                    unchanged = true;
                }
                continue;
            }
            let before = other.repo_tags.len();
            other.repo_tags.retain(|t| !rec.repo_tags.contains(t));
            if other.repo_tags.len() != before {
                self.write(&other)?;
            }
        }
        if !unchanged {
            self.write(&rec)?;
        }
        Ok(rec)
    }

    pub fn write(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let p = self.path(&rec.id)?;
        let data = serde_json::to_vec_pretty(rec).map_err(|e| ImageError::CorruptRecord {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        Ok(fsutil::atomic_write(&p, &data)?)
    }

    pub fn delete(&self, id: &str) -> Result<(), ImageError> {
        Ok(fsutil::remove_file_if_exists(&self.path(id)?)?)
    }
}

fn same_names(a: &ImageRecord, b: &ImageRecord) -> bool {
    let set = |v: &[String]| v.iter().cloned().collect::<std::collections::BTreeSet<_>>();
    set(&a.repo_tags) == set(&b.repo_tags) && set(&a.repo_digests) == set(&b.repo_digests)
}

fn merge_names(into: &mut Vec<String>, from: &[String]) {
    for n in from {
        if !into.contains(n) {
            into.push(n.clone());
        }
    }
}

/// Finds the image a user's string names: a full id, an id prefix of at least 4 hex digits
/// (unambiguous), a tag (normalized: `busybox` = `docker.io/library/busybox:latest`) or a repo
/// digest.
pub fn resolve<'a>(
    records: &'a [ImageRecord],
    name: &str,
) -> Result<Option<&'a ImageRecord>, ImageError> {
    let name = name.trim();
    if let Some(r) = records.iter().find(|r| r.id == name) {
        return Ok(Some(r));
    }
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() >= 4 && hex.len() < 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let hits: Vec<_> = records
            .iter()
            .filter(|r| r.id.trim_start_matches("sha256:").starts_with(hex))
            .collect();
        match hits.len() {
            0 => {}
            1 => return Ok(Some(hits[0])),
            _ => {
                return Err(ImageError::Ambiguous {
                    name: name.to_owned(),
                    count: hits.len(),
                });
            }
        }
    }
    let Ok(parsed) = reference::parse(name) else {
        return Ok(None);
    };
    if let Some(tag) = reference::tag_name(&parsed)
        && let Some(r) = records.iter().find(|r| r.repo_tags.contains(&tag))
        && parsed.digest().is_none()
    {
        return Ok(Some(r));
    }
    if let Some(d) = parsed.digest() {
        let full = reference::digest_name(&parsed, d);
        return Ok(records
            .iter()
            .find(|r| r.repo_digests.contains(&full) || r.manifest_digest == d));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(c: char, tags: &[&str]) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{}", c.to_string().repeat(64)),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![],
            manifest_digest: format!("sha256:{}", "f".repeat(64)),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            layers: vec![],
            size: 0,
            added: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_tag_moves_to_the_newest_image() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let tag = "docker.io/library/busybox:latest";
        m.upsert(rec('a', &[tag, "docker.io/library/busybox:1"]))
            .unwrap();
        m.upsert(rec('b', &[tag])).unwrap();
        let all = m.load_all().unwrap();
        let a = all.iter().find(|r| r.id.contains("aaaa")).unwrap();
        assert_eq!(a.repo_tags, vec!["docker.io/library/busybox:1"]);
        assert_eq!(
            resolve(&all, "busybox").unwrap().unwrap().id,
            rec('b', &[]).id
        );
        assert_eq!(
            resolve(&all, "busybox:1").unwrap().unwrap().id,
            rec('a', &[]).id
        );
    }

    #[test]
    fn names_resolve_by_id_prefix_and_refuse_ambiguity() {
        let mut a = rec('a', &[]);
        a.id = format!("sha256:ab{}", "0".repeat(62));
        let mut b = rec('b', &[]);
        b.id = format!("sha256:ac{}", "0".repeat(62));
        let all = vec![a.clone(), b];
        assert_eq!(resolve(&all, "ab00").unwrap().unwrap().id, a.id);
        assert!(resolve(&all, "a000").unwrap().is_none());
        let mut c = a.clone();
        c.id = format!("sha256:ab{}", "1".repeat(62));
        let all = vec![a, c];
        assert!(matches!(resolve(&all, "ab00"), Ok(Some(_))));
        assert!(resolve(&all, "abab").unwrap().is_none());
        assert!(resolve(&all, "sha256:ab").is_ok());
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join(format!("{}.json", "c".repeat(64))), b"{").unwrap();
        let e = m.load_all().unwrap_err().to_string();
        assert!(e.contains(&"c".repeat(64)), "{e}");
    }
}
