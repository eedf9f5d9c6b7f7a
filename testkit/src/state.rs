//! Temporary state roots: a directory a test gives to keel as `--root` (or any state dir), removed
//! on drop together with every mount made below it.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// A fresh directory under the system temp dir. On drop, every mount point under it is
/// unmounted (deepest first, lazily if busy) and the tree is removed.
#[derive(Debug)]
pub struct StateRoot {
    dir: Option<tempfile::TempDir>,
}

impl StateRoot {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .context("create temp state root")?;
        Ok(StateRoot { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .expect("state root is only taken in drop")
    }

    /// `path()/rel`, created as a directory.
    pub fn subdir(&self, rel: &str) -> anyhow::Result<PathBuf> {
        let p = self.path().join(rel);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(p)
    }

    /// Mount points at or below this root, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(self.path())
    }
}

/// Mount points at or below `root` according to /proc/self/mountinfo, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for StateRoot {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        for m in mounts_under(dir.path()) {
            if rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).is_err() {
                let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let path = dir.path().to_owned();
        if let Err(e) = dir.close() {
            // Immutable or busy files: say so instead of hiding the leak.
            eprintln!(
                "testkit: could not remove state root {}: {e}",
                path.display()
            );
        }
    }
}
