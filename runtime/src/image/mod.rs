//! The image store: pulls images from OCI registries, imports them from tarballs, keeps their
//! blobs content-addressed, unpacks each layer once into a snapshot, and removes what no image
//! needs any more.
//!
//! Layout under `<root>/images`: `content/` (blobs by digest, see [`content`]), `snapshots/`
//! (one overlay-ready directory per layer, see [`snapshot`]), `meta/` (one record per image, see
//! [`metadata`]) and `locks/` (one flock per digest). Every change is crash-safe: a killed pull
//! or import leaves only unnamed work files that the next pull of the same layer, or `prune`,
//! removes. Several processes (the CRI daemon, the CLI) may use one root at once.
//!
//! It must not know about containers: callers that mount snapshots pass the images they use to
//! [`ImageStore::prune`] so nothing in use is collected.

pub mod compression;
pub mod content;
pub mod gc;
pub mod import;
pub mod metadata;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use gc::{GcReport, RemoveMode};
pub use metadata::{ImageRecord, LayerRecord};
pub use pull::{PullEvent, PullReport, PullRequest};
pub use registry::{Credentials, RegistryOptions, Transport};

use crate::fsutil::{FsError, IoContext};

/// Everything that can go wrong in the image store. Each message names the image, blob, path or
/// registry it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid digest {digest:?}: expected sha256:<64 hex>")]
    InvalidDigest { digest: String },
    #[error("invalid registry settings: {reason}")]
    Config { reason: String },
    #[error("image {reference}: not found in registry {registry} ({reason})")]
    NotFoundInRegistry {
        reference: String,
        registry: String,
        reason: String,
    },
    #[error("image {reference}: registry {registry} refused the credentials ({reason})")]
    Unauthorized {
        reference: String,
        registry: String,
        reason: String,
    },
    #[error("image {reference}: registry {registry} unreachable: {reason}")]
    Unreachable {
        reference: String,
        registry: String,
        reason: String,
    },
    #[error("image {reference}: registry {registry}: {reason}")]
    Registry {
        reference: String,
        registry: String,
        reason: String,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("image {reference}: unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        reference: String,
        what: &'static str,
        media_type: String,
    },
    #[error("image {reference}: no linux/amd64 image in its index (has: {available})")]
    NoMatchingPlatform {
        reference: String,
        available: String,
    },
    #[error("image {reference}: malformed {what}: {reason}")]
    Malformed {
        reference: String,
        what: &'static str,
        reason: String,
    },
    #[error("layer {digest}: {source}")]
    Unpack {
        digest: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("image {name:?} not found on this node")]
    ImageNotFound { name: String },
    #[error("image name {name:?} is ambiguous: it matches {count} images")]
    Ambiguous { name: String, count: usize },
    #[error("image {id} is in use by containers; remove them first")]
    InUse { id: String },
    #[error("image record {path}: {reason}")]
    CorruptRecord { path: PathBuf, reason: String },
    #[error("import {path}: {reason}")]
    Import { path: PathBuf, reason: String },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for ImageError {
    fn from(e: tokio::task::JoinError) -> Self {
        ImageError::Task(e.to_string())
    }
}

/// How the store keeps images. Deserializable: the `[images]` table of keel's config file.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Keep each compressed layer blob in the content store after unpacking it (needed only to
    /// export or re-push images). Off by default, as CRI-O's storage and containerd's
    /// `discard_unpacked_layers` do: containers run from the snapshots, and storing every layer
    /// twice doubles the data a pull must make durable.
    pub keep_layer_blobs: bool,
}

/// Disk used by the image store (what CRI's ImageFsInfo reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsUsage {
    pub path: PathBuf,
    pub bytes: u64,
    pub inodes: u64,
}

/// The node's image store. Cheap to clone; all clones share one state root.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    content: content::ContentStore,
    snapshots: snapshot::Snapshots,
    meta: metadata::MetaStore,
    registry: RegistryOptions,
    options: StoreOptions,
    /// Built on first use: loading TLS roots is wasted work for `ls`, `import` or a pull from a
    /// plain-HTTP registry, and must not make them fail on a node without CA certificates.
    tls_client: std::sync::OnceLock<Arc<oci_client::Client>>,
    plain_client: std::sync::OnceLock<Arc<oci_client::Client>>,
}

impl ImageStore {
    /// Opens (creating if needed) the store under `<state_root>/images`, with default options.
    pub fn open(state_root: &Path, registry: RegistryOptions) -> Result<Self, ImageError> {
        Self::open_with(state_root, registry, StoreOptions::default())
    }

    /// Opens (creating if needed) the store under `<state_root>/images`.
    pub fn open_with(
        state_root: &Path,
        registry: RegistryOptions,
        options: StoreOptions,
    ) -> Result<Self, ImageError> {
        registry.validate()?;
        let root = state_root.join("images");
        let locks = root.join("locks");
        let inner = Inner {
            content: content::ContentStore::open(&root.join("content"), &locks)?,
            snapshots: snapshot::Snapshots::open(&root.join("snapshots"), &locks)?,
            meta: metadata::MetaStore::open(&root.join("meta"))?,
            tls_client: std::sync::OnceLock::new(),
            plain_client: std::sync::OnceLock::new(),
            registry,
            options,
            root,
        };
        Ok(ImageStore {
            inner: Arc::new(inner),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn registry_options(&self) -> &RegistryOptions {
        &self.inner.registry
    }

    /// The shared registry client for `transport`, built on first use.
    fn client(&self, transport: Transport) -> Result<Arc<oci_client::Client>, ImageError> {
        let cell = match transport {
            Transport::Tls => &self.inner.tls_client,
            Transport::PlainHttp => &self.inner.plain_client,
        };
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let built = Arc::new(self.inner.registry.client(transport)?);
        Ok(cell.get_or_init(|| built).clone())
    }

    /// Every image, sorted by first tag.
    pub async fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let meta = self.inner.meta.clone();
        tokio::task::spawn_blocking(move || meta.load_all()).await?
    }

    /// The image a name (id, id prefix, tag or repo digest) refers to, if the node has it.
    pub async fn get(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let all = self.list().await?;
        Ok(metadata::resolve(&all, name)?.cloned())
    }

    /// The image's config (entrypoint, env, user, ...), read from the verified config blob.
    pub async fn config(
        &self,
        image: &ImageRecord,
    ) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
        let content = self.inner.content.clone();
        let id = image.id.clone();
        let data = tokio::task::spawn_blocking(move || content.read(&id)).await??;
        serde_json::from_slice(&data).map_err(|e| ImageError::Malformed {
            reference: image.id.clone(),
            what: "config",
            reason: e.to_string(),
        })
    }

    /// The image's layer snapshot directories, top layer first: overlayfs lowerdirs.
    pub fn snapshot_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| {
                let p = self.inner.snapshots.path(&l.diff_id)?;
                if !p.is_dir() {
                    return Err(ImageError::ImageNotFound {
                        name: format!("{} (snapshot of layer {} missing)", image.id, l.diff_id),
                    });
                }
                Ok(p)
            })
            .collect()
    }

    /// Bytes and inodes used by the whole image store.
    pub async fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        let root = self.inner.root.clone();
        let (bytes, inodes) =
            tokio::task::spawn_blocking(move || crate::fsutil::disk_usage(&root)).await?;
        Ok(FsUsage {
            path: self.inner.root.clone(),
            bytes,
            inodes,
        })
    }

    /// Makes everything written so far durable with one syncfs of the store's filesystem.
    fn syncfs(&self) -> Result<(), ImageError> {
        let root = &self.inner.root;
        let dir = std::fs::File::open(root).ctx("open", root)?;
        rustix::fs::syncfs(&dir).map_err(|e| FsError::new("syncfs", root, e.into()))?;
        Ok(())
    }
}
