//! Crash-safe file primitives shared by every on-disk store of the runtime.
//!
//! The rule (STYLE §6): state is written to a temp file in the same directory, fsynced, renamed
//! over the target, and the directory is fsynced, so a crash leaves either the old or the new
//! content, never a torn file. Also: exclusive advisory locks (flock) and disk usage walks.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An io error with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FsError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        FsError {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether the underlying error is "not found".
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// Shorthand for attaching an operation and a path to an io result.
pub trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|e| FsError::new(op, path, e))
    }
}

/// Writes `data` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<(), FsError> {
    let (dir, tmp) = temp_beside(path);
    let result = (|| {
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        std::fs::rename(&tmp, path).ctx("rename into place", path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `data` to `path` atomically but not durably (temp file, rename): readers see the old
/// content or the new, also after this process crashes, but a power loss may lose the write.
/// For files that matter only while processes of this boot live (a container's bundle).
pub fn replace_file(path: &Path, data: &[u8]) -> Result<(), FsError> {
    let (_, tmp) = temp_beside(path);
    let result = std::fs::write(&tmp, data)
        .ctx("write", &tmp)
        .and_then(|()| std::fs::rename(&tmp, path).ctx("rename into place", path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `path`'s directory and a fresh temp file name in it, for writing before a rename.
fn temp_beside(path: &Path) -> (&Path, PathBuf) {
    let dir = parent(path);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u32>()
    ));
    (dir, tmp)
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync dir", dir)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a directory and its parents.
pub fn mkdir_all(dir: &Path) -> Result<(), FsError> {
    std::fs::create_dir_all(dir).ctx("create dir", dir)
}

/// Removes a file, treating "already gone" as success.
pub fn remove_file_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FsError::new("remove", path, e)),
        _ => Ok(()),
    }
}

/// Removes a directory tree (never following symlinks), treating "already gone" as success.
pub fn remove_dir_all_if_exists(path: &Path) -> Result<(), FsError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FsError::new("remove tree", path, e)),
        _ => Ok(()),
    }
}

/// Asks the kernel to start writing a file range to disk now, without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Writers of large amounts of data call it as they
/// go so that a later fsync/syncfs finds most of the data already on disk: the disk then works
/// while the writer is still busy. Only a hint: errors (e.g. on filesystems that do not support
/// it) are ignored, durability still comes from the later sync.
pub fn start_writeback(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; an invalid fd or range makes it
    // return an error, never touch memory.
    let _ = unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// An exclusive flock held until drop. Serializes work between threads *and* processes (a CLI
/// pull beside the CRI daemon) on one key.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock at `path` is held. Call from a blocking context.
    pub fn acquire(path: &Path) -> Result<FileLock, FsError> {
        let file = open_lock_file(path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| FsError::new("lock", path, e.into()))?;
        Ok(FileLock { _file: file })
    }

    /// Takes the lock if nobody holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, FsError> {
        let file = open_lock_file(path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(FsError::new("lock", path, e.into())),
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, FsError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx("open lock", path)
}

/// Bytes (allocated blocks) and inodes used by a tree, not following symlinks, counting each
/// hardlinked inode once.
pub fn disk_usage(root: &Path) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        inodes += 1;
        bytes += md.blocks() * 512;
        if md.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        for write in [atomic_write, replace_file] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("state.json");
            write(&p, b"first version, long").unwrap();
            write(&p, b"second").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"second");
            // no temp files left beside it
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
            assert_eq!(names.len(), 1);
        }
    }

    #[test]
    fn try_lock_sees_a_held_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let held = FileLock::acquire(&p).unwrap();
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn usage_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 64 * 1024]).unwrap();
        let (one, _) = disk_usage(dir.path());
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        let (two, inodes) = disk_usage(dir.path());
        assert_eq!(one, two);
        assert_eq!(inodes, 2); // the dir and one file
    }
}
