//! The content-addressed blob store: manifests, configs and compressed layers by digest.
//!
//! Layout under `<root>/images/content`: `blobs/sha256/<hex>` (committed, immutable, verified)
//! and `ingest/` (downloads in progress: `<hex>.partial`, written only by the holder of
//! `<locks>/<hex>.lock`). A blob becomes visible only by a rename after its digest was checked, so a killed
//! or failed download never leaves a blob that looks complete; the next writer, holding the lock,
//! truncates the stale partial file and starts over.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{ImageError, reference::check_digest};
use crate::fsutil::{self, FileLock, FsError, IoContext};

#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    locks: PathBuf,
}

impl ContentStore {
    pub fn open(root: &Path, locks: &Path) -> Result<Self, FsError> {
        let store = ContentStore {
            blobs: root.join("blobs/sha256"),
            ingest: root.join("ingest"),
            locks: locks.to_owned(),
        };
        fsutil::mkdir_all(&store.blobs)?;
        fsutil::mkdir_all(&store.ingest)?;
        fsutil::mkdir_all(&store.locks)?;
        Ok(store)
    }

    /// Where a committed blob lives.
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.blobs.join(check_digest(digest)?))
    }

    pub fn exists(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Size of a committed blob.
    pub fn size(&self, digest: &str) -> Result<u64, ImageError> {
        let p = self.path(digest)?;
        Ok(std::fs::metadata(&p).ctx("stat blob", &p)?.len())
    }

    /// Reads a (small) blob whole and checks its digest, so a blob corrupted on disk is never
    /// trusted as a manifest or config.
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.path(digest)?;
        let data = std::fs::read(&p).ctx("read blob", &p)?;
        verify(digest, &data, "blob on disk")?;
        Ok(data)
    }

    /// Stores a small blob already in memory after checking its digest.
    pub fn write(&self, digest: &str, data: &[u8]) -> Result<(), ImageError> {
        verify(digest, data, "blob")?;
        let p = self.path(digest)?;
        if !p.exists() {
            fsutil::atomic_write(&p, data)?;
        }
        Ok(())
    }

    /// Stores a small blob like [`Self::write`] but without fsync: the caller makes it durable
    /// (syncfs) before anything refers to it. Returns whether it wrote anything.
    pub fn write_unsynced(&self, digest: &str, data: &[u8]) -> Result<bool, ImageError> {
        verify(digest, data, "blob")?;
        let p = self.path(digest)?;
        if p.exists() {
            return Ok(false);
        }
        let tmp = self.ingest.join(format!(
            ".{}.tmp-{}",
            check_digest(digest)?,
            rand::random::<u32>()
        ));
        std::fs::write(&tmp, data).ctx("write blob", &tmp)?;
        if let Err(e) = std::fs::rename(&tmp, &p) {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::new("commit blob", &p, e).into());
        }
        Ok(true)
    }

    /// The lock serializing every writer of one digest, across threads and processes.
    pub fn lock(&self, digest: &str) -> Result<FileLock, ImageError> {
        let hex = check_digest(digest)?;
        Ok(FileLock::acquire(&self.lock_path(hex))?)
    }

    fn lock_path(&self, hex: &str) -> PathBuf {
        self.locks.join(format!("{hex}.lock"))
    }

    /// Takes the lock of `digest` if no pull holds it.
    pub fn try_lock(&self, digest: &str) -> Result<Option<FileLock>, ImageError> {
        let hex = check_digest(digest)?;
        Ok(FileLock::try_acquire(&self.lock_path(hex))?)
    }

    /// Starts (or restarts) writing `digest`. The caller must hold [`Self::lock`] for it.
    pub fn ingest(&self, digest: &str) -> Result<Ingest, ImageError> {
        let hex = check_digest(digest)?;
        let partial = self.ingest.join(format!("{hex}.partial"));
        let file = File::create(&partial).ctx("create ingest", &partial)?;
        Ok(Ingest {
            file: io::BufWriter::with_capacity(256 * 1024, file),
            partial,
            target: self.blobs.join(hex),
            expected: digest.to_owned(),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Every committed blob's digest.
    pub fn list(&self) -> Vec<String> {
        super::reference::digests_in(&self.blobs)
    }

    pub fn delete(&self, digest: &str) -> Result<(), ImageError> {
        Ok(fsutil::remove_file_if_exists(&self.path(digest)?)?)
    }

    /// Removes partial downloads nobody is writing (left by killed pulls).
    pub fn clean_ingest(&self) -> Result<usize, ImageError> {
        let mut removed = 0;
        let Ok(rd) = std::fs::read_dir(&self.ingest) else {
            return Ok(0);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".partial") else {
                // import work directories: `.import-<n>`, removed when their lock is free
                if let Some(n) = name.strip_prefix(".import-")
                    && let Some(_held) =
                        FileLock::try_acquire(&self.lock_path(&format!("import-{n}")))?
                {
                    fsutil::remove_dir_all_if_exists(&e.path())?;
                    removed += 1;
                }
                continue;
            };
            if let Some(_held) = FileLock::try_acquire(&self.lock_path(hex))? {
                fsutil::remove_file_if_exists(&e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// A private work directory for an import, removed by [`Self::clean_ingest`] if the
    /// importing process dies. Returns the directory and the lock that marks it in use.
    pub fn import_workdir(&self) -> Result<(PathBuf, FileLock), ImageError> {
        let n = format!("{:016x}", rand::random::<u64>());
        let lock = FileLock::acquire(&self.lock_path(&format!("import-{n}")))?;
        let dir = self.ingest.join(format!(".import-{n}"));
        fsutil::mkdir_all(&dir)?;
        Ok((dir, lock))
    }

    /// Moves a file already known to hash to `digest` into the store (same filesystem).
    pub fn adopt(&self, digest: &str, file: &Path) -> Result<(), ImageError> {
        let target = self.path(digest)?;
        std::fs::rename(file, &target).ctx("commit blob", &target)?;
        Ok(())
    }
}

/// Checks that `data` hashes to `digest`.
pub fn verify(digest: &str, data: &[u8], what: &str) -> Result<(), ImageError> {
    let actual = sha256_digest(data);
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A blob being written: hashes as it goes, becomes visible only through [`Ingest::commit`].
/// Dropped without commit, it removes its partial file.
pub struct Ingest {
    file: io::BufWriter<File>,
    partial: PathBuf,
    target: PathBuf,
    expected: String,
    hasher: Sha256,
    written: u64,
}

impl Ingest {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Checks the digest and renames the blob into place. The data is made durable by the
    /// caller's `syncfs` before the image that uses it is recorded.
    pub fn commit(mut self) -> Result<u64, ImageError> {
        self.file.flush().ctx("write blob", &self.partial)?;
        let actual = self.digest();
        if actual != self.expected {
            return Err(ImageError::DigestMismatch {
                what: "downloaded blob".to_owned(),
                expected: self.expected.clone(),
                actual,
            });
        }
        std::fs::rename(&self.partial, &self.target).ctx("commit blob", &self.target)?;
        Ok(self.written)
    }
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // After a successful commit the partial path no longer exists; otherwise discard it.
        let _ = std::fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_commits_only_matching_content() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(&dir.path().join("c"), &dir.path().join("l")).unwrap();
        let good = sha256_digest(b"hello");
        let _l = cs.lock(&good).unwrap();
        let mut w = cs.ingest(&good).unwrap();
        w.write_all(b"hel").unwrap();
        w.write_all(b"lo").unwrap();
        assert_eq!(w.commit().unwrap(), 5);
        assert_eq!(cs.read(&good).unwrap(), b"hello");

        let other = sha256_digest(b"other");
        let mut w = cs.ingest(&other).unwrap();
        w.write_all(b"tampered").unwrap();
        let err = w.commit().unwrap_err().to_string();
        assert!(err.contains("digest mismatch"), "{err}");
        assert!(!cs.exists(&other));
        assert_eq!(cs.list(), vec![good]);
    }

    #[test]
    fn stale_partials_are_cleaned_when_unlocked() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(&dir.path().join("c"), &dir.path().join("l")).unwrap();
        let d = sha256_digest(b"x");
        let lock = cs.lock(&d).unwrap();
        let mut w = cs.ingest(&d).unwrap();
        w.write_all(b"partial").unwrap();
        std::mem::forget(w); // as if the process died mid-download
        assert_eq!(
            cs.clean_ingest().unwrap(),
            0,
            "held lock protects the writer"
        );
        drop(lock);
        assert_eq!(cs.clean_ingest().unwrap(), 1);
    }

    #[test]
    fn corrupt_blob_on_disk_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(&dir.path().join("c"), &dir.path().join("l")).unwrap();
        let d = sha256_digest(b"config");
        cs.write(&d, b"config").unwrap();
        std::fs::write(cs.path(&d).unwrap(), b"evil").unwrap();
        assert!(cs.read(&d).is_err());
        assert!(cs.write(&d, b"not config").is_err());
    }
}
