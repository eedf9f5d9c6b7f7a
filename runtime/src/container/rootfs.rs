//! A container's root filesystem: an overlay whose lowerdirs are the image's layer snapshots
//! (top first) and whose upperdir/workdir live in the container's directory, so removing the
//! container removes every write it made.
//!
//! It must not write into snapshots: they are shared by every container of the image.
//! Mount options are limited to one page, which bounds the number of layers; images deeper than
//! that fail to mount with a clear error instead of silently losing layers.

use std::path::{Path, PathBuf};

use super::sys;

/// What went wrong preparing or removing a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {target}: layer path {path} contains ':' or ','; overlayfs cannot take it")]
    BadPath { target: PathBuf, path: PathBuf },
    #[error("rootfs {target}: {layers} layers make mount options of {len} bytes (limit {max})")]
    TooManyLayers {
        target: PathBuf,
        layers: usize,
        len: usize,
        max: usize,
    },
    #[error("rootfs {target}: image has no layers")]
    NoLayers { target: PathBuf },
    #[error("{op} rootfs {target}: {source}")]
    Io {
        op: &'static str,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Longest option string mount(2) takes (one page, including the NUL).
const MAX_OPTIONS: usize = 4095;

/// The overlay mount options for `lowers` (top first).
pub fn overlay_options(
    target: &Path,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> Result<String, RootfsError> {
    if lowers.is_empty() {
        return Err(RootfsError::NoLayers {
            target: target.to_owned(),
        });
    }
    for p in lowers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let s = p.to_string_lossy();
        if s.contains(':') || s.contains(',') {
            return Err(RootfsError::BadPath {
                target: target.to_owned(),
                path: p.to_owned(),
            });
        }
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if opts.len() > MAX_OPTIONS {
        return Err(RootfsError::TooManyLayers {
            target: target.to_owned(),
            layers: lowers.len(),
            len: opts.len(),
            max: MAX_OPTIONS,
        });
    }
    Ok(opts)
}

/// Creates upper/work/target and mounts the overlay.
pub fn mount(
    target: &Path,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> Result<(), RootfsError> {
    let opts = overlay_options(target, lowers, upper, work)?;
    let io = |op, source| RootfsError::Io {
        op,
        target: target.to_owned(),
        source,
    };
    for d in [upper, work, target] {
        std::fs::create_dir_all(d).map_err(|e| io("create dirs for", e))?;
    }
    sys::mount_overlay(target, &opts).map_err(|e| io("mount", e))
}

/// Unmounts the overlay (idempotent).
pub fn unmount(target: &Path) -> Result<(), RootfsError> {
    sys::unmount(target).map_err(|e| RootfsError::Io {
        op: "unmount",
        target: target.to_owned(),
        source: e,
    })?;
    if sys::is_mount_point(target) {
        return Err(RootfsError::Io {
            op: "unmount",
            target: target.to_owned(),
            source: std::io::Error::other("still mounted"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_list_layers_top_first() {
        let o = overlay_options(
            Path::new("/c/rootfs"),
            &["/s/top".into(), "/s/base".into()],
            Path::new("/c/upper"),
            Path::new("/c/work"),
        )
        .unwrap();
        assert_eq!(
            o,
            "lowerdir=/s/top:/s/base,upperdir=/c/upper,workdir=/c/work"
        );
    }

    #[test]
    fn bad_paths_and_too_many_layers_fail() {
        let t = Path::new("/t");
        let (u, w) = (Path::new("/u"), Path::new("/w"));
        assert!(matches!(
            overlay_options(t, &["/a:b".into()], u, w),
            Err(RootfsError::BadPath { .. })
        ));
        assert!(matches!(
            overlay_options(t, &[], u, w),
            Err(RootfsError::NoLayers { .. })
        ));
        let many: Vec<PathBuf> = (0..100)
            .map(|i| PathBuf::from(format!("/var/lib/keel/images/snapshots/{i:064}")))
            .collect();
        assert!(matches!(
            overlay_options(t, &many, u, w),
            Err(RootfsError::TooManyLayers { .. })
        ));
    }
}
