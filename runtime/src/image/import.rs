//! Importing images from tarballs, for nodes without a registry: OCI image layouts (`oci-archive`,
//! as `skopeo copy ... oci-archive:` or buildkit write them) and docker archives (`docker save`).
//! Either may be gzip- or zstd-compressed as a whole.
//!
//! The tarball is first extracted into a private work directory inside the store (regular files
//! and directories only, plain relative names: anything else is refused by name), then every
//! blob is verified against its digest while its layer is unpacked, and adopted into the content
//! store by a rename. A killed import leaves only its work directory, which `prune` removes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::compression::{self, Compression};
use super::content::{self, sha256_digest};
use super::metadata::{ImageRecord, LayerRecord};
use super::pull::{self, BlobSink, ConfigRootfs, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Resolved};
use super::{ImageError, ImageStore, reference};
use crate::fsutil::IoContext;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestLayers {
    config: Desc,
    layers: Vec<Desc>,
    #[serde(default)]
    media_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Desc {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
}

/// One image found in a tarball, ready to be unpacked and recorded.
struct Found {
    resolved: Resolved,
    names: Vec<String>,
    /// Where each layer blob sits in the work directory.
    layer_files: Vec<PathBuf>,
}

impl ImageStore {
    /// Imports every image of an OCI-layout or docker-archive tarball and returns their records.
    pub async fn import(&self, tarball: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let content = self.inner.content.clone();
        let path = tarball.to_owned();
        let (work, work_lock, found) = tokio::task::spawn_blocking(move || {
            let (work, lock) = content.import_workdir()?;
            let found = extract_archive(&path, &work).and_then(|()| read_images(&path, &work));
            match found {
                Ok(f) => Ok((work, lock, f)),
                Err(e) => {
                    let _ = crate::fsutil::remove_dir_all_if_exists(&work);
                    Err(e)
                }
            }
        })
        .await??;
        let result = self.import_found(found).await;
        let _ = tokio::task::spawn_blocking(move || {
            let r = crate::fsutil::remove_dir_all_if_exists(&work);
            drop(work_lock);
            r
        })
        .await;
        result
    }

    async fn import_found(&self, found: Vec<Found>) -> Result<Vec<ImageRecord>, ImageError> {
        let mut out = Vec::new();
        for f in found {
            let locks = self.lock_layers(&f.resolved.layers).await?;
            let store = self.clone();
            let layers = f.resolved.layers.clone();
            let files = f.layer_files.clone();
            let wrote = tokio::task::spawn_blocking(move || {
                let mut wrote = false;
                for (layer, file) in layers.iter().zip(&files) {
                    let content = &store.inner.content;
                    let want_blob = store.inner.options.keep_layer_blobs;
                    if store.inner.snapshots.exists(&layer.diff_id)
                        && (!want_blob || content.exists(&layer.digest))
                    {
                        continue;
                    }
                    let compression = Compression::from_media_type(&layer.media_type)
                        .map_err(|_| import_err(file, "unknown layer media type"))?;
                    let mut src = BufReader::with_capacity(
                        256 * 1024,
                        File::open(file).ctx("open layer", file)?,
                    );
                    if store.inner.snapshots.exists(&layer.diff_id) {
                        let mut h = Sha256::new();
                        io::copy(&mut src, &mut h).ctx("read layer", file)?;
                        let actual = format!("sha256:{}", hex::encode(h.finalize()));
                        if actual != layer.digest {
                            return Err(ImageError::DigestMismatch {
                                what: format!("layer {}", file.display()),
                                expected: layer.digest.clone(),
                                actual,
                            });
                        }
                    } else {
                        pull::unpack_stream(
                            &store.inner.snapshots,
                            layer,
                            compression,
                            &mut src,
                            BlobSink::Verify(Sha256::new()),
                        )?;
                    }
                    if store.inner.options.keep_layer_blobs && !content.exists(&layer.digest) {
                        content.adopt(&layer.digest, file)?;
                    }
                    wrote = true;
                }
                Ok::<_, ImageError>(wrote)
            })
            .await??;
            let rec = self.record(f.resolved, f.names, Vec::new(), wrote).await?;
            drop(locks);
            out.push(rec);
        }
        Ok(out)
    }
}

fn import_err(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Import {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Extracts the archive's regular files into `work`, refusing anything but plain relative names.
fn extract_archive(tarball: &Path, work: &Path) -> Result<(), ImageError> {
    let file = File::open(tarball).ctx("open", tarball)?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = {
        use std::io::BufRead;
        reader.fill_buf().ctx("read", tarball)?.to_vec()
    };
    let decoder = compression::decoder(Compression::detect(&head), reader)
        .map_err(|e| import_err(tarball, format!("cannot decompress: {e}")))?;
    let mut archive = tar::Archive::new(decoder);
    let entries = archive
        .entries()
        .map_err(|e| import_err(tarball, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| import_err(tarball, format!("corrupt tar: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| import_err(tarball, format!("bad entry name: {e}")))?
            .into_owned();
        let kind = entry.header().entry_type();
        let rel = plain_relative(&name).ok_or_else(|| {
            import_err(
                tarball,
                format!("entry {:?} is not a plain relative path", name),
            )
        })?;
        let dest = work.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&dest).ctx("create", &dest)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).ctx("create", parent)?;
                }
                let mut out = File::create(&dest).ctx("create", &dest)?;
                io::copy(&mut entry, &mut out)
                    .map_err(|e| import_err(tarball, format!("entry {:?}: {e}", name)))?;
            }
            // docker save writes layer symlinks for layers shared between images: resolve them
            // by name inside the archive after extraction.
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| {
                        import_err(tarball, format!("symlink {:?} has no target", name))
                    })?;
                let base = rel.parent().unwrap_or(Path::new(""));
                let resolved = plain_relative(&base.join(&target)).ok_or_else(|| {
                    import_err(
                        tarball,
                        format!("symlink {:?} points outside the archive", name),
                    )
                })?;
                std::fs::write(
                    work.join(format!(".link-{}", rel.to_string_lossy().replace('/', "%"))),
                    resolved.to_string_lossy().as_bytes(),
                )
                .ctx("record symlink", work)?;
            }
            other => {
                return Err(import_err(
                    tarball,
                    format!("entry {:?} has unsupported type {:?}", name, other),
                ));
            }
        }
    }
    Ok(())
}

/// `name` cleaned to a relative path, or None when it is absolute or climbs out with `..`.
fn plain_relative(name: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// A file of the extracted archive by its archive name, following recorded symlinks.
fn archive_file(work: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let rel = plain_relative(Path::new(name))
        .ok_or_else(|| import_err(work, format!("archive names {name:?}, outside the archive")))?;
    let mut rel = rel;
    for _ in 0..8 {
        let p = work.join(&rel);
        if p.is_file() {
            return Ok(p);
        }
        let link = work.join(format!(".link-{}", rel.to_string_lossy().replace('/', "%")));
        match std::fs::read_to_string(&link) {
            Ok(target) => rel = PathBuf::from(target),
            Err(_) => break,
        }
    }
    Err(import_err(work, format!("archive lacks {name:?}")))
}

fn read_images(tarball: &Path, work: &Path) -> Result<Vec<Found>, ImageError> {
    let docker = work.join("manifest.json");
    let found = if docker.is_file() {
        read_docker_archive(tarball, work)?
    } else if work.join("index.json").is_file() {
        read_oci_layout(tarball, work)?
    } else {
        return Err(import_err(
            tarball,
            "neither a docker archive (manifest.json) nor an OCI layout (index.json)",
        ));
    };
    if found.is_empty() {
        return Err(import_err(tarball, "the archive holds no image"));
    }
    Ok(found)
}

fn read_json<T: for<'de> Deserialize<'de>>(
    tarball: &Path,
    path: &Path,
) -> Result<(Vec<u8>, T), ImageError> {
    let bytes = std::fs::read(path).ctx("read", path)?;
    let v = serde_json::from_slice(&bytes).map_err(|e| {
        import_err(
            tarball,
            format!(
                "{}: {e}",
                path.strip_prefix(path.parent().unwrap_or(path))
                    .unwrap_or(path)
                    .display()
            ),
        )
    })?;
    Ok((bytes, v))
}

fn diff_ids(tarball: &Path, config: &[u8]) -> Result<Vec<String>, ImageError> {
    let c: ConfigRootfs = serde_json::from_slice(config)
        .map_err(|e| import_err(tarball, format!("image config: {e}")))?;
    for d in &c.rootfs.diff_ids {
        reference::check_digest(d)?;
    }
    Ok(c.rootfs.diff_ids)
}

fn media_type_of(file: &Path) -> Result<&'static str, ImageError> {
    let mut head = [0u8; 8];
    let mut f = File::open(file).ctx("open", file)?;
    let n = f.read(&mut head).ctx("read", file)?;
    Ok(Compression::detect(&head[..n]).oci_media_type())
}

fn file_digest(path: &Path) -> Result<(String, u64), ImageError> {
    let mut f = BufReader::with_capacity(256 * 1024, File::open(path).ctx("open", path)?);
    let mut h = Sha256::new();
    let n = io::copy(&mut f, &mut h).ctx("read", path)?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

fn read_docker_archive(tarball: &Path, work: &Path) -> Result<Vec<Found>, ImageError> {
    let (_, entries): (_, Vec<DockerManifestEntry>) =
        read_json(tarball, &work.join("manifest.json"))?;
    let mut out = Vec::new();
    for e in entries {
        let config_path = archive_file(work, &e.config)?;
        let config = std::fs::read(&config_path).ctx("read", &config_path)?;
        let config_digest = sha256_digest(&config);
        let ids = diff_ids(tarball, &config)?;
        if ids.len() != e.layers.len() {
            return Err(import_err(
                tarball,
                format!(
                    "{} lists {} layers but its config {}",
                    e.config,
                    e.layers.len(),
                    ids.len()
                ),
            ));
        }
        let mut layers = Vec::new();
        let mut files = Vec::new();
        for (name, diff_id) in e.layers.iter().zip(ids) {
            let file = archive_file(work, name)?;
            let (digest, size) = file_digest(&file)?;
            layers.push(LayerRecord {
                digest,
                diff_id,
                media_type: media_type_of(&file)?.to_owned(),
                size,
            });
            files.push(file);
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        }))
        .map_err(|e| import_err(tarball, e.to_string()))?;
        let names = e
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| reference::normalize_tag(t))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Found {
            resolved: Resolved {
                manifest_digest: sha256_digest(&manifest),
                manifest,
                manifest_media_type: MEDIA_OCI_MANIFEST.to_owned(),
                index: None,
                config,
                config_digest,
                layers,
            },
            names,
            layer_files: files,
        });
    }
    Ok(out)
}

fn oci_blob(tarball: &Path, work: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = reference::check_digest(digest)?;
    let p = work.join("blobs/sha256").join(hex);
    if !p.is_file() {
        return Err(import_err(
            tarball,
            format!("OCI layout lacks blob {digest}"),
        ));
    }
    Ok(p)
}

fn read_oci_layout(tarball: &Path, work: &Path) -> Result<Vec<Found>, ImageError> {
    let (_, index): (_, OciIndex) = read_json(tarball, &work.join("index.json"))?;
    let mut out = Vec::new();
    for entry in index.manifests {
        let name = entry
            .annotations
            .get(CONTAINERD_NAME)
            .or_else(|| entry.annotations.get(REF_NAME))
            .cloned();
        let mut names = Vec::new();
        if let Some(n) = name {
            // A bare tag ("latest") names no repository: such an image is imported unnamed.
            if n.contains('/') || n.contains(':') {
                names.push(reference::normalize_tag(&n)?);
            }
        }
        let (mut digest, mut bytes) = (entry.digest.clone(), Vec::new());
        let mut index_blob = None;
        let mut media_type = entry.media_type.clone();
        if media_type == MEDIA_OCI_INDEX || media_type == pull::MEDIA_DOCKER_LIST {
            let p = oci_blob(tarball, work, &digest)?;
            let idx_bytes = std::fs::read(&p).ctx("read", &p)?;
            content::verify(&digest, &idx_bytes, "index in OCI layout")?;
            let (_, nested): (_, OciIndex) = read_json(tarball, &p)?;
            let child = nested
                .manifests
                .into_iter()
                .find(|m| {
                    m.media_type == MEDIA_OCI_MANIFEST
                        || m.media_type == pull::MEDIA_DOCKER_MANIFEST
                })
                .ok_or_else(|| {
                    import_err(tarball, format!("index {digest} holds no image manifest"))
                })?;
            index_blob = Some((digest.clone(), idx_bytes));
            digest = child.digest;
            media_type = child.media_type;
        }
        let p = oci_blob(tarball, work, &digest)?;
        bytes.extend(std::fs::read(&p).ctx("read", &p)?);
        content::verify(&digest, &bytes, "manifest in OCI layout")?;
        let m: ManifestLayers = serde_json::from_slice(&bytes)
            .map_err(|e| import_err(tarball, format!("manifest {digest}: {e}")))?;
        let config_path = oci_blob(tarball, work, &m.config.digest)?;
        let config = std::fs::read(&config_path).ctx("read", &config_path)?;
        content::verify(&m.config.digest, &config, "config in OCI layout")?;
        let ids = diff_ids(tarball, &config)?;
        if ids.len() != m.layers.len() {
            return Err(import_err(
                tarball,
                format!("manifest {digest}: layers and diff_ids differ in number"),
            ));
        }
        let mut layers = Vec::new();
        let mut files = Vec::new();
        for (l, diff_id) in m.layers.into_iter().zip(ids) {
            files.push(oci_blob(tarball, work, &l.digest)?);
            layers.push(LayerRecord {
                digest: l.digest,
                diff_id,
                media_type: l.media_type,
                size: l.size,
            });
        }
        out.push(Found {
            resolved: Resolved {
                manifest: bytes,
                manifest_digest: digest,
                manifest_media_type: m.media_type.unwrap_or(if media_type.is_empty() {
                    MEDIA_OCI_MANIFEST.to_owned()
                } else {
                    media_type
                }),
                index: index_blob,
                config,
                config_digest: m.config.digest,
                layers,
            },
            names,
            layer_files: files,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_stay_inside() {
        assert_eq!(
            plain_relative(Path::new("a/./b")),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            plain_relative(Path::new("a/../b")),
            Some(PathBuf::from("b"))
        );
        assert_eq!(plain_relative(Path::new("../b")), None);
        assert_eq!(plain_relative(Path::new("/etc/passwd")), None);
        assert_eq!(plain_relative(Path::new(".")), None);
    }

    #[test]
    fn garbage_is_not_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("x.tar");
        std::fs::write(
            &t,
            b"this is not a tarball at all, not even close............",
        )
        .unwrap();
        let work = dir.path().join("w");
        std::fs::create_dir(&work).unwrap();
        let e = extract_archive(&t, &work).and_then(|()| read_images(&t, &work));
        assert!(e.is_err());
    }
}
