//! Pulling an image from an OCI distribution registry.
//!
//! One pass per layer: the blob streams from the registry into the content store (hashed) and, at
//! the same time, through the decompressor (hashed again for the diffID) into the layer's
//! snapshot work directory. Nothing becomes visible unless both digests match: the blob is renamed
//! into place, the snapshot is renamed into place, one syncfs makes them durable, and only then is
//! the image recorded.
//!
//! Concurrency: before downloading, a pull takes the locks of all its layers in sorted order (so
//! two pulls never deadlock), which makes a second pull of the same image wait and then find every
//! layer present, and keeps garbage collection off layers that are not recorded yet.

use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::{StreamExt, TryStreamExt};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::compression::{self, Compression, HashingReader};
use super::content::{self, Ingest};
use super::metadata::{ImageRecord, LayerRecord};
use super::registry::{Credentials, Endpoint, Transport};
use super::snapshot::Snapshots;
use super::{ImageError, ImageStore, reference, unpack};
use crate::fsutil::FileLock;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPTED: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
];

/// Progress of a pull, for progress bars and logs.
#[derive(Clone, Debug)]
pub enum PullEvent {
    /// The manifest is known: how many layers and bytes the image has.
    Resolved {
        manifest_digest: String,
        layers: usize,
        total_bytes: u64,
    },
    /// A layer is already on the node.
    LayerReused { digest: String, size: u64 },
    /// Bytes of a layer arrived.
    LayerProgress {
        digest: String,
        downloaded: u64,
        size: u64,
    },
    /// A layer is downloaded, verified and unpacked.
    LayerDone { digest: String },
}

pub type ProgressFn = Arc<dyn Fn(PullEvent) + Send + Sync>;

/// What to pull and how.
#[derive(Clone, Default)]
pub struct PullRequest {
    pub reference: String,
    /// Overrides the configured credentials for the image's registry (CRI's per-pull auth).
    pub credentials: Option<Credentials>,
    pub progress: Option<ProgressFn>,
}

impl PullRequest {
    pub fn new(reference: impl Into<String>) -> Self {
        PullRequest {
            reference: reference.into(),
            ..Default::default()
        }
    }

    pub fn progress(mut self, f: impl Fn(PullEvent) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    fn emit(&self, ev: PullEvent) {
        if let Some(p) = &self.progress {
            p(ev);
        }
    }
}

/// The outcome of a pull.
#[derive(Clone, Debug)]
pub struct PullReport {
    pub image: ImageRecord,
    pub downloaded_layers: usize,
    pub reused_layers: usize,
    pub downloaded_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// The part of an image config the store needs: the layers' diffIDs.
#[derive(Deserialize)]
pub(super) struct ConfigRootfs {
    pub rootfs: Rootfs,
}

#[derive(Deserialize)]
pub(super) struct Rootfs {
    pub diff_ids: Vec<String>,
}

/// A manifest resolved to one linux/amd64 image, with its config, ready to fetch layers.
pub(super) struct Resolved {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub index: Option<(String, Vec<u8>)>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<LayerRecord>,
}

/// Errors worth trying the next endpoint (mirror) for.
fn try_next_endpoint(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::NotFoundInRegistry { .. }
            | ImageError::Unreachable { .. }
            | ImageError::Unauthorized { .. }
            | ImageError::Registry { .. }
    )
}

impl ImageStore {
    /// Pulls an image (trying the registry's mirrors first) and records it under its tag.
    pub async fn pull(&self, req: PullRequest) -> Result<PullReport, ImageError> {
        let r = reference::parse(&req.reference)?;
        let endpoints = self.inner.registry.endpoints(r.registry());
        let last = endpoints.len() - 1;
        for (i, ep) in endpoints.iter().enumerate() {
            match self.pull_endpoint(&r, ep, &req).await {
                Err(e) if i < last && try_next_endpoint(&e) => {
                    tracing::warn!(image = %req.reference, mirror = %ep.host, error = %e, "mirror failed, trying next");
                }
                other => return other,
            }
        }
        unreachable!("endpoints() always ends with the registry itself")
    }

    /// One endpoint: a plain-HTTP one first through the plain client, and again through the
    /// TLS client if that failed in a way an HTTPS redirect or token realm would explain.
    async fn pull_endpoint(
        &self,
        r: &Reference,
        ep: &Endpoint,
        req: &PullRequest,
    ) -> Result<PullReport, ImageError> {
        if ep.plain_http {
            let client = self.pull_client(Transport::PlainHttp, req)?;
            match self.pull_from(&client, r, ep, req).await {
                // (A token realm on an HTTPS host shows up as Unauthorized.)
                Err(
                    e @ (ImageError::Unreachable { .. }
                    | ImageError::Registry { .. }
                    | ImageError::Unauthorized { .. }),
                ) => {
                    tracing::debug!(registry = %ep.host, error = %e, "plain-HTTP client failed, retrying with TLS roots");
                }
                other => return other,
            }
        }
        let client = self.pull_client(Transport::Tls, req)?;
        self.pull_from(&client, r, ep, req).await
    }

    /// oci-client keeps the first auth it sees per registry (and its tokens) for the client's
    /// lifetime. A pull with its own credentials (CRI's per-pull auth) therefore gets a client
    /// of its own: one wrong password must not lock a registry out of a long-lived daemon, and
    /// one pod's pull secret must not serve pulls that lack it.
    fn pull_client(
        &self,
        transport: Transport,
        req: &PullRequest,
    ) -> Result<Arc<Client>, ImageError> {
        if req.credentials.is_some() {
            Ok(Arc::new(self.inner.registry.client(transport)?))
        } else {
            self.client(transport)
        }
    }

    async fn pull_from(
        &self,
        client: &Client,
        r: &Reference,
        ep: &Endpoint,
        req: &PullRequest,
    ) -> Result<PullReport, ImageError> {
        let mut target = r.clone();
        let auth = if ep.host != r.registry() {
            target.set_mirror_registry(ep.host.clone());
            self.inner.registry.auth_for(&ep.host)
        } else {
            match &req.credentials {
                Some(c) => auth_of(c),
                None => self.inner.registry.auth_for(r.registry()),
            }
        };
        let ctx = Ctx {
            reference: req.reference.clone(),
            registry: ep.host.clone(),
        };
        let resolved = resolve(client, &target, &auth, r, &ctx).await?;
        let total: u64 = resolved.layers.iter().map(|l| l.size).sum();
        req.emit(PullEvent::Resolved {
            manifest_digest: resolved.manifest_digest.clone(),
            layers: resolved.layers.len(),
            total_bytes: total,
        });

        let locks = self.lock_layers(&resolved.layers).await?;
        let (to_fetch, reused): (Vec<_>, Vec<_>) = resolved
            .layers
            .iter()
            .cloned()
            .partition(|l| !self.inner.snapshots.exists(&l.diff_id));
        for l in &reused {
            req.emit(PullEvent::LayerReused {
                digest: l.digest.clone(),
                size: l.size,
            });
        }
        let downloaded_layers = to_fetch.len();
        let downloaded_bytes: u64 = futures::stream::iter(to_fetch)
            .map(|layer| self.fetch_layer(client, &target, layer, &ctx, req))
            .buffer_unordered(self.inner.registry.concurrency())
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;

        let mut names = Vec::new();
        if let Some(tag) = reference::tag_name(r) {
            names.push(tag);
        }
        let digest_for_name = resolved
            .index
            .as_ref()
            .map(|(d, _)| d.as_str())
            .unwrap_or(&resolved.manifest_digest);
        let repo_digest = reference::digest_name(r, digest_for_name);
        let image = self
            .record(resolved, names, vec![repo_digest], downloaded_layers > 0)
            .await?;
        drop(locks);
        Ok(PullReport {
            image,
            downloaded_layers,
            reused_layers: reused.len(),
            downloaded_bytes,
        })
    }

    /// Takes the locks of every layer (blob digest and diffID) in one global order.
    pub(super) async fn lock_layers(
        &self,
        layers: &[LayerRecord],
    ) -> Result<Vec<FileLock>, ImageError> {
        let mut keys: Vec<String> = layers
            .iter()
            .flat_map(|l| [l.digest.clone(), l.diff_id.clone()])
            .collect();
        keys.sort();
        keys.dedup();
        let content = self.inner.content.clone();
        tokio::task::spawn_blocking(move || keys.iter().map(|k| content.lock(k)).collect()).await?
    }

    /// Makes new layers durable, then stores manifest and config and writes the image record.
    pub(super) async fn record(
        &self,
        resolved: Resolved,
        repo_tags: Vec<String>,
        repo_digests: Vec<String>,
        wrote_layers: bool,
    ) -> Result<ImageRecord, ImageError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            // Blobs are renamed into place unsynced; one syncfs then makes them and the new
            // layers durable together, before the record that names them is written.
            let content = &store.inner.content;
            let mut wrote = wrote_layers;
            wrote |= content.write_unsynced(&resolved.config_digest, &resolved.config)?;
            wrote |= content.write_unsynced(&resolved.manifest_digest, &resolved.manifest)?;
            if let Some((d, bytes)) = &resolved.index {
                wrote |= content.write_unsynced(d, bytes)?;
            }
            if wrote {
                store.syncfs()?;
            }
            let rec = ImageRecord {
                id: resolved.config_digest.clone(),
                repo_tags,
                repo_digests,
                manifest_digest: resolved.manifest_digest.clone(),
                manifest_media_type: resolved.manifest_media_type.clone(),
                index_digest: resolved.index.as_ref().map(|(d, _)| d.clone()),
                size: resolved.layers.iter().map(|l| l.size).sum(),
                layers: resolved.layers,
                added: chrono::Utc::now().to_rfc3339(),
            };
            let _meta = store.inner.meta.lock()?;
            store.inner.meta.upsert(rec)
        })
        .await?
    }

    /// Downloads one layer into the content store and unpacks it into its snapshot, in one pass.
    /// The caller holds the layer's locks. Returns the bytes downloaded.
    async fn fetch_layer(
        &self,
        client: &Client,
        target: &Reference,
        layer: LayerRecord,
        ctx: &Ctx,
        req: &PullRequest,
    ) -> Result<u64, ImageError> {
        let desc = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            ..Default::default()
        };
        let sized = client
            .pull_blob_stream(target, &desc)
            .await
            .map_err(|e| ctx.map(e))?;
        let compression = Compression::from_media_type(&layer.media_type).map_err(|_| {
            ImageError::UnsupportedMediaType {
                reference: ctx.reference.clone(),
                what: "layer",
                media_type: layer.media_type.clone(),
            }
        })?;

        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(64);
        let unpacker = {
            let content = self.inner.content.clone();
            let snapshots = self.inner.snapshots.clone();
            let layer = layer.clone();
            let keep_blob = self.inner.options.keep_layer_blobs;
            tokio::task::spawn_blocking(move || {
                let mut src = ChannelReader {
                    rx,
                    cur: Bytes::new(),
                };
                let sink = if keep_blob && !content.exists(&layer.digest) {
                    BlobSink::Store(content.ingest(&layer.digest)?)
                } else {
                    BlobSink::Discard
                };
                unpack_stream(&snapshots, &layer, compression, &mut src, sink)
            })
        };

        let mut stream = sized.stream;
        let mut downloaded = 0u64;
        let mut feed_error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    downloaded += chunk.len() as u64;
                    req.emit(PullEvent::LayerProgress {
                        digest: layer.digest.clone(),
                        downloaded,
                        size: layer.size,
                    });
                    if tx.send(Ok(chunk)).await.is_err() {
                        break; // the unpacker stopped; its error tells why
                    }
                }
                Err(e) => {
                    feed_error = Some(ctx.map_stream(e, &layer.digest));
                    let _ = tx
                        .send(Err(io::Error::other("download of the layer failed")))
                        .await;
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = unpacker.await?;
        if let Some(e) = feed_error {
            return Err(e);
        }
        unpacked?;
        req.emit(PullEvent::LayerDone {
            digest: layer.digest.clone(),
        });
        Ok(downloaded)
    }
}

/// Where the compressed bytes of a layer go while it is unpacked.
pub(super) enum BlobSink {
    /// Into the content store (a download).
    Store(Ingest),
    /// Only hashed: the blob is already a file the caller adopts afterwards (an import).
    Verify(Sha256),
    /// Dropped: the bytes were verified on the way in (oci-client's verifying stream checks
    /// every downloaded blob; a mismatch ends the stream with an error the puller reports).
    Discard,
}

impl BlobSink {
    /// The digest of what went through, when this sink computes one.
    fn digest(&self) -> Option<String> {
        match self {
            BlobSink::Store(i) => Some(i.digest()),
            BlobSink::Verify(h) => Some(format!("sha256:{}", hex::encode(h.clone().finalize()))),
            BlobSink::Discard => None,
        }
    }
}

impl Write for BlobSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlobSink::Store(i) => i.write(buf),
            BlobSink::Verify(h) => {
                h.update(buf);
                Ok(buf.len())
            }
            BlobSink::Discard => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            BlobSink::Store(i) => i.flush(),
            BlobSink::Verify(_) | BlobSink::Discard => Ok(()),
        }
    }
}

/// Reads a layer blob from `src`: hashes it into `sink` and unpacks it (diffID hashed) at once;
/// commits the snapshot (and a stored blob) only if both digests match. Blocking.
pub(super) fn unpack_stream(
    snapshots: &Snapshots,
    layer: &LayerRecord,
    compression: Compression,
    src: &mut dyn Read,
    mut sink: BlobSink,
) -> Result<(), ImageError> {
    let tmp = snapshots.prepare(&layer.diff_id)?;
    let mut tee = TeeReader {
        inner: src,
        out: &mut sink,
    };
    let unpacked = (|| {
        let decoder = compression::decoder(compression, &mut tee)?;
        let mut hashing = HashingReader::new(decoder);
        unpack::unpack_layer(&mut hashing, tmp.dir(), &unpack::UnpackOptions::default())
            .map_err(io::Error::other)?;
        io::copy(&mut hashing, &mut io::sink())?;
        Ok::<_, io::Error>(hashing.digest())
    })();
    // Whatever happened, read the rest so the blob digest covers every byte: a corrupt blob must
    // be reported as a digest mismatch, not as the unpack error its corruption caused.
    let drained = io::copy(&mut tee, &mut io::sink());
    if let Some(actual) = sink.digest()
        && actual != layer.digest
        && drained.is_ok()
    {
        return Err(ImageError::DigestMismatch {
            what: format!("layer blob {}", layer.digest),
            expected: layer.digest.clone(),
            actual,
        });
    }
    let unpack_err = |e: io::Error| ImageError::Unpack {
        digest: layer.digest.clone(),
        source: match e.downcast::<unpack::UnpackError>() {
            Ok(u) => u,
            Err(e) => unpack::UnpackError::Archive {
                entries: 0,
                source: e,
            },
        },
    };
    let diff_id = unpacked.map_err(unpack_err)?;
    drained.map_err(unpack_err)?;
    if diff_id != layer.diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("uncompressed layer {} (diffID)", layer.digest),
            expected: layer.diff_id.clone(),
            actual: diff_id,
        });
    }
    if let BlobSink::Store(ingest) = sink {
        ingest.commit()?;
    }
    tmp.commit()?;
    Ok(())
}

fn auth_of(c: &Credentials) -> RegistryAuth {
    match c {
        Credentials::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Credentials::Bearer { token } => RegistryAuth::Bearer(token.clone()),
    }
}

/// Names the image and registry in every error of one pull.
struct Ctx {
    reference: String,
    registry: String,
}

impl Ctx {
    fn map(&self, e: OciDistributionError) -> ImageError {
        let reference = self.reference.clone();
        let registry = self.registry.clone();
        let reason = e.to_string();
        match &e {
            OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFoundInRegistry {
                reference,
                registry,
                reason,
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    ImageError::NotFoundInRegistry {
                        reference,
                        registry,
                        reason,
                    }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    ImageError::Unauthorized {
                        reference,
                        registry,
                        reason,
                    }
                } else {
                    ImageError::Registry {
                        reference,
                        registry,
                        reason,
                    }
                }
            }
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => ImageError::Unauthorized {
                reference,
                registry,
                reason,
            },
            OciDistributionError::ServerError { code, .. } if *code == 401 || *code == 403 => {
                ImageError::Unauthorized {
                    reference,
                    registry,
                    reason,
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => ImageError::NotFoundInRegistry {
                reference,
                registry,
                reason,
            },
            OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
                ImageError::Unreachable {
                    reference,
                    registry,
                    reason: error_chain(re),
                }
            }
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => ImageError::DigestMismatch {
                what: format!("image {reference} from {registry}"),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            _ => ImageError::Registry {
                reference,
                registry,
                reason,
            },
        }
    }

    fn map_stream(&self, e: io::Error, digest: &str) -> ImageError {
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<DigestError>());
        if let Some(DigestError::VerificationError { expected, actual }) = inner {
            return ImageError::DigestMismatch {
                what: format!("layer blob {digest} from {}", self.registry),
                expected: expected.clone(),
                actual: actual.clone(),
            };
        }
        ImageError::Unreachable {
            reference: self.reference.clone(),
            registry: self.registry.clone(),
            reason: format!("download of layer {digest} broke off: {}", error_chain(&e)),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Fetches the manifest (through an index if needed, choosing linux/amd64) and the config,
/// verifying every digest, and lists the layers with their diffIDs.
async fn resolve(
    client: &Client,
    target: &Reference,
    auth: &RegistryAuth,
    original: &Reference,
    ctx: &Ctx,
) -> Result<Resolved, ImageError> {
    let (bytes, _) = client
        .pull_manifest_raw(target, auth, ACCEPTED)
        .await
        .map_err(|e| ctx.map(e))?;
    let bytes = bytes.to_vec();
    let digest = content::sha256_digest(&bytes);
    if let Some(want) = original.digest()
        && want != digest
    {
        return Err(ImageError::DigestMismatch {
            what: format!("manifest of {}", ctx.reference),
            expected: want.to_owned(),
            actual: digest,
        });
    }
    let parsed = parse_manifest(&bytes, ctx)?;
    let (index, manifest_bytes, manifest_digest, manifest) = if parsed.manifests.is_some() {
        let child = choose_platform(&parsed, ctx)?;
        let child_ref = target.clone_with_digest(child.clone());
        let (child_bytes, _) = client
            .pull_manifest_raw(&child_ref, auth, ACCEPTED)
            .await
            .map_err(|e| ctx.map(e))?;
        let child_bytes = child_bytes.to_vec();
        content::verify(
            &child,
            &child_bytes,
            &format!("manifest of {}", ctx.reference),
        )?;
        let m = parse_manifest(&child_bytes, ctx)?;
        if m.manifests.is_some() {
            return Err(ImageError::Malformed {
                reference: ctx.reference.clone(),
                what: "index",
                reason: "an index entry points at another index".to_owned(),
            });
        }
        (Some((digest, bytes)), child_bytes, child, m)
    } else {
        (None, bytes.clone(), digest, parsed)
    };
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned());
    let (Some(config_desc), Some(layer_descs)) = (manifest.config, manifest.layers) else {
        return Err(ImageError::Malformed {
            reference: ctx.reference.clone(),
            what: "manifest",
            reason: "no config or no layers".to_owned(),
        });
    };
    reference::check_digest(&config_desc.digest)?;
    let mut config = Vec::new();
    let desc = OciDescriptor {
        media_type: config_desc.media_type.clone(),
        digest: config_desc.digest.clone(),
        size: config_desc.size as i64,
        ..Default::default()
    };
    client
        .pull_blob(target, &desc, &mut config)
        .await
        .map_err(|e| ctx.map(e))?;
    content::verify(&config_desc.digest, &config, "image config")?;
    let rootfs: ConfigRootfs =
        serde_json::from_slice(&config).map_err(|e| ImageError::Malformed {
            reference: ctx.reference.clone(),
            what: "config",
            reason: e.to_string(),
        })?;
    let layers = layer_records(&ctx.reference, layer_descs, rootfs.rootfs.diff_ids)?;
    Ok(Resolved {
        manifest: manifest_bytes,
        manifest_digest,
        manifest_media_type: media_type,
        index,
        config,
        config_digest: config_desc.digest,
        layers,
    })
}

/// Pairs manifest layers with the config's diffIDs, checking media types and digests.
fn layer_records(
    reference: &str,
    descs: Vec<Descriptor>,
    diff_ids: Vec<String>,
) -> Result<Vec<LayerRecord>, ImageError> {
    if descs.len() != diff_ids.len() {
        return Err(ImageError::Malformed {
            reference: reference.to_owned(),
            what: "config",
            reason: format!(
                "{} layers in the manifest but {} diff_ids in the config",
                descs.len(),
                diff_ids.len()
            ),
        });
    }
    descs
        .into_iter()
        .zip(diff_ids)
        .map(|(d, diff_id)| {
            reference::check_digest(&d.digest)?;
            reference::check_digest(&diff_id)?;
            Compression::from_media_type(&d.media_type).map_err(|_| {
                ImageError::UnsupportedMediaType {
                    reference: reference.to_owned(),
                    what: "layer",
                    media_type: d.media_type.clone(),
                }
            })?;
            Ok(LayerRecord {
                digest: d.digest,
                diff_id,
                media_type: d.media_type,
                size: d.size,
            })
        })
        .collect()
}

fn parse_manifest(bytes: &[u8], ctx: &Ctx) -> Result<Manifest, ImageError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed {
        reference: ctx.reference.clone(),
        what: "manifest",
        reason: e.to_string(),
    })?;
    if m.schema_version != 2 {
        return Err(ImageError::UnsupportedMediaType {
            reference: ctx.reference.clone(),
            what: "manifest",
            media_type: format!("schemaVersion {}", m.schema_version),
        });
    }
    if let Some(mt) = &m.media_type
        && !ACCEPTED.contains(&mt.as_str())
    {
        return Err(ImageError::UnsupportedMediaType {
            reference: ctx.reference.clone(),
            what: "manifest",
            media_type: mt.clone(),
        });
    }
    Ok(m)
}

fn choose_platform(index: &Manifest, ctx: &Ctx) -> Result<String, ImageError> {
    let entries = index.manifests.as_deref().unwrap_or_default();
    let hit = entries.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    match hit {
        Some(d) => {
            reference::check_digest(&d.digest)?;
            Ok(d.digest.clone())
        }
        None => Err(ImageError::NoMatchingPlatform {
            reference: ctx.reference.clone(),
            available: entries
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A blocking reader over the chunks the async downloader sends.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Copies everything read through it into a writer (the blob being stored).
struct TeeReader<'a, W: Write> {
    inner: &'a mut dyn Read,
    out: &'a mut W,
}

impl<W: Write> Read for TeeReader<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            reference: "r".into(),
            registry: "reg".into(),
        }
    }

    #[test]
    fn index_picks_linux_amd64() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MEDIA_DOCKER_LIST}","manifests":[
            {{"mediaType":"{MEDIA_DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{MEDIA_DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('a'),
            d('b')
        );
        let m = parse_manifest(json.as_bytes(), &ctx()).unwrap();
        assert_eq!(choose_platform(&m, &ctx()).unwrap(), d('b'));
        let arm_only = json.replace("amd64", "s390x");
        let m = parse_manifest(arm_only.as_bytes(), &ctx()).unwrap();
        let e = choose_platform(&m, &ctx()).unwrap_err().to_string();
        assert!(
            e.contains("linux/arm64") && e.contains("linux/s390x"),
            "{e}"
        );
    }

    #[test]
    fn schema1_and_unknown_manifests_are_refused() {
        let e = parse_manifest(br#"{"schemaVersion":1}"#, &ctx()).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedMediaType { .. }));
        let e = parse_manifest(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, &ctx());
        assert!(e.is_err());
        assert!(parse_manifest(b"not json", &ctx()).is_err());
    }

    const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    #[test]
    fn layers_must_match_diff_ids() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let desc = |m: &str| Descriptor {
            media_type: m.into(),
            digest: d('a'),
            size: 3,
            platform: None,
        };
        let e = layer_records("r", vec![desc(GZIP)], vec![]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("1 layers in the manifest but 0")
        );
        let e = layer_records("r", vec![desc("application/x-weird")], vec![d('b')]);
        assert!(matches!(e, Err(ImageError::UnsupportedMediaType { .. })));
        let ok = layer_records("r", vec![desc(GZIP)], vec![d('b')]);
        assert_eq!(ok.unwrap()[0].diff_id, d('b'));
    }
}
