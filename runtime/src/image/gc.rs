//! Removing images and collecting what no image needs: blobs, snapshots, and the work files of
//! killed pulls and imports.
//!
//! Records are the roots. Collection runs under the metadata lock and skips any blob or snapshot
//! whose layer lock is held, so it never takes a layer from under a pull that has not recorded
//! its image yet.

use std::collections::HashSet;

use super::metadata::{self, ImageRecord};
use super::{ImageError, ImageStore, reference};

/// How [`ImageStore::remove`] treats a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// `docker rmi` semantics: a tag or repo digest is taken off the image, which is deleted when
    /// it has no names left; an id deletes the image.
    Untag,
    /// CRI RemoveImage semantics: the image is deleted whatever name was used.
    Whole,
}

/// What a removal or collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Names taken off images that remain.
    pub untagged: Vec<String>,
    /// Ids of the images deleted.
    pub deleted: Vec<String>,
    pub blobs_removed: usize,
    pub snapshots_removed: usize,
    /// Killed pulls' and imports' leftovers removed.
    pub leftovers_removed: usize,
}

impl ImageStore {
    /// Removes an image by name (see [`RemoveMode`]), then collects its now unused content.
    /// `in_use` holds the ids of images containers use: those are refused.
    pub async fn remove(
        &self,
        name: &str,
        mode: RemoveMode,
        in_use: &HashSet<String>,
    ) -> Result<GcReport, ImageError> {
        let store = self.clone();
        let name = name.to_owned();
        let in_use = in_use.clone();
        tokio::task::spawn_blocking(move || {
            let meta = &store.inner.meta;
            let _lock = meta.lock()?;
            let all = meta.load_all()?;
            let Some(rec) = metadata::resolve(&all, &name)?.cloned() else {
                return Err(ImageError::ImageNotFound { name });
            };
            let mut report = GcReport::default();
            let by_id = rec.id == name.trim() || !is_reference_like(&name, &rec);
            let remaining = if mode == RemoveMode::Untag && !by_id {
                untag(&rec, &name)
            } else {
                None
            };
            // The image stays while it has a tag left; digest names alone do not keep it (as
            // `docker rmi` of the last tag deletes the image).
            match remaining {
                Some(kept) if !kept.repo_tags.is_empty() => {
                    report.untagged.push(name.clone());
                    meta.write(&kept)?;
                }
                _ => {
                    if in_use.contains(&rec.id) {
                        return Err(ImageError::InUse { id: rec.id });
                    }
                    meta.delete(&rec.id)?;
                    report.deleted.push(rec.id.clone());
                }
            }
            store.collect(&mut report)?;
            Ok(report)
        })
        .await?
    }

    /// Deletes images with no names left (or, with `all`, every image not in `in_use`), then
    /// collects unused content.
    pub async fn prune(&self, all: bool, in_use: &HashSet<String>) -> Result<GcReport, ImageError> {
        let store = self.clone();
        let in_use = in_use.clone();
        tokio::task::spawn_blocking(move || {
            let meta = &store.inner.meta;
            let _lock = meta.lock()?;
            let mut report = GcReport::default();
            for rec in meta.load_all()? {
                let dangling = rec.repo_tags.is_empty() && rec.repo_digests.is_empty();
                if (all || dangling) && !in_use.contains(&rec.id) {
                    meta.delete(&rec.id)?;
                    report.deleted.push(rec.id);
                }
            }
            store.collect(&mut report)?;
            Ok(report)
        })
        .await?
    }

    /// Removes blobs and snapshots no record names, and leftovers of killed work. The caller
    /// holds the metadata lock.
    fn collect(&self, report: &mut GcReport) -> Result<(), ImageError> {
        let records = self.inner.meta.load_all()?;
        let blobs: HashSet<&str> = records.iter().flat_map(ImageRecord::blobs).collect();
        let snaps: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.layers.iter().map(|l| l.diff_id.as_str()))
            .collect();
        let content = &self.inner.content;
        for d in content.list() {
            if blobs.contains(d.as_str()) {
                continue;
            }
            if let Some(_held) = content.try_lock(&d)? {
                content.delete(&d)?;
                report.blobs_removed += 1;
            }
        }
        for d in self.inner.snapshots.list() {
            if snaps.contains(d.as_str()) {
                continue;
            }
            // Keep the lock while removing: releasing it and locking again would let a pull
            // take it in between and then wait for the metadata lock held here.
            if let Some(_held) = content.try_lock(&d)? {
                self.inner.snapshots.remove_locked(&d)?;
                report.snapshots_removed += 1;
            }
        }
        report.leftovers_removed += content.clean_ingest()? + self.inner.snapshots.clean_tmp()?;
        Ok(())
    }
}

/// Whether `name` names the image through one of its tags or repo digests (rather than its id).
fn is_reference_like(name: &str, rec: &ImageRecord) -> bool {
    let Ok(r) = reference::parse(name) else {
        return false;
    };
    let tag = reference::tag_name(&r);
    let digest = r.digest().map(|d| reference::digest_name(&r, d));
    tag.is_some_and(|t| rec.repo_tags.contains(&t))
        || digest.is_some_and(|d| rec.repo_digests.contains(&d))
}

/// The record with the name taken off, or None when the name is not one of its names.
fn untag(rec: &ImageRecord, name: &str) -> Option<ImageRecord> {
    let r = reference::parse(name).ok()?;
    let mut kept = rec.clone();
    if let Some(d) = r.digest() {
        let full = reference::digest_name(&r, d);
        kept.repo_digests.retain(|x| *x != full);
    } else {
        let tag = reference::tag_name(&r)?;
        kept.repo_tags.retain(|x| *x != tag);
    }
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untag_takes_off_only_the_named_tag() {
        let rec = ImageRecord {
            id: format!("sha256:{}", "a".repeat(64)),
            repo_tags: vec![
                "docker.io/library/busybox:latest".into(),
                "docker.io/library/busybox:1".into(),
            ],
            repo_digests: vec![],
            manifest_digest: format!("sha256:{}", "b".repeat(64)),
            manifest_media_type: String::new(),
            index_digest: None,
            layers: vec![],
            size: 0,
            added: String::new(),
        };
        let kept = untag(&rec, "busybox").unwrap();
        assert_eq!(kept.repo_tags, vec!["docker.io/library/busybox:1"]);
        assert!(is_reference_like("busybox:1", &rec));
        assert!(!is_reference_like("aaaaaaaa", &rec));
    }
}
