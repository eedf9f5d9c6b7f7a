//! Layer snapshots: each layer unpacked once into `<root>/images/snapshots/<diffID hex>`, in
//! overlayfs form (whiteouts as 0/0 char devices, opaque dirs as `trusted.overlay.opaque`), so a
//! container rootfs is an overlay whose lowerdirs are its image's snapshots, top layer first.
//!
//! Snapshots are keyed by diffID (the uncompressed layer digest) rather than by chain: a layer in
//! overlay form does not depend on its parents, so two images sharing a layer share its
//! snapshot whatever sits below it. A snapshot is built in `.tmp-<hex>` under the layer's lock
//! and renamed into place only when complete; a killed unpack leaves only a `.tmp-` directory,
//! which the next holder of the lock (or `prune`) removes.

use std::path::{Path, PathBuf};

use super::{ImageError, reference::check_digest};
use crate::fsutil::{self, FileLock, FsError};

#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
    locks: PathBuf,
}

impl Snapshots {
    pub fn open(root: &Path, locks: &Path) -> Result<Self, FsError> {
        fsutil::mkdir_all(root)?;
        fsutil::mkdir_all(locks)?;
        Ok(Snapshots {
            root: root.to_owned(),
            locks: locks.to_owned(),
        })
    }

    /// The committed snapshot directory of a layer (which may not exist yet).
    pub fn path(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join(check_digest(diff_id)?))
    }

    pub fn exists(&self, diff_id: &str) -> bool {
        self.path(diff_id).map(|p| p.is_dir()).unwrap_or(false)
    }

    /// Serializes unpacking of one layer across threads and processes.
    pub fn lock(&self, diff_id: &str) -> Result<FileLock, ImageError> {
        let hex = check_digest(diff_id)?;
        Ok(FileLock::acquire(&self.locks.join(format!("{hex}.lock")))?)
    }

    /// A fresh, empty work directory for `diff_id`. The caller must hold [`Self::lock`]; any
    /// leftover of an earlier killed attempt is removed first.
    pub fn prepare(&self, diff_id: &str) -> Result<TmpSnapshot, ImageError> {
        let hex = check_digest(diff_id)?;
        let tmp = self.root.join(format!(".tmp-{hex}"));
        fsutil::remove_dir_all_if_exists(&tmp)?;
        std::fs::create_dir(&tmp).map_err(|e| FsError::new("create snapshot", &tmp, e))?;
        Ok(TmpSnapshot {
            tmp: Some(tmp),
            target: self.root.join(hex),
        })
    }

    /// Every committed snapshot's diffID.
    pub fn list(&self) -> Vec<String> {
        super::reference::digests_in(&self.root)
    }

    /// Removes a committed snapshot. The caller makes sure no container uses it.
    pub fn remove(&self, diff_id: &str) -> Result<(), ImageError> {
        let _lock = self.lock(diff_id)?;
        self.remove_locked(diff_id)
    }

    /// [`Self::remove`] for a caller that already holds the layer's lock (GC, which must not
    /// wait for a layer lock while it holds the metadata lock a pull is waiting for).
    pub fn remove_locked(&self, diff_id: &str) -> Result<(), ImageError> {
        let target = self.path(diff_id)?;
        // Rename first so a crash mid-removal never leaves a half-deleted snapshot that looks
        // committed.
        let doomed = self.root.join(format!(".rm-{}", check_digest(diff_id)?));
        match std::fs::rename(&target, &doomed) {
            Ok(()) => Ok(fsutil::remove_dir_all_if_exists(&doomed)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FsError::new("remove snapshot", &target, e).into()),
        }
    }

    /// Removes work and removal directories left by killed processes (lock not held).
    pub fn clean_tmp(&self) -> Result<usize, ImageError> {
        let mut removed = 0;
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name
                .strip_prefix(".tmp-")
                .or_else(|| name.strip_prefix(".rm-"))
            else {
                continue;
            };
            let lock = self.locks.join(format!("{hex}.lock"));
            if let Some(_held) = FileLock::try_acquire(&lock)? {
                fsutil::remove_dir_all_if_exists(&e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A snapshot being unpacked. Dropped without [`TmpSnapshot::commit`], it is removed.
#[derive(Debug)]
pub struct TmpSnapshot {
    tmp: Option<PathBuf>,
    target: PathBuf,
}

impl TmpSnapshot {
    pub fn dir(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.target)
    }

    /// Renames the finished snapshot into place.
    pub fn commit(mut self) -> Result<PathBuf, ImageError> {
        if let Some(tmp) = self.tmp.take()
            && let Err(e) = std::fs::rename(&tmp, &self.target)
        {
            let _ = fsutil::remove_dir_all_if_exists(&tmp);
            return Err(FsError::new("commit snapshot", &self.target, e).into());
        }
        Ok(self.target.clone())
    }
}

impl Drop for TmpSnapshot {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fsutil::remove_dir_all_if_exists(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn uncommitted_snapshots_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(&dir.path().join("s"), &dir.path().join("l")).unwrap();
        {
            let _l = s.lock(&d('a')).unwrap();
            let t = s.prepare(&d('a')).unwrap();
            std::fs::write(t.dir().join("f"), b"x").unwrap();
        }
        assert!(!s.exists(&d('a')));
        assert!(s.list().is_empty());

        let t = s.prepare(&d('b')).unwrap();
        std::fs::write(t.dir().join("f"), b"x").unwrap();
        let p = t.commit().unwrap();
        assert!(p.join("f").exists());
        assert_eq!(s.list(), vec![d('b')]);
        s.remove(&d('b')).unwrap();
        assert!(!s.exists(&d('b')));
    }

    #[test]
    fn leftovers_of_killed_unpacks_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(&dir.path().join("s"), &dir.path().join("l")).unwrap();
        let t = s.prepare(&d('c')).unwrap();
        std::mem::forget(t); // as if killed
        assert_eq!(s.clean_tmp().unwrap(), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("s")).unwrap().count(), 0);
    }
}
