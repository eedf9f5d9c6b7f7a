//! Privileged tests of layer unpacking with hand-made tarballs, hostile ones included.
//!
//! Each layer is unpacked into `<outer tempdir>/dest`, and `<outer>/outside-file` is the bait: the
//! whole outer tree (minus dest) and the host's `/etc/passwd` are snapshotted before and after every
//! hostile unpack, so any escape shows up as a diff, and an escape could only ever reach the test's
//! own temp dir, never the host's `/etc`. Root is needed for mknod, chown and trusted xattrs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use keel_runtime::image::compression::{self, Compression, HashingReader};
use keel_runtime::image::unpack::{UnpackError, UnpackOptions, UnpackStats, unpack_layer};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const MTIME: u64 = 1_600_000_000;
const BAIT: &[u8] = b"outside, must not change\n";

/// A tar built entry by entry, with raw names so hostile paths (`..`, absolute) can be written.
struct TarBuf {
    b: tar::Builder<Vec<u8>>,
}

fn header(kind: EntryType, path: &[u8], size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    let name = &mut h.as_old_mut().name;
    assert!(path.len() < name.len(), "use long_name for {path:?}");
    name[..path.len()].copy_from_slice(path);
    h
}

fn set_link(h: &mut Header, target: &[u8]) {
    let link = &mut h.as_old_mut().linkname;
    assert!(target.len() < link.len());
    link[..target.len()].copy_from_slice(target);
}

impl TarBuf {
    fn new() -> Self {
        TarBuf {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(
            header(EntryType::Regular, path.as_bytes(), data.len() as u64),
            data,
        )
    }

    fn file_with(&mut self, path: &str, data: &[u8], f: impl FnOnce(&mut Header)) -> &mut Self {
        let mut h = header(EntryType::Regular, path.as_bytes(), data.len() as u64);
        f(&mut h);
        self.raw(h, data)
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(header(EntryType::Directory, path.as_bytes(), 0), &[])
    }

    fn dir_with(&mut self, path: &str, f: impl FnOnce(&mut Header)) -> &mut Self {
        let mut h = header(EntryType::Directory, path.as_bytes(), 0);
        f(&mut h);
        self.raw(h, &[])
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = header(kind, path.as_bytes(), 0);
        set_link(&mut h, target.as_bytes());
        self.raw(h, &[])
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    /// A PAX extended header for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n", where len counts itself.
            let body = k.len() + v.len() + 3;
            let mut len = body + body.to_string().len();
            if len.to_string().len() != body.to_string().len() {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(
            header(EntryType::XHeader, b"PaxHeaders/x", data.len() as u64),
            &data,
        )
    }

    /// A GNU long-name header for the next entry.
    fn long_name(&mut self, name: &[u8]) -> &mut Self {
        let mut data = name.to_vec();
        data.push(0);
        self.raw(
            header(EntryType::GNULongName, b"././@LongLink", data.len() as u64),
            &data,
        )
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// `<outer>/dest` to unpack into, `<outer>/outside-file` as bait.
struct Sandbox {
    outer: tempfile::TempDir,
    dest: PathBuf,
}

type Snapshot = BTreeMap<PathBuf, String>;

impl Sandbox {
    fn new() -> Self {
        let outer = tempfile::Builder::new()
            .prefix("keel-unpack-test-")
            .tempdir()
            .unwrap();
        let dest = outer.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(outer.path().join("outside-file"), BAIT).unwrap();
        std::fs::create_dir(outer.path().join("etc")).unwrap();
        std::fs::write(outer.path().join("etc/passwd"), BAIT).unwrap();
        Sandbox { outer, dest }
    }

    fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
        unpack_layer(tar, &self.dest, &UnpackOptions::default())
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dest.join(rel)
    }

    /// Everything observable outside dest: the outer tree (metadata incl. ctime, so chmod/chown/
    /// link count changes show) and the host's /etc/passwd and /etc.
    fn snapshot(&self) -> Snapshot {
        fn describe(p: &Path) -> String {
            match std::fs::symlink_metadata(p) {
                Ok(m) => format!(
                    "ino={} mode={:o} uid={} gid={} size={} nlink={} mtime={}.{} ctime={}.{} link={:?}",
                    m.ino(),
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.nlink(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    std::fs::read_link(p).ok()
                ),
                Err(e) => format!("error {e}"),
            }
        }
        let mut snap = Snapshot::new();
        let mut stack = vec![self.outer.path().to_owned()];
        while let Some(p) = stack.pop() {
            snap.insert(p.clone(), describe(&p));
            if p == self.dest || !std::fs::symlink_metadata(&p).unwrap().is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        for host in ["/etc/passwd", "/etc"] {
            snap.insert(PathBuf::from(host), describe(Path::new(host)));
        }
        // dest itself is the one outer path allowed to change (its mtime), but not its owner/mode.
        let d = std::fs::metadata(&self.dest).unwrap();
        snap.insert(
            self.dest.clone(),
            format!("mode={:o} uid={} gid={}", d.mode(), d.uid(), d.gid()),
        );
        snap
    }

    /// Unpacks `tar` and asserts that nothing outside dest changed, whatever the outcome.
    fn unpack_hostile(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
        let before = self.snapshot();
        let res = self.unpack(tar);
        assert_eq!(
            before,
            self.snapshot(),
            "something outside dest changed: {res:?}"
        );
        assert_eq!(
            std::fs::read(self.outer.path().join("outside-file")).unwrap(),
            BAIT
        );
        res
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn lmeta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(p, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {} {name}: {e}", p.display()),
    }
}

fn is_whiteout(p: &Path) -> bool {
    let m = lmeta(p);
    m.file_type().is_char_device() && m.rdev() == 0
}

fn assert_refused(res: Result<UnpackStats, UnpackError>, entry: &str) -> String {
    let err = res.expect_err("hostile entry must be refused").to_string();
    assert!(err.contains(entry), "error does not name {entry:?}: {err}");
    err
}

/// A v2 `security.capability` value granting cap_net_raw (13), permitted + effective.
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn unpacks_files_dirs_links_and_metadata() {
    if !keel_testkit::privileged("unpacks_files_dirs_links_and_metadata") {
        return;
    }
    let sb = Sandbox::new();
    let long = format!("long/{}/file", "d".repeat(120));
    let tar = TarBuf::new()
        .dir("./")
        .dir_with("etc/", |h| h.set_mtime(MTIME + 100))
        .file_with("etc/hosts", b"127.0.0.1 localhost\n", |h| {
            h.set_uid(1000);
            h.set_gid(1001);
            h.set_mtime(MTIME + 5);
        })
        .dir("bin/")
        .file_with("bin/busybox", b"\x7fELF busybox", |h| h.set_mode(0o4755))
        .hardlink("bin/ls", "bin/busybox")
        .link(EntryType::Symlink, "bin/sh", "busybox")
        .dir_with("tmp/", |h| h.set_mode(0o1777))
        .dir_with("srv/", |h| {
            h.set_mode(0o2775);
            h.set_gid(50);
        })
        .file("srv/empty", b"")
        .file_with("run/fifo", b"", |h| {
            h.set_entry_type(EntryType::Fifo);
            h.set_mode(0o640);
        })
        .file("usr/lib/deep/file", b"implicit parents")
        .pax(&[
            ("mtime", b"1600000000.25"),
            ("SCHILY.xattr.user.keel", b"yes"),
            ("SCHILY.xattr.security.capability", &CAP_NET_RAW),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:bin_t:s0",
            ),
        ])
        .file_with("bin/ping", b"ping", |h| h.set_mode(0o755))
        .long_name(long.as_bytes())
        .file(&long[..90], b"long name content")
        .finish();
    let before = sb.snapshot();
    let stats = sb.unpack(&tar).unwrap();
    assert_eq!(before, sb.snapshot());
    assert_eq!(
        stats,
        UnpackStats {
            entries: 14,
            regular_bytes: (20 + 12 + 16 + 4 + 17) as u64,
            skipped_devices: 0,
            whiteouts: 0,
            opaque_dirs: 0,
        }
    );

    let hosts = lmeta(&sb.p("etc/hosts"));
    assert_eq!(read(&sb.p("etc/hosts")), b"127.0.0.1 localhost\n");
    assert_eq!(
        (hosts.mode() & 0o7777, hosts.uid(), hosts.gid()),
        (0o644, 1000, 1001)
    );
    assert_eq!(
        (hosts.mtime(), hosts.atime()),
        ((MTIME + 5) as i64, (MTIME + 5) as i64)
    );
    // Directory times survive the creation of their children.
    assert_eq!(lmeta(&sb.p("etc")).mtime(), (MTIME + 100) as i64);
    assert_eq!(lmeta(&sb.p("bin")).mtime(), MTIME as i64);

    let bb = lmeta(&sb.p("bin/busybox"));
    assert_eq!(bb.mode() & 0o7777, 0o4755, "setuid kept");
    let ls = lmeta(&sb.p("bin/ls"));
    assert_eq!((ls.ino(), ls.nlink()), (bb.ino(), 2));
    let sh = lmeta(&sb.p("bin/sh"));
    assert!(sh.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(sb.p("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(sh.mtime(), MTIME as i64);

    assert_eq!(lmeta(&sb.p("tmp")).mode() & 0o7777, 0o1777);
    let srv = lmeta(&sb.p("srv"));
    assert_eq!((srv.mode() & 0o7777, srv.gid()), (0o2775, 50));
    assert_eq!(lmeta(&sb.p("srv/empty")).len(), 0);

    let fifo = lmeta(&sb.p("run/fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o640);
    for d in ["run", "usr", "usr/lib", "usr/lib/deep"] {
        let m = lmeta(&sb.p(d));
        assert!(m.is_dir(), "{d}");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 0, 0), "{d}");
    }
    assert_eq!(read(&sb.p("usr/lib/deep/file")), b"implicit parents");

    let ping = sb.p("bin/ping");
    let m = lmeta(&ping);
    assert_eq!((m.mtime(), m.mtime_nsec()), (MTIME as i64, 250_000_000));
    assert_eq!(xattr(&ping, "user.keel").as_deref(), Some(&b"yes"[..]));
    assert_eq!(
        xattr(&ping, "security.capability").as_deref(),
        Some(&CAP_NET_RAW[..])
    );
    assert_eq!(xattr(&ping, "trusted.overlay.opaque"), None);
    assert_eq!(xattr(&ping, "trusted.overlay.redirect"), None);
    assert_eq!(xattr(&ping, "security.selinux"), None);

    assert_eq!(read(&sb.p(&long)), b"long name content");
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    if !keel_testkit::privileged("whiteouts_become_overlay_whiteouts") {
        return;
    }
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .dir("a/")
        .file("a/keep", b"k")
        .file_with("a/.wh.gone", b"", |h| {
            h.set_uid(3);
            h.set_gid(4);
        })
        .file("a/x", b"replaced by the whiteout below")
        .file("a/.wh.x", b"")
        .file(".wh.top", b"")
        .dir("c/")
        .file("c/.wh..wh..opq", b"")
        .file("new/sub/.wh..wh..opq", b"")
        .file(".wh..wh.plnk", b"")
        .finish();
    let stats = sb.unpack(&tar).unwrap();
    assert_eq!((stats.whiteouts, stats.opaque_dirs), (3, 2));

    assert!(is_whiteout(&sb.p("a/gone")));
    let gone = lmeta(&sb.p("a/gone"));
    assert_eq!((gone.uid(), gone.gid()), (3, 4));
    assert!(is_whiteout(&sb.p("a/x")));
    assert!(is_whiteout(&sb.p("top")));
    assert_eq!(read(&sb.p("a/keep")), b"k");
    assert_eq!(
        xattr(&sb.p("c"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&sb.p("new/sub"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&sb.p("a"), "trusted.overlay.opaque"), None);
    for left in [
        "a/.wh.gone",
        "a/.wh.x",
        ".wh.top",
        "c/.wh..wh..opq",
        "new/sub/.wh..wh..opq",
        ".wh..wh.plnk",
        "plnk",
        ".wh.plnk",
    ] {
        assert!(
            std::fs::symlink_metadata(sb.p(left)).is_err(),
            "{left} must not exist"
        );
    }
}

#[test]
fn overlayfs_honours_converted_whiteouts() {
    if !keel_testkit::privileged("overlayfs_honours_converted_whiteouts") {
        return;
    }
    let sb = Sandbox::new();
    let lower = sb.p("lower");
    let upper = sb.p("upper");
    let merged = sb.p("merged");
    for d in [&lower, &upper, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let opts = UnpackOptions::default();
    let l = TarBuf::new()
        .file("keep", b"keep")
        .file("gone", b"gone")
        .file("d/old", b"old")
        .finish();
    unpack_layer(&l[..], &lower, &opts).unwrap();
    let u = TarBuf::new()
        .file(".wh.gone", b"")
        .file("d/.wh..wh..opq", b"")
        .file("d/new", b"new")
        .finish();
    unpack_layer(&u[..], &upper, &opts).unwrap();

    // The mount lives in a private mount namespace of a throwaway thread: it disappears with the
    // thread whatever happens, so nothing is left mounted on the host.
    let seen = std::thread::spawn(move || -> Result<Vec<String>, String> {
        use rustix::mount::{MountFlags, MountPropagationFlags, mount, mount_change};
        // SAFETY: CLONE_NEWNS only gives this thread its own mount namespace (with its own fs
        // struct); the fd table is not unshared, so no fd ownership assumption is broken.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
            .map_err(|e| format!("unshare: {e}"))?;
        mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(|e| format!("make / private: {e}"))?;
        let data =
            std::ffi::CString::new(format!("lowerdir={}:{}", upper.display(), lower.display()))
                .unwrap();
        mount(
            "overlay",
            &merged,
            "overlay",
            MountFlags::RDONLY,
            Some(data.as_c_str()),
        )
        .map_err(|e| format!("mount overlay: {e}"))?;
        let mut names = Vec::new();
        for dir in [merged.clone(), merged.join("d")] {
            for e in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
                let e = e.map_err(|e| e.to_string())?;
                let rel = e
                    .path()
                    .strip_prefix(&merged)
                    .unwrap()
                    .display()
                    .to_string();
                names.push(rel);
            }
        }
        let _ = rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::DETACH);
        names.sort();
        Ok(names)
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(seen, ["d", "d/new", "keep"]);
}

#[test]
fn device_nodes_are_skipped() {
    if !keel_testkit::privileged("device_nodes_are_skipped") {
        return;
    }
    let sb = Sandbox::new();
    let dev = |kind, path: &str, major, minor| {
        let mut h = header(kind, path.as_bytes(), 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h
    };
    let tar = TarBuf::new()
        .dir("dev/")
        .raw(dev(EntryType::Char, "dev/null", 1, 3), &[])
        .raw(dev(EntryType::Block, "dev/sda", 8, 0), &[])
        .raw(dev(EntryType::Char, "dev/zero-at-0", 0, 0), &[])
        .hardlink("dev/null2", "dev/null")
        .file("dev/ok", b"ok")
        .finish();
    let stats = sb.unpack(&tar).unwrap();
    assert_eq!(stats.skipped_devices, 4);
    let mut names: Vec<_> = std::fs::read_dir(sb.p("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ok"]);
}

#[test]
fn replacing_entries_unlink_instead_of_writing_through() {
    if !keel_testkit::privileged("replacing_entries_unlink_instead_of_writing_through") {
        return;
    }
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .file("f", b"first")
        .hardlink("g", "f")
        .file("f", b"second")
        .dir("d/")
        .file("d/x", b"x")
        .dir_with("d/", |h| h.set_mode(0o700))
        .finish();
    sb.unpack(&tar).unwrap();
    assert_eq!(read(&sb.p("f")), b"second");
    assert_eq!(
        read(&sb.p("g")),
        b"first",
        "overwrite must not truncate the old inode"
    );
    assert_ne!(lmeta(&sb.p("f")).ino(), lmeta(&sb.p("g")).ino());
    assert_eq!(
        read(&sb.p("d/x")),
        b"x",
        "a directory met twice keeps its content"
    );
    assert_eq!(lmeta(&sb.p("d")).mode() & 0o7777, 0o700);
}

#[test]
fn hostile_absolute_and_dotdot_paths_are_contained() {
    if !keel_testkit::privileged("hostile_absolute_and_dotdot_paths_are_contained") {
        return;
    }
    let sb = Sandbox::new();
    let deep = format!("{}long-escape", "../".repeat(40));
    let tar = TarBuf::new()
        .file("/etc/passwd", b"abs")
        .file("/outside-file", b"abs2")
        .file("../escape", b"dotdot")
        .file("a/../../escape2", b"dotdot2")
        .file("../../../../../../../../etc/shadow", b"deep")
        .long_name(deep.as_bytes())
        .file("placeholder", b"long")
        .pax(&[("path", b"../pax-escape"), ("linkpath", b"../../x")])
        .file("placeholder2", b"pax")
        .finish();
    sb.unpack_hostile(&tar).unwrap();
    assert_eq!(read(&sb.p("etc/passwd")), b"abs");
    assert_eq!(read(&sb.p("outside-file")), b"abs2");
    assert_eq!(read(&sb.p("escape")), b"dotdot");
    assert_eq!(read(&sb.p("escape2")), b"dotdot2");
    assert_eq!(read(&sb.p("etc/shadow")), b"deep");
    assert_eq!(read(&sb.p("long-escape")), b"long");
    assert_eq!(read(&sb.p("pax-escape")), b"pax");
}

#[test]
fn hostile_symlinks_to_root_resolve_inside_dest() {
    if !keel_testkit::privileged("hostile_symlinks_to_root_resolve_inside_dest") {
        return;
    }
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .dir("etc/")
        .symlink("s", "/")
        .file("s/through-abs", b"1")
        .symlink("r", "../../../..")
        .file("r/through-rel", b"2")
        .symlink("up", "..")
        .file("up/outside-file", b"3")
        .symlink("etclink", "/etc")
        .file("etclink/passwd", b"4")
        .symlink("a/b", "../../../../../etc")
        .file("a/b/group", b"5")
        .finish();
    sb.unpack_hostile(&tar).unwrap();
    assert_eq!(read(&sb.p("through-abs")), b"1");
    assert_eq!(read(&sb.p("through-rel")), b"2");
    assert_eq!(read(&sb.p("outside-file")), b"3");
    assert_eq!(read(&sb.p("etc/passwd")), b"4");
    assert_eq!(read(&sb.p("etc/group")), b"5");
    assert!(lmeta(&sb.p("etclink")).file_type().is_symlink());
}

#[test]
fn hostile_symlink_to_host_path_missing_in_dest_is_refused() {
    if !keel_testkit::privileged("hostile_symlink_to_host_path_missing_in_dest_is_refused") {
        return;
    }
    let sb = Sandbox::new();
    let outer = sb.outer.path().display().to_string();
    let tar = TarBuf::new()
        .symlink("o", &outer)
        .file("o/outside-file", b"evil")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "o/outside-file");
}

#[test]
fn hostile_symlink_replacing_a_directory_is_contained() {
    if !keel_testkit::privileged("hostile_symlink_replacing_a_directory_is_contained") {
        return;
    }
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .dir("d/")
        .file("d/inner", b"inner")
        .dir("d/sub/")
        .symlink("d", "../../..")
        .file("d/outside-file", b"through")
        .dir("e/")
        .symlink("e", "/")
        .dir_with("e/etc/", |h| h.set_mode(0o777))
        .finish();
    sb.unpack_hostile(&tar).unwrap();
    assert!(lmeta(&sb.p("d")).file_type().is_symlink());
    assert_eq!(read(&sb.p("outside-file")), b"through");
    assert!(lmeta(&sb.p("etc")).is_dir());
    assert_eq!(lmeta(&sb.p("etc")).mode() & 0o7777, 0o777);
}

#[test]
fn hostile_entries_replacing_symlinks_do_not_write_through() {
    if !keel_testkit::privileged("hostile_entries_replacing_symlinks_do_not_write_through") {
        return;
    }
    let sb = Sandbox::new();
    let outer = sb.outer.path().display().to_string();
    let bait = format!("{outer}/outside-file");
    let tar = TarBuf::new()
        .symlink("f", &bait)
        .file_with("f", b"overwrite", |h| {
            h.set_mode(0o777);
            h.set_uid(1234);
        })
        .symlink("g", "../outside-file")
        .file("g", b"overwrite")
        .symlink("h", &outer)
        .dir_with("h/", |h| {
            h.set_mode(0o777);
            h.set_uid(1234);
        })
        .symlink("k", &bait)
        .file("real", b"real")
        .hardlink("k", "real")
        .symlink("w", &bait)
        .file(".wh.w", b"")
        .finish();
    sb.unpack_hostile(&tar).unwrap();
    assert_eq!(read(&sb.p("f")), b"overwrite");
    assert!(lmeta(&sb.p("f")).is_file());
    assert_eq!(read(&sb.p("g")), b"overwrite");
    assert!(lmeta(&sb.p("h")).is_dir());
    assert_eq!(lmeta(&sb.p("h")).uid(), 1234);
    assert_eq!(lmeta(&sb.p("k")).ino(), lmeta(&sb.p("real")).ino());
    assert!(is_whiteout(&sb.p("w")));
}

#[test]
fn hostile_hardlinks_outside_dest_are_refused() {
    if !keel_testkit::privileged("hostile_hardlinks_outside_dest_are_refused") {
        return;
    }
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("h", &[("h", "../outside-file")]),
        ("h", &[("h", "/etc/passwd")]),
        ("h", &[("h", "../../../../../etc/passwd")]),
        ("h", &[("h", "does/not/exist")]),
        ("h", &[("h", "missing")]),
    ];
    for (entry, links) in cases {
        let sb = Sandbox::new();
        let mut t = TarBuf::new();
        for (p, target) in *links {
            t.hardlink(p, target);
        }
        let err = assert_refused(sb.unpack_hostile(&t.finish()), entry);
        assert!(err.contains("not found in the layer"), "{err}");
    }

    // Through symlinks pointing outside: the symlink resolves to dest, where the target is missing.
    let sb = Sandbox::new();
    let outer = sb.outer.path().display().to_string();
    let tar = TarBuf::new()
        .symlink("up", "../../..")
        .hardlink("h", "up/outside-file")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "h");
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .symlink("abs", &outer)
        .hardlink("h2", "abs/outside-file")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "h2");

    // A hardlink to a directory is refused by the kernel.
    let sb = Sandbox::new();
    let tar = TarBuf::new().dir("d/").hardlink("h3", "d").finish();
    assert_refused(sb.unpack_hostile(&tar), "h3");
}

#[test]
fn hostile_hardlinks_resolve_to_the_layers_own_files() {
    if !keel_testkit::privileged("hostile_hardlinks_resolve_to_the_layers_own_files") {
        return;
    }
    let host = std::fs::metadata("/etc/passwd").unwrap();
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("outside-file", b"inner")
        .hardlink("h1", "/etc/passwd")
        .hardlink("h2", "../../etc/passwd")
        .symlink("up", "../../..")
        .hardlink("h3", "up/outside-file")
        .symlink("etclink", "/etc")
        .hardlink("h4", "etclink/passwd")
        .symlink("sl", "/etc/passwd")
        .hardlink("h5", "sl")
        .finish();
    sb.unpack_hostile(&tar).unwrap();
    let passwd = lmeta(&sb.p("etc/passwd"));
    assert_ne!(passwd.ino(), host.ino());
    for h in ["h1", "h2", "h4"] {
        assert_eq!(lmeta(&sb.p(h)).ino(), passwd.ino(), "{h}");
    }
    assert_eq!(lmeta(&sb.p("h3")).ino(), lmeta(&sb.p("outside-file")).ino());
    // A hardlink to a symlink links the symlink itself, not what it points to.
    let h5 = lmeta(&sb.p("h5"));
    assert!(h5.file_type().is_symlink());
    assert_eq!(h5.ino(), lmeta(&sb.p("sl")).ino());
    assert_eq!(passwd.nlink(), 4);
}

#[test]
fn hostile_malformed_entries_are_refused() {
    if !keel_testkit::privileged("hostile_malformed_entries_are_refused") {
        return;
    }
    let sb = Sandbox::new();
    let tar = TarBuf::new().file(".wh..", b"").finish();
    assert_refused(sb.unpack_hostile(&tar), ".wh..");
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .file("plain", b"p")
        .file("plain/child", b"c")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "plain/child");
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .symlink("dangling", "nowhere")
        .file("dangling/x", b"x")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "dangling/x");
    let sb = Sandbox::new();
    let tar = TarBuf::new()
        .pax(&[("path", b"nul\0byte")])
        .file("placeholder", b"")
        .finish();
    assert_refused(sb.unpack_hostile(&tar), "nul");
}

#[test]
fn truncated_tar_is_an_error() {
    if !keel_testkit::privileged("truncated_tar_is_an_error") {
        return;
    }
    let data = vec![9u8; 10_000];
    let tar = TarBuf::new().file("big", &data).file("next", b"n").finish();

    let sb = Sandbox::new();
    let err = sb.unpack(&tar[..512 + 3000]).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Truncated {
                got: 3000,
                want: 10_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("big"), "{err}");

    // Cut inside the second header.
    let sb = Sandbox::new();
    let err = sb.unpack(&tar[..512 + 10_240 + 100]).unwrap_err();
    assert!(
        matches!(err, UnpackError::Archive { entries: 1, .. }),
        "{err}"
    );

    // Cut inside the second entry's content padding: the file's bytes are there, the stream is not.
    let sb = Sandbox::new();
    let err = sb.unpack(&tar[..512 + 10_240 + 512 + 1]).unwrap_err();
    assert!(matches!(err, UnpackError::Archive { .. }), "{err}");
}

#[test]
fn digests_of_a_compressed_layer_come_from_the_unpack_pass() {
    if !keel_testkit::privileged("digests_of_a_compressed_layer_come_from_the_unpack_pass") {
        return;
    }
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let tar = TarBuf::new()
        .dir("data/")
        .file("data/blob", &payload)
        .file("data/small", b"s")
        .finish();
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();

    for (blob, media_type) in [
        (&gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (&zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (&tar, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let c = Compression::from_media_type(media_type).unwrap();
        assert_eq!(Compression::detect(&blob[..4]), c);
        let sb = Sandbox::new();
        let mut compressed = HashingReader::new(&blob[..]);
        let mut diff = HashingReader::new(compression::decoder(c, &mut compressed).unwrap());
        let stats = unpack_layer(&mut diff, &sb.dest, &UnpackOptions::default()).unwrap();
        assert_eq!(stats.regular_bytes, payload.len() as u64 + 1);
        assert_eq!(diff.digest(), sha(&tar), "{media_type}: diffID");
        assert_eq!(diff.bytes_read(), tar.len() as u64, "{media_type}");
        drop(diff);
        // Nothing left unread in the blob either.
        let mut rest = Vec::new();
        compressed.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{media_type}: {} bytes unread", rest.len());
        assert_eq!(
            compressed.digest(),
            sha(blob),
            "{media_type}: compressed digest"
        );
        assert_eq!(read(&sb.p("data/blob")), payload);
    }
}
