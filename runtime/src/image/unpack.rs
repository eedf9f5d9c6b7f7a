//! Unpacks one uncompressed OCI layer tar into its own snapshot directory, converting OCI
//! whiteouts to overlayfs form (as containerd's overlay snapshotter does), so the directory can
//! serve as an overlayfs lowerdir as is.
//!
//! It owns only the directory it is given and must never create, modify, chmod, chown or truncate
//! anything outside it, whatever the tar holds. It does not decompress, verify digests or clean up
//! after a failure: the caller wraps the stream in [`super::compression`]'s readers and deletes the
//! half-made directory when this returns an error.
//!
//! # How containment is enforced
//!
//! The kernel does it, not string checks. `dest` is opened once as a directory fd; for every
//! entry the parent directory is resolved with `openat2(dest_fd, parent, O_PATH|O_DIRECTORY,
//! RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..` and symlinks (absolute or relative, from the
//! archive or not) resolve as if `dest` were `/` and cannot leave it. The last component is then
//! created relative to that parent fd with `*at` calls that never follow it (`O_CREAT|O_EXCL|
//! O_NOFOLLOW`, `mkdirat`, `symlinkat`, `mknodat`, `linkat` without `AT_SYMLINK_FOLLOW`), and
//! metadata is applied through the fd just created or with `AT_SYMLINK_NOFOLLOW`. An entry that
//! replaces an existing one unlinks it first (a directory is removed recursively without following
//! symlinks), so nothing is ever written through an existing file or symlink. Paths are also
//! cleaned lexically first (leading `/` dropped, `.` dropped, `..` popped but never above the root)
//! so errors and the hardlink bookkeeping see the same path the kernel resolves.
//!
//! # Hostile entries: contained or refused
//!
//! | entry | outcome |
//! |---|---|
//! | absolute path `/etc/x` | contained: `dest/etc/x` |
//! | `../x`, `a/../../x` | contained: cleaned lexically to `dest/x` |
//! | symlink `a -> /` or `a -> ../..`, then `a/x` | contained: `a` resolves to `dest`, so `dest/x` |
//! | symlink replacing a directory, then a file through it | contained: the directory is removed, the symlink made, and the file resolved in root as above |
//! | file replacing an existing file or symlink | contained: unlinked, then created `O_EXCL`; never written through |
//! | hardlink to `../x`, `/etc/passwd`, or through a symlink pointing outside | contained when the cleaned target exists inside `dest` (linked to that), otherwise refused: "hardlink target not found in the layer" |
//! | hardlink to a path that does not exist | refused |
//! | hardlink to a directory | refused (the kernel forbids it) |
//! | an entry that is the layer root itself (`./`, `/`, `..`) | ignored, as containerd does |
//! | path or link target with a NUL byte, whiteout of `.` or `..`, unknown entry type | refused |
//! | parent path through a dangling symlink or a non-directory | refused |
//!
//! A refused entry fails the whole unpack with an [`UnpackError`] naming the entry.
//!
//! # What is applied
//!
//! Regular files (also contiguous and GNU sparse ones, written out in full), directories,
//! symlinks, hardlinks and fifos, with mode (including setuid/setgid/sticky), numeric uid/gid,
//! atime/mtime (PAX sub-second times when present; directory times are set after all entries,
//! since creating children changes them). Character and block devices are skipped (counted and
//! logged), as are hardlinks to them. Hardlink entries carry no metadata of their own: the inode
//! already got it from the entry it links to.
//!
//! Extended attributes from PAX `SCHILY.xattr.*` records are applied to regular files and
//! directories only when named `user.*` or `security.capability` (file capabilities, which images
//! such as ping need). Everything else is dropped with a debug log: `trusted.overlay.*` from the
//! archive could steer overlayfs (opaque, redirect, metacopy) across layers, other `trusted.*`
//! and `security.*` names are host policy labels (SELinux, IMA/EVM) the image must not set, and
//! `system.*` ACLs are rare in images and would mix inherited default ACLs into files created
//! below. `user.*` xattrs cannot be set on symlinks or fifos, and capabilities only mean
//! something on regular files, so other entry types get none. `trusted.overlay.opaque` is
//! written only by whiteout conversion.
//!
//! Written by hand because no maintained crate extracts tars through `openat2`: the `tar` crate's
//! own `unpack_in` resolves paths in user space.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
    XattrFlags,
};
use rustix::io::Errno;
use tar::EntryType;

use crate::fsutil;

/// Copy buffer for file contents: big writes keep the syscall count per MiB low.
const COPY_BUF: usize = 256 * 1024;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// `.wh..wh.` names are AUFS bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`), except the opaque marker.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// How OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`) are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// overlayfs form: a 0/0 character device per removed name, `trusted.overlay.opaque=y` on
    /// opaque directories. The `.wh.` files themselves are not written.
    #[default]
    Overlay,
}

/// Knobs of [`unpack_layer`]; `UnpackOptions::default()` is what the image store uses.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UnpackOptions {
    pub whiteouts: WhiteoutMode,
}

/// What one unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries read (after GNU long-name and PAX headers were folded into their entry).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub regular_bytes: u64,
    /// Character/block devices (and hardlinks to them) not created.
    pub skipped_devices: u64,
    /// Whiteouts converted to 0/0 character devices.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
}

/// Errors of [`unpack_layer`]. Entry paths are the archive's, lossily decoded.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The destination directory could not be opened.
    #[error("open layer destination {dest}: {source}")]
    Dest {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The tar stream itself is unreadable: bad header, truncated, decompression failed.
    #[error("read layer tar stream after {entries} entries: {source}")]
    Archive {
        entries: u64,
        #[source]
        source: io::Error,
    },
    /// A syscall on behalf of an entry failed.
    #[error("layer entry {path:?}: {op}: {source}")]
    Entry {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// An entry was refused: it is hostile, malformed or unsupported.
    #[error("layer entry {path:?}: refused: {reason}")]
    Refused { path: String, reason: String },
    /// The stream ended inside a file's content.
    #[error("layer entry {path:?}: truncated: {got} of {want} bytes")]
    Truncated { path: String, got: u64, want: u64 },
}

/// Unpacks the uncompressed layer tar `tar` into `dest`, an existing empty directory, and reads
/// `tar` to its end so a hashing reader around it has seen every byte. Blocking: call it from a
/// blocking thread. Must run as root (chown, mknod, trusted xattrs).
/// Written file data is handed to the disk every this many bytes (see
/// [`fsutil::start_writeback`]), so the final syncfs of a pull has little left to wait for.
const WRITEBACK_CHUNK: u64 = 4 * 1024 * 1024;

pub fn unpack_layer<R: Read>(
    tar: R,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let root = rfs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Dest {
        dest: dest.to_owned(),
        source: e.into(),
    })?;
    let mut u = Unpacker {
        root,
        opts,
        stats: UnpackStats::default(),
        parent: None,
        parent_stale: false,
        dir_times: Vec::new(),
        skipped: HashSet::new(),
        buf: vec![0; COPY_BUF],
    };
    let mut archive = tar::Archive::new(tar);
    let archive_err = |entries: u64| move |source| UnpackError::Archive { entries, source };
    for entry in archive.entries().map_err(archive_err(0))? {
        let mut entry = entry.map_err(archive_err(u.stats.entries))?;
        u.stats.entries += 1;
        u.entry(&mut entry)?;
    }
    u.apply_dir_times()?;
    let mut rest = archive.into_inner();
    loop {
        match rest.read(&mut u.buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(archive_err(u.stats.entries)(e)),
        }
    }
    Ok(u.stats)
}

struct Unpacker<'o> {
    root: OwnedFd,
    opts: &'o UnpackOptions,
    stats: UnpackStats,
    /// The last parent directory resolved (cleaned relative path, O_PATH fd): tars list a
    /// directory's files together, so most entries reuse it.
    parent: Option<(Vec<u8>, OwnedFd)>,
    /// Set when something was removed, which may have changed what a cached path resolves to.
    parent_stale: bool,
    /// Directory times to apply once all entries are written.
    dir_times: Vec<(Vec<u8>, Times)>,
    /// Cleaned paths of skipped device nodes, so hardlinks to them are skipped too.
    skipped: HashSet<Vec<u8>>,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Times {
    atime: Timespec,
    mtime: Timespec,
}

impl Times {
    fn get(self) -> Timestamps {
        Timestamps {
            last_access: self.atime,
            last_modification: self.mtime,
        }
    }
}

/// An entry's metadata, read from its header and PAX records.
struct Meta {
    mode: Mode,
    uid: Uid,
    gid: Gid,
    times: Times,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let mut kind = entry.header().entry_type();
        // Old tars mark directories as regular files ('\0' type) with a trailing slash.
        if entry.header().as_old().linkflag[0] == 0 && raw.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        if raw.contains(&0) || entry.link_name_bytes().is_some_and(|l| l.contains(&0)) {
            return Err(refused(&raw, "NUL byte in path or link target".into()));
        }
        let rel = clean_path(&raw);
        let Some((parent, name)) = split_parent(&rel) else {
            tracing::debug!(path = %lossy(&raw), "layer entry resolves to the layer root: ignored");
            return Ok(());
        };
        if self.opts.whiteouts == WhiteoutMode::Overlay && name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(entry, &raw, parent, name);
        }
        match kind {
            EntryType::Char | EntryType::Block => {
                tracing::debug!(path = %lossy(&raw), "skipping device node in layer");
                self.stats.skipped_devices += 1;
                self.skipped.insert(rel);
                return Ok(());
            }
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo => {}
            other => {
                return Err(refused(
                    &raw,
                    format!("unsupported entry type {:?}", other.as_byte() as char),
                ));
            }
        }
        if kind == EntryType::Link {
            // No parent fd yet: a hardlink to a skipped device is skipped without creating dirs.
            return self.hardlink(entry, &raw, &rel, parent, name);
        }
        let meta = read_meta(entry, &raw)?;
        let pfd = self.parent_fd(parent, &raw)?;
        let res = match kind {
            EntryType::Directory => self.directory(pfd.as_fd(), name, &raw, &rel, meta),
            EntryType::Symlink => self.symlink(entry, pfd.as_fd(), name, &raw, meta),
            EntryType::Fifo => self.fifo(pfd.as_fd(), name, &raw, meta),
            _ => self.regular(entry, pfd.as_fd(), name, &raw, meta),
        };
        self.keep_parent(parent, pfd);
        res
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
        meta: Meta,
    ) -> Result<(), UnpackError> {
        let create = || {
            rfs::openat(
                pfd,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        };
        let fd = self.create_replacing(pfd, name, raw, "create file", create)?;
        let mut file = File::from(fd);
        let want = entry.size();
        let mut got = 0u64;
        let mut flushed = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(entry_err(raw, "read content", e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| entry_err(raw, "write content", e))?;
            got += n as u64;
            if got - flushed >= WRITEBACK_CHUNK {
                fsutil::start_writeback(file.as_fd(), flushed, got - flushed);
                flushed = got;
            }
        }
        if got > flushed {
            fsutil::start_writeback(file.as_fd(), flushed, got - flushed);
        }
        if got != want {
            return Err(UnpackError::Truncated {
                path: lossy(raw),
                got,
                want,
            });
        }
        self.stats.regular_bytes += got;
        // chown clears setuid/setgid and capabilities, writes clear capabilities: chown, then
        // chmod, then xattrs, then times (which xattrs and chmod leave alone).
        apply_owner_mode_xattrs(file.as_fd(), raw, &meta)?;
        rfs::futimens(&file, &meta.times.get()).map_err(|e| entry_err(raw, "set times", e))
    }

    fn directory(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
        rel: &[u8],
        meta: Meta,
    ) -> Result<(), UnpackError> {
        match rfs::mkdirat(pfd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            // A directory met twice (or made earlier as a missing parent) is kept, with its
            // content; anything else in the way is replaced.
            Err(Errno::EXIST) if is_dir_at(pfd, name) => {}
            Err(Errno::EXIST) => {
                self.remove_existing(pfd, name, raw)?;
                rfs::mkdirat(pfd, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| entry_err(raw, "create directory", e))?;
            }
            Err(e) => return Err(entry_err(raw, "create directory", e)),
        }
        let dfd = open_dir(pfd, name).map_err(|e| entry_err(raw, "open directory", e))?;
        apply_owner_mode_xattrs(dfd.as_fd(), raw, &meta)?;
        self.dir_times.push((rel.to_vec(), meta.times));
        Ok(())
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
        meta: Meta,
    ) -> Result<(), UnpackError> {
        // The target is stored verbatim: it is only ever followed inside the container's root
        // (and here, by openat2 in root), so where it points is not ours to police.
        let target = match entry.link_name_bytes() {
            Some(t) if !t.is_empty() => t.into_owned(),
            _ => return Err(refused(raw, "symlink without a target".into())),
        };
        let create = || rfs::symlinkat(target.as_slice(), pfd, name);
        self.create_replacing(pfd, name, raw, "create symlink", create)?;
        rfs::chownat(
            pfd,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| entry_err(raw, "chown", e))?;
        rfs::utimensat(pfd, name, &meta.times.get(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| entry_err(raw, "set times", e))
    }

    fn fifo(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
        meta: Meta,
    ) -> Result<(), UnpackError> {
        let create = || rfs::mknodat(pfd, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0);
        self.create_replacing(pfd, name, raw, "create fifo", create)?;
        // A non-blocking read-only open of a fifo returns at once, and gives an fd to fchown/fchmod.
        let fd = rfs::openat(
            pfd,
            name,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_err(raw, "open fifo", e))?;
        let meta = Meta {
            xattrs: Vec::new(),
            ..meta
        };
        apply_owner_mode_xattrs(fd.as_fd(), raw, &meta)?;
        rfs::futimens(&fd, &meta.times.get()).map_err(|e| entry_err(raw, "set times", e))
    }

    fn hardlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
        rel: &[u8],
        parent: &[u8],
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let target_raw = match entry.link_name_bytes() {
            Some(t) if !t.is_empty() => t.into_owned(),
            _ => return Err(refused(raw, "hardlink without a target".into())),
        };
        let target = clean_path(&target_raw);
        if self.skipped.contains(&target) {
            tracing::debug!(path = %lossy(raw), "skipping hardlink to a skipped device node");
            self.stats.skipped_devices += 1;
            self.skipped.insert(rel.to_vec());
            return Ok(());
        }
        if target == rel {
            tracing::debug!(path = %lossy(raw), "hardlink to itself: ignored");
            return Ok(());
        }
        let Some((tparent, tname)) = split_parent(&target) else {
            return Err(refused(raw, "hardlink to the layer root".into()));
        };
        let pfd = self.parent_fd(parent, raw)?;
        let not_found = || {
            refused(
                raw,
                format!(
                    "hardlink target {:?} not found in the layer",
                    lossy(&target_raw)
                ),
            )
        };
        // The target's directory resolves in root like any parent; its last component is not
        // followed by linkat (no AT_SYMLINK_FOLLOW), so a hardlink to a symlink links the symlink.
        let tfd = if tparent == parent {
            None
        } else {
            match resolve_dir(self.root.as_fd(), tparent) {
                Ok(fd) => Some(fd),
                Err(Errno::NOENT | Errno::NOTDIR) => return Err(not_found()),
                Err(e) => return Err(entry_err(raw, "resolve hardlink target directory", e)),
            }
        };
        let tdir = tfd.as_ref().map_or(pfd.as_fd(), |fd| fd.as_fd());
        let res = match rfs::linkat(tdir, tname, pfd.as_fd(), name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(not_found()),
            Err(Errno::EXIST) => self.remove_existing(pfd.as_fd(), name, raw).and_then(|()| {
                match rfs::linkat(tdir, tname, pfd.as_fd(), name, AtFlags::empty()) {
                    Err(Errno::NOENT) => Err(not_found()),
                    r => r.map_err(|e| entry_err(raw, "create hardlink", e)),
                }
            }),
            Err(e) => Err(entry_err(raw, "create hardlink", e)),
        };
        drop(tfd);
        self.keep_parent(parent, pfd);
        res
    }

    fn whiteout<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
        parent: &[u8],
        name: &[u8],
    ) -> Result<(), UnpackError> {
        if name == WHITEOUT_OPAQUE {
            let pfd = self.parent_fd(parent, raw)?;
            // O_PATH fds cannot carry xattr calls: open the directory itself.
            let res = open_dir(pfd.as_fd(), b".")
                .and_then(|dfd| {
                    rfs::fsetxattr(&dfd, OVERLAY_OPAQUE_XATTR, b"y", XattrFlags::empty())
                })
                .map_err(|e| entry_err(raw, "mark directory opaque", e));
            self.keep_parent(parent, pfd);
            self.stats.opaque_dirs += u64::from(res.is_ok());
            return res;
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            tracing::debug!(path = %lossy(raw), "ignoring AUFS metadata entry");
            return Ok(());
        }
        let removed = &name[WHITEOUT_PREFIX.len()..];
        if removed.is_empty() || removed == b"." || removed == b".." {
            return Err(refused(raw, "whiteout names no file".into()));
        }
        let uid = id(entry.header().uid(), raw, "uid")?;
        let gid = id(entry.header().gid(), raw, "gid")?;
        let pfd = self.parent_fd(parent, raw)?;
        let res = (|| {
            let create = || {
                rfs::mknodat(
                    pfd.as_fd(),
                    removed,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    0,
                )
            };
            self.create_replacing(pfd.as_fd(), removed, raw, "create whiteout device", create)?;
            rfs::chownat(
                pfd.as_fd(),
                removed,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| entry_err(raw, "chown whiteout device", e))
        })();
        self.keep_parent(parent, pfd);
        self.stats.whiteouts += u64::from(res.is_ok());
        res
    }

    /// Runs `create` (an `O_EXCL`-style creation of `name` in `pfd`); if something is already
    /// there, removes it and runs `create` once more.
    fn create_replacing<T>(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
        op: &'static str,
        create: impl Fn() -> rustix::io::Result<T>,
    ) -> Result<T, UnpackError> {
        match create() {
            Err(Errno::EXIST) => {
                self.remove_existing(pfd, name, raw)?;
                create().map_err(|e| entry_err(raw, op, e))
            }
            r => r.map_err(|e| entry_err(raw, op, e)),
        }
    }

    fn remove_existing(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        raw: &[u8],
    ) -> Result<(), UnpackError> {
        self.parent_stale = true;
        let res = if is_dir_at(pfd, name) {
            remove_tree(pfd, name)
        } else {
            rfs::unlinkat(pfd, name, AtFlags::empty())
        };
        res.map_err(|e| entry_err(raw, "remove existing entry", e))
    }

    /// The O_PATH fd of the directory `parent` (cleaned, relative to dest), created with its
    /// missing ancestors (root-owned, 0755) as containerd does.
    fn parent_fd(&mut self, parent: &[u8], raw: &[u8]) -> Result<OwnedFd, UnpackError> {
        if let Some((cached, fd)) = self.parent.take()
            && cached == parent
        {
            return Ok(fd);
        }
        if parent.is_empty() {
            return self
                .root
                .try_clone()
                .map_err(|e| entry_err(raw, "duplicate layer root fd", e));
        }
        match resolve_dir(self.root.as_fd(), parent) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOENT) => self.make_parents(parent, raw),
            Err(Errno::NOTDIR) => Err(refused(
                raw,
                "a parent path component is not a directory".into(),
            )),
            Err(e) => Err(entry_err(raw, "resolve parent directory", e)),
        }
    }

    fn make_parents(&mut self, parent: &[u8], raw: &[u8]) -> Result<OwnedFd, UnpackError> {
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| entry_err(raw, "duplicate layer root fd", e))?;
        let mut end = 0;
        for comp in parent.split(|&b| b == b'/') {
            end += comp.len();
            let prefix = &parent[..end];
            end += 1;
            cur = match resolve_dir(self.root.as_fd(), prefix) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => match rfs::mkdirat(&cur, comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {
                        // Explicit chmod: the process umask must not shape the snapshot.
                        let fd = open_dir(cur.as_fd(), comp)
                            .map_err(|e| entry_err(raw, "open created parent directory", e))?;
                        rfs::fchmod(&fd, Mode::from_raw_mode(0o755))
                            .map_err(|e| entry_err(raw, "chmod created parent directory", e))?;
                        fd
                    }
                    // Something is there yet does not resolve: a dangling symlink.
                    Err(Errno::EXIST) => {
                        return Err(refused(
                            raw,
                            format!("parent {:?} is a dangling symlink", lossy(prefix)),
                        ));
                    }
                    Err(e) => return Err(entry_err(raw, "create parent directory", e)),
                },
                Err(Errno::NOTDIR) => {
                    return Err(refused(
                        raw,
                        format!("parent {:?} is not a directory", lossy(prefix)),
                    ));
                }
                Err(e) => return Err(entry_err(raw, "resolve parent directory", e)),
            };
        }
        Ok(cur)
    }

    fn keep_parent(&mut self, parent: &[u8], fd: OwnedFd) {
        if !std::mem::take(&mut self.parent_stale) {
            self.parent = Some((parent.to_vec(), fd));
        }
    }

    /// Sets directory times last, since every entry created in a directory bumps its mtime.
    fn apply_dir_times(&mut self) -> Result<(), UnpackError> {
        self.parent = None;
        let mut cached: Option<(&[u8], OwnedFd)> = None;
        for (rel, times) in &self.dir_times {
            let Some((parent, name)) = split_parent(rel) else {
                continue;
            };
            let pfd = match cached.take() {
                Some((p, fd)) if p == parent => fd,
                _ if parent.is_empty() => self
                    .root
                    .try_clone()
                    .map_err(|e| entry_err(rel, "duplicate layer root fd", e))?,
                _ => match resolve_dir(self.root.as_fd(), parent) {
                    Ok(fd) => fd,
                    // Replaced by a later entry: nothing left to date.
                    Err(Errno::NOENT | Errno::NOTDIR) => continue,
                    Err(e) => return Err(entry_err(rel, "resolve directory", e)),
                },
            };
            match rfs::utimensat(&pfd, name, &times.get(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(entry_err(rel, "set directory times", e)),
            }
            cached = Some((parent, pfd));
        }
        Ok(())
    }
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Meta, UnpackError> {
    let h = entry.header();
    let mode = h.mode().map_err(|e| entry_err(raw, "parse mode", e))? & 0o7777;
    // The tar crate already folded PAX uid/gid records into the header.
    let uid = id(h.uid(), raw, "uid")?;
    let gid = id(h.gid(), raw, "gid")?;
    let mtime_secs = h.mtime().map_err(|e| entry_err(raw, "parse mtime", e))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(mtime_secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut atime = h
        .as_gnu()
        .and_then(|g| g.atime().ok())
        .filter(|&t| t != 0)
        .map(|t| Timespec {
            tv_sec: i64::try_from(t).unwrap_or(i64::MAX),
            tv_nsec: 0,
        });
    let mut xattrs = Vec::new();
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| entry_err(raw, "read PAX records", e))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| entry_err(raw, "parse PAX records", e))?;
            match ext.key_bytes() {
                b"mtime" => mtime = parse_pax_time(ext.value_bytes()).unwrap_or(mtime),
                b"atime" => atime = parse_pax_time(ext.value_bytes()).or(atime),
                key => {
                    if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                        if xattr_allowed(name) {
                            xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                        } else {
                            tracing::debug!(path = %lossy(raw), xattr = %lossy(name),
                                "dropping xattr not allowed from a layer");
                        }
                    }
                }
            }
        }
    }
    // As containerd: atime is never before mtime.
    let atime = atime.map_or(mtime, |a| a.max(mtime));
    Ok(Meta {
        mode: Mode::from_raw_mode(mode),
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        times: Times { atime, mtime },
        xattrs,
    })
}

fn apply_owner_mode_xattrs(fd: BorrowedFd<'_>, raw: &[u8], meta: &Meta) -> Result<(), UnpackError> {
    rfs::fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(|e| entry_err(raw, "chown", e))?;
    rfs::fchmod(fd, meta.mode).map_err(|e| entry_err(raw, "chmod", e))?;
    for (name, value) in &meta.xattrs {
        match rfs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty()) {
            Ok(()) => {}
            // As containerd: a filesystem without xattr support is not a reason to fail the pull.
            Err(Errno::OPNOTSUPP) => {
                tracing::warn!(path = %lossy(raw), xattr = %lossy(name),
                    "filesystem does not support this xattr: ignored");
            }
            Err(e) => return Err(entry_err(raw, "set xattr", e)),
        }
    }
    Ok(())
}

/// Which xattr names a layer may set (see the module doc for why).
fn xattr_allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && name.len() > 5) || name == b"security.capability"
}

/// `openat2(root, rel, O_PATH|O_DIRECTORY, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS)`, retried
/// when the kernel reports a concurrent rename (EAGAIN) during `..` resolution.
fn resolve_dir(root: BorrowedFd<'_>, rel: &[u8]) -> rustix::io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match rfs::openat2(
            root,
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r,
        }
    }
}

/// Opens `name` in `dir` as a directory fd usable for fchown/fchmod/fsetxattr, never following a
/// symlink.
fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn is_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// Removes the directory `name` in `dir` and everything below it, never following symlinks.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
    let fd = open_dir(dir, name)?;
    let mut children = Vec::new();
    for ent in rfs::Dir::read_from(&fd)? {
        let ent = ent?;
        let child = ent.file_name().to_bytes();
        if child == b"." || child == b".." {
            continue;
        }
        let is_dir = match ent.file_type() {
            FileType::Directory => true,
            FileType::Unknown => is_dir_at(fd.as_fd(), child),
            _ => false,
        };
        children.push((child.to_vec(), is_dir));
    }
    for (child, is_dir) in children {
        if is_dir {
            remove_tree(fd.as_fd(), &child)?;
        } else {
            rfs::unlinkat(&fd, child.as_slice(), AtFlags::empty())?;
        }
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// The path relative to the layer root: `/` and `.` components dropped, `..` popping the previous
/// component but never climbing above the root. Empty means the root itself.
fn clean_path(raw: &[u8]) -> Vec<u8> {
    let mut comps: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                comps.pop();
            }
            c => comps.push(c),
        }
    }
    comps.join(&b'/')
}

/// Splits a cleaned path into (parent, last component); `None` for the root.
fn split_parent(rel: &[u8]) -> Option<(&[u8], &[u8])> {
    if rel.is_empty() {
        return None;
    }
    Some(match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&rel[..0], rel),
    })
}

/// A PAX time record: decimal seconds, optionally negative, with an optional fraction.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !neg {
        Timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        }
    } else if nsec == 0 {
        Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nsec,
        }
    })
}

/// A uid/gid as the kernel takes it; `-1` would mean "leave unchanged" to chown, so it is refused.
fn id(v: io::Result<u64>, raw: &[u8], what: &'static str) -> Result<u32, UnpackError> {
    let v = v.map_err(|e| entry_err(raw, what, e))?;
    match u32::try_from(v) {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => Err(refused(raw, format!("{what} {v} out of range"))),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn entry_err(raw: &[u8], op: &'static str, e: impl Into<io::Error>) -> UnpackError {
    UnpackError::Entry {
        path: lossy(raw),
        op,
        source: e.into(),
    }
}

fn refused(raw: &[u8], reason: String) -> UnpackError {
    UnpackError::Refused {
        path: lossy(raw),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_without_climbing_above_the_root() {
        let cases: [(&[u8], &[u8]); 12] = [
            (b"etc/passwd", b"etc/passwd"),
            (b"./etc/passwd", b"etc/passwd"),
            (b"/etc/passwd", b"etc/passwd"),
            (b"//etc//passwd/", b"etc/passwd"),
            (b"../escape", b"escape"),
            (b"a/../../escape", b"escape"),
            (b"a/b/../c", b"a/c"),
            (b"../../../../etc/shadow", b"etc/shadow"),
            (b"./", b""),
            (b"/", b""),
            (b"..", b""),
            (b"a/..", b""),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_path(raw), want, "{}", lossy(raw));
        }
    }

    #[test]
    fn split_parent_of_cleaned_paths() {
        assert_eq!(split_parent(b""), None);
        assert_eq!(split_parent(b"a"), Some((&b""[..], &b"a"[..])));
        assert_eq!(split_parent(b"a/b/c"), Some((&b"a/b"[..], &b"c"[..])));
    }

    #[test]
    fn pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("12x"), None);
        assert_eq!(t(".5"), None);
    }

    #[test]
    fn xattr_policy() {
        assert!(xattr_allowed(b"user.foo"));
        assert!(xattr_allowed(b"security.capability"));
        assert!(!xattr_allowed(b"user."));
        assert!(!xattr_allowed(b"trusted.overlay.opaque"));
        assert!(!xattr_allowed(b"trusted.overlay.redirect"));
        assert!(!xattr_allowed(b"security.selinux"));
        assert!(!xattr_allowed(b"security.ima"));
        assert!(!xattr_allowed(b"system.posix_acl_access"));
    }

    #[test]
    fn ids_refuse_minus_one_and_overflow() {
        assert_eq!(id(Ok(1000), b"x", "uid").unwrap(), 1000);
        assert!(id(Ok(u64::from(u32::MAX)), b"x", "uid").is_err());
        assert!(id(Ok(1 << 40), b"x", "uid").is_err());
    }
}
