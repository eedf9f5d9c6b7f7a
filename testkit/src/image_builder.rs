//! The busybox test images: OCI (or Docker schema2) images built from Debian's `busybox-static`,
//! byte-for-byte deterministic (fixed mtimes, owners and compression settings), so their
//! digests are stable across runs on one machine (they change only with the busybox package).
//!
//! Owns the image contents ([`single_expect`], [`multi_expect`], [`big_expect`] list what tests
//! may assert on), their manifests/configs/indexes, and the ways a test gets them to keel:
//! an OCI layout dir, an OCI archive, a `docker save` archive, or a push to a registry
//! (only loopback registries are spoken to over plain HTTP).
//!
//! Manifests, indexes and configs use `oci-client`'s serde types; only the tar entries and the
//! `docker save` bookkeeping (which no maintained crate writes) are done by hand here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, bail};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::config::{Architecture, Config, ConfigFile, History, Os, Rootfs};
use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest, Platform,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// Where the static busybox comes from (Debian's `busybox-static`).
pub const BUSYBOX_SOURCE: &str = "/bin/busybox";
/// mtime of every entry unless stated otherwise, and the images' `created` time.
pub const BASE_MTIME: u64 = 1_700_000_000;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Image `Env` of every variant.
pub const ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "KEEL_TEST=1",
];

/// Applets linked as `/bin/<name> -> busybox` (all present in Debian's busybox-static),
/// separated by spaces; [`applets`] splits them.
pub const APPLETS: &str = "\
    [ ash awk base64 basename cat chmod chown cp cut date dd df dirname du echo env expr \
    false find free grep groups gunzip gzip head hostname httpd id ip kill ln ls md5sum \
    mkdir mkfifo mknod mktemp mount mv nc nproc nslookup pidof ping printf ps pwd readlink \
    realpath rm rmdir sed seq setsid sh sha256sum sleep sort stat sync tail tar tee test \
    timeout top touch tr true umount uname uniq unshare uptime vi wc wget which whoami xargs \
    yes";

/// The names in [`APPLETS`].
pub fn applets() -> impl Iterator<Item = &'static str> {
    APPLETS.split_whitespace()
}

/// What the `Single` image holds (also the first layer of `Multi` and `Big`).
pub mod single_expect {
    /// `/bin/busybox` (0755) plus `/bin/<applet>` symlinks to `busybox` for [`super::applets`].
    pub const BUSYBOX: &str = "/bin/busybox";
    /// Directories: `/bin /dev /proc /sys /etc /home /opt /opt/app /opt/app/old-dir /usr /var
    /// /var/www` are 0755 root; `/root` 0700; `/tmp` 01777; `/home/keel` 0755 owned 1000:1000.
    pub const DIRS: &[&str] = &[
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/etc",
        "/home",
        "/home/keel",
        "/opt",
        "/opt/app",
        "/opt/app/old-dir",
        "/root",
        "/tmp",
        "/usr",
        "/var",
        "/var/www",
    ];
    pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        keel:x:1000:1000:keel:/home/keel:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    pub const GROUP: &str = "root:x:0:\nkeel:x:1000:\nkeelextra:x:2000:keel\nnogroup:x:65534:\n";
    pub const KEEL_UID: u32 = 1000;
    pub const KEEL_GID: u32 = 1000;
    /// `keel` is also a member of `keelextra` (gid 2000).
    pub const SUPPLEMENTARY_GROUP: &str = "keelextra";
    pub const SUPPLEMENTARY_GID: u32 = 2000;
    pub const NOBODY_UID: u32 = 65534;
    pub const MOTD: &str = "/etc/motd";
    pub const MOTD_CONTENT: &str = "keel busybox test image\n";
    pub const INDEX_HTML: &str = "/var/www/index.html";
    pub const INDEX_HTML_CONTENT: &str = "<html><body>hello from keel</body></html>\n";
    /// Removed again by `Multi`'s opaque whiteout of `/opt/app`.
    pub const OLD_FILES: &[&str] = &["/opt/app/old.txt", "/opt/app/old-dir/nested.txt"];
    pub const OLD_CONTENT: &str = "old\n";
    /// Image config: no Entrypoint, `Cmd ["/bin/sh"]`, `User ""`, `WorkingDir "/"`, [`super::ENV`].
    pub const CMD: &[&str] = &["/bin/sh"];
    pub const WORKING_DIR: &str = "/";
}

/// What `Multi` adds on top of the `Single` layer (layer 2 gzip, layer 3 zstd).
pub mod multi_expect {
    /// Deleted in layer 2 by the whiteout `/etc/.wh.motd`.
    pub const DELETED: &str = "/etc/motd";
    /// Replaced in layer 2 by `/opt/app/.wh..wh..opq`: every `single_expect::OLD_FILES` is gone.
    pub const OPAQUE_DIR: &str = "/opt/app";
    pub const NEW_FILE: &str = "/opt/app/new.txt";
    pub const NEW_CONTENT: &str = "new\n";
    /// Hard link to [`NEW_FILE`] (same inode after extraction).
    pub const HARDLINK: &str = "/opt/app/new-hardlink";
    /// Relative symlink `current -> new.txt`.
    pub const SYMLINK: &str = "/opt/app/current";
    pub const SYMLINK_TARGET: &str = "new.txt";
    /// Mode 0640, owned 1000:1000.
    pub const OWNED_FILE: &str = "/home/keel/secret.txt";
    pub const OWNED_CONTENT: &str = "keel secret\n";
    pub const OWNED_MODE: u32 = 0o640;
    pub const OWNED_UID: u32 = 1000;
    pub const OWNED_GID: u32 = 1000;
    /// A file whose mtime differs from every other entry (no xattrs anywhere).
    pub const MTIME_FILE: &str = "/opt/app/stamp";
    pub const MTIME: u64 = 1_000_000_000;
    /// Added by layer 3, zstd-compressed with OCI media types (gzip with Docker media types,
    /// which have no zstd type).
    pub const ZSTD_FILE: &str = "/etc/keel-layer3";
    pub const ZSTD_CONTENT: &str = "from the zstd layer\n";
    pub const LAYERS: usize = 3;
    /// Config: `Entrypoint ["/bin/sh","-c"]`, `Cmd ["echo hello"]`, `User "keel"`,
    /// `WorkingDir "/home/keel"`, `ExposedPorts {"8080/tcp":{}}`, [`super::ENV`]; history has an
    /// extra `empty_layer` entry after the first layer.
    pub const ENTRYPOINT: &[&str] = &["/bin/sh", "-c"];
    pub const CMD: &[&str] = &["echo hello"];
    pub const USER: &str = "keel";
    pub const WORKING_DIR: &str = "/home/keel";
    pub const EXPOSED_PORT: &str = "8080/tcp";
}

/// What `Big` adds on top of the `Single` layer: [`big_expect::EXTRA_LAYERS`] gzip layers, each
/// with `/data/random-<i>.bin` (seeded pseudo-random, incompressible) and `/data/text-<i>.txt`.
/// Config as `Single`.
pub mod big_expect {
    pub const EXTRA_LAYERS: usize = 4;
    pub const RANDOM_BYTES: usize = 11 * 1024 * 1024 + 512 * 1024;
    pub const TEXT_BYTES: usize = 4 * 1024 * 1024;
}

/// Which image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One gzip layer: busybox, users, a web root. See [`single_expect`].
    Single,
    /// Three layers with whiteouts, an opaque dir, links, ownership and a zstd layer. See
    /// [`multi_expect`].
    Multi,
    /// ~50 MiB compressed over five layers, for benchmarks. See [`big_expect`].
    Big,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Single => "single",
            Variant::Multi => "multi",
            Variant::Big => "big",
        }
    }
}

/// Which family of media types the manifest, config and layers carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MediaTypes {
    /// OCI image-spec types (manifest, index, `tar+gzip`/`tar+zstd`).
    #[default]
    Oci,
    /// Docker schema2 (manifest v2, manifest list, `rootfs.diff.tar.gzip`).
    Docker,
}

/// One layer as it appears in the manifest and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the compressed blob.
    pub digest: String,
    /// Digest of the uncompressed tar (`rootfs.diff_ids`).
    pub diff_id: String,
    pub media_type: String,
    /// Size of the compressed blob.
    pub size: u64,
}

/// A built image: its manifest, config and blobs, in memory.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub variant: Variant,
    pub media_types: MediaTypes,
    pub manifest_media_type: String,
    pub manifest_digest: String,
    pub manifest_json: Vec<u8>,
    pub config_media_type: String,
    pub config_digest: String,
    pub config_json: Vec<u8>,
    pub layers: Vec<LayerInfo>,
    /// Config and layer blobs by digest.
    blobs: BTreeMap<String, Vec<u8>>,
}

/// An image index (OCI) or manifest list (Docker) over a [`BuiltImage`] (linux/amd64) and a
/// decoy linux/arm64 image, listed first so "take the first entry" picks the wrong one.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub media_type: String,
    pub digest: String,
    pub json: Vec<u8>,
    /// The linux/amd64 entry: the image the index was made from.
    pub amd64_digest: String,
    /// The linux/arm64/v8 decoy: config architecture arm64, one layer holding only
    /// [`ARM64_DECOY_FILE`].
    pub arm64: BuiltImage,
}

/// The only file in the arm64 decoy image.
pub const ARM64_DECOY_FILE: &str = "/ARM64-DECOY";

/// Builds `variant` with OCI media types.
pub fn build(variant: Variant) -> anyhow::Result<BuiltImage> {
    build_with(variant, MediaTypes::Oci)
}

/// Builds `variant` with the given media types.
pub fn build_with(variant: Variant, media_types: MediaTypes) -> anyhow::Result<BuiltImage> {
    let base = base_layer()?;
    let (steps, config) = match variant {
        Variant::Single => (
            vec![Step::layer(
                base,
                false,
                "keel-testkit: busybox-static base",
            )],
            single_config(),
        ),
        Variant::Multi => (
            vec![
                Step::layer(base, false, "keel-testkit: busybox-static base"),
                Step::Empty("keel-testkit: ENV KEEL_TEST=1"),
                Step::layer(
                    multi_layer2()?,
                    false,
                    "keel-testkit: whiteouts, links, owners",
                ),
                Step::layer(multi_layer3()?, true, "keel-testkit: zstd layer"),
            ],
            multi_config(),
        ),
        Variant::Big => {
            let mut steps = vec![Step::layer(
                base,
                false,
                "keel-testkit: busybox-static base",
            )];
            for i in 0..big_expect::EXTRA_LAYERS {
                steps.push(Step::layer(big_layer(i)?, false, "keel-testkit: bulk data"));
            }
            (steps, single_config())
        }
    };
    assemble(variant, media_types, Architecture::Amd64, steps, config)
}

/// Like [`build_with`], but built once per process and shared (Big takes seconds to build).
pub fn build_cached(variant: Variant, media_types: MediaTypes) -> anyhow::Result<Arc<BuiltImage>> {
    type Cache = Mutex<HashMap<(Variant, MediaTypes), Arc<BuiltImage>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    // Held while building so two tests never build the same Big image at once; a poisoned lock
    // only means a build panicked, the map is still consistent.
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(img) = cache.get(&(variant, media_types)) {
        return Ok(Arc::clone(img));
    }
    let img = Arc::new(build_with(variant, media_types)?);
    cache.insert((variant, media_types), Arc::clone(&img));
    Ok(img)
}

impl BuiltImage {
    /// A config or layer blob by digest.
    pub fn blob(&self, digest: &str) -> Option<&[u8]> {
        self.blobs.get(digest).map(Vec::as_slice)
    }

    /// The uncompressed tar of layer `index`.
    pub fn layer_tar(&self, index: usize) -> anyhow::Result<Vec<u8>> {
        let layer = self
            .layers
            .get(index)
            .with_context(|| format!("image has no layer {index}"))?;
        let blob = self
            .blob(&layer.digest)
            .with_context(|| format!("blob {} missing", layer.digest))?;
        decompress(blob, &layer.media_type)
    }

    /// Writes an OCI image layout (`oci-layout`, `index.json` naming the manifest `ref_name`,
    /// `blobs/sha256/*`) into `dir`, creating it.
    pub fn write_oci_layout(&self, dir: &Path, ref_name: &str) -> anyhow::Result<()> {
        let blob_dir = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blob_dir)
            .with_context(|| format!("create {}", blob_dir.display()))?;
        for (name, data) in self.layout_files(ref_name)? {
            let path = dir.join(&name);
            std::fs::write(&path, data).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }

    /// Writes the OCI image layout as one tar file (what `oci-archive:` transports read).
    pub fn write_oci_archive(&self, path: &Path, ref_name: &str) -> anyhow::Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut tar = Tar::new(std::io::BufWriter::new(file));
        tar.dir("blobs", 0o755, (0, 0))?;
        tar.dir("blobs/sha256", 0o755, (0, 0))?;
        for (name, data) in self.layout_files(ref_name)? {
            tar.file(&name, 0o644, (0, 0), BASE_MTIME, &data)?;
        }
        tar.finish()
            .and_then(|mut w| w.flush().map_err(Into::into))
            .with_context(|| format!("write {}", path.display()))
    }

    /// Writes a `docker save` archive: `manifest.json`, `<config hex>.json`, one
    /// `<id>/layer.tar` (uncompressed) per layer with `VERSION` and `json`, and `repositories`.
    /// `repo_tag` is `name[:tag]` (tag defaults to `latest`).
    pub fn write_docker_archive(&self, path: &Path, repo_tag: &str) -> anyhow::Result<()> {
        let (repo, tag) = split_repo_tag(repo_tag);
        let config_hex = hex_of(&self.config_digest);
        let file =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut tar = Tar::new(std::io::BufWriter::new(file));
        let config_name = format!("{config_hex}.json");
        tar.file(&config_name, 0o644, (0, 0), BASE_MTIME, &self.config_json)?;
        let mut parent: Option<String> = None;
        let mut layer_paths = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            // docker's v1 layer ids chain the parent id with the diff id; any unique hex works.
            let id = hex::encode(Sha256::digest(
                format!("{}\n{}", parent.as_deref().unwrap_or(""), layer.diff_id).as_bytes(),
            ));
            let v1 = serde_json::to_vec(&V1Json {
                id: &id,
                parent: parent.as_deref(),
            })?;
            tar.dir(&id, 0o755, (0, 0))?;
            tar.file(&format!("{id}/VERSION"), 0o644, (0, 0), BASE_MTIME, b"1.0")?;
            tar.file(&format!("{id}/json"), 0o644, (0, 0), BASE_MTIME, &v1)?;
            let tar_bytes = self.layer_tar(i)?;
            tar.file(
                &format!("{id}/layer.tar"),
                0o644,
                (0, 0),
                BASE_MTIME,
                &tar_bytes,
            )?;
            layer_paths.push(format!("{id}/layer.tar"));
            parent = Some(id);
        }
        let repo_tags = vec![format!("{repo}:{tag}")];
        let manifest = serde_json::to_vec(&[DockerSaveManifest {
            config: &config_name,
            repo_tags: &repo_tags,
            layers: &layer_paths,
        }])?;
        tar.file("manifest.json", 0o644, (0, 0), BASE_MTIME, &manifest)?;
        if let Some(top) = &parent {
            let repositories: BTreeMap<&str, BTreeMap<&str, &str>> =
                BTreeMap::from([(repo, BTreeMap::from([(tag, top.as_str())]))]);
            let repositories = serde_json::to_vec(&repositories)?;
            tar.file("repositories", 0o644, (0, 0), BASE_MTIME, &repositories)?;
        }
        tar.finish()
            .and_then(|mut w| w.flush().map_err(Into::into))
            .with_context(|| format!("write {}", path.display()))
    }

    /// Pushes blobs (skipping those the registry has) and then these exact manifest bytes as
    /// `host/repository:tag`, so the registry's digest equals [`Self::manifest_digest`].
    /// Loopback hosts (`127.*`, `localhost`, `[::1]`) are spoken to over plain HTTP, others HTTPS.
    pub async fn push(
        &self,
        host: &str,
        repository: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        let client = client_for(host);
        let reference = Reference::with_tag(host.into(), repository.into(), tag.into());
        client
            .store_auth_if_needed(reference.resolve_registry(), &registry_auth(auth))
            .await;
        self.push_with(&client, &reference).await
    }

    /// Pushes this image, the arm64 decoy (by digest) and an index over both (OCI index for OCI
    /// media types, Docker manifest list for Docker ones) tagged `host/repository:tag`.
    pub async fn push_index(
        &self,
        host: &str,
        repository: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> anyhow::Result<BuiltIndex> {
        let index = self.index()?;
        let client = client_for(host);
        let by_digest = |d: &str| Reference::with_digest(host.into(), repository.into(), d.into());
        client
            .store_auth_if_needed(host, &registry_auth(auth))
            .await;
        self.push_with(&client, &by_digest(&self.manifest_digest))
            .await?;
        index
            .arm64
            .push_with(&client, &by_digest(&index.arm64.manifest_digest))
            .await?;
        let reference = Reference::with_tag(host.into(), repository.into(), tag.into());
        client
            .push_manifest_raw(&reference, index.json.clone(), parse_mt(&index.media_type)?)
            .await
            .with_context(|| format!("push index {} to {reference}", index.digest))?;
        Ok(index)
    }

    /// The index [`Self::push_index`] pushes, without pushing it.
    pub fn index(&self) -> anyhow::Result<BuiltIndex> {
        let arm64 = assemble(
            self.variant,
            self.media_types,
            Architecture::ARM64,
            vec![Step::layer(
                decoy_layer()?,
                false,
                "keel-testkit: arm64 decoy",
            )],
            single_config(),
        )?;
        let entry = |img: &BuiltImage, architecture, variant: Option<&str>| ImageIndexEntry {
            media_type: img.manifest_media_type.clone(),
            digest: img.manifest_digest.clone(),
            size: img.manifest_json.len() as i64,
            platform: Some(Platform {
                architecture,
                os: Os::Linux,
                os_version: None,
                os_features: None,
                variant: variant.map(str::to_owned),
                features: None,
            }),
            annotations: None,
            artifact_type: None,
        };
        let media_type = match self.media_types {
            MediaTypes::Oci => OCI_INDEX,
            MediaTypes::Docker => DOCKER_MANIFEST_LIST,
        };
        let json = serde_json::to_vec(&OciImageIndex {
            schema_version: 2,
            media_type: Some(media_type.to_owned()),
            manifests: vec![
                entry(&arm64, Architecture::ARM64, Some("v8")),
                entry(self, Architecture::Amd64, None),
            ],
            artifact_type: None,
            annotations: None,
        })?;
        Ok(BuiltIndex {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&json),
            json,
            amd64_digest: self.manifest_digest.clone(),
            arm64,
        })
    }

    async fn push_with(&self, client: &Client, reference: &Reference) -> anyhow::Result<()> {
        for (digest, data) in &self.blobs {
            let exists = client
                .blob_exists(reference, digest)
                .await
                .with_context(|| format!("HEAD blob {digest} in {reference}"))?;
            if !exists {
                client
                    .push_blob(reference, data.clone(), digest)
                    .await
                    .with_context(|| format!("push blob {digest} to {reference}"))?;
            }
        }
        client
            .push_manifest_raw(
                reference,
                self.manifest_json.clone(),
                parse_mt(&self.manifest_media_type)?,
            )
            .await
            .with_context(|| format!("push manifest {} to {reference}", self.manifest_digest))?;
        Ok(())
    }

    /// `(path relative to the layout root, content)` of every file of the OCI layout.
    fn layout_files(&self, ref_name: &str) -> anyhow::Result<Vec<(String, Cow<'_, [u8]>)>> {
        let index = serde_json::to_vec(&OciImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_owned()),
            manifests: vec![ImageIndexEntry {
                media_type: self.manifest_media_type.clone(),
                digest: self.manifest_digest.clone(),
                size: self.manifest_json.len() as i64,
                platform: None,
                annotations: Some(BTreeMap::from([(
                    "org.opencontainers.image.ref.name".to_owned(),
                    ref_name.to_owned(),
                )])),
                artifact_type: None,
            }],
            artifact_type: None,
            annotations: None,
        })?;
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                Cow::Borrowed(&br#"{"imageLayoutVersion":"1.0.0"}"#[..]),
            ),
            ("index.json".to_owned(), Cow::Owned(index)),
            (
                format!("blobs/sha256/{}", hex_of(&self.manifest_digest)),
                Cow::Borrowed(&self.manifest_json[..]),
            ),
        ];
        for (digest, data) in &self.blobs {
            files.push((
                format!("blobs/sha256/{}", hex_of(digest)),
                Cow::Borrowed(&data[..]),
            ));
        }
        Ok(files)
    }
}

/// One history entry of an image: a layer (uncompressed tar) or a config-only step.
enum Step {
    Layer {
        tar: Vec<u8>,
        zstd: bool,
        created_by: &'static str,
    },
    Empty(&'static str),
}

impl Step {
    fn layer(tar: Vec<u8>, zstd: bool, created_by: &'static str) -> Step {
        Step::Layer {
            tar,
            zstd,
            created_by,
        }
    }
}

fn assemble(
    variant: Variant,
    media_types: MediaTypes,
    architecture: Architecture,
    steps: Vec<Step>,
    config: Config,
) -> anyhow::Result<BuiltImage> {
    let created = chrono::DateTime::from_timestamp(BASE_MTIME as i64, 0)
        .context("BASE_MTIME is not a valid timestamp")?;
    let (manifest_media_type, config_media_type) = match media_types {
        MediaTypes::Oci => (OCI_MANIFEST, OCI_CONFIG),
        MediaTypes::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
    };
    let mut blobs = BTreeMap::new();
    let mut layers = Vec::new();
    let mut history = Vec::new();
    for step in steps {
        let (created_by, empty_layer) = match step {
            Step::Empty(created_by) => (created_by, Some(true)),
            Step::Layer {
                tar,
                zstd,
                created_by,
            } => {
                let (data, media_type) = match (media_types, zstd) {
                    (MediaTypes::Oci, true) => (zstd_compress(&tar)?, OCI_LAYER_ZSTD),
                    (MediaTypes::Oci, false) => (gzip(&tar)?, OCI_LAYER_GZIP),
                    (MediaTypes::Docker, _) => (gzip(&tar)?, DOCKER_LAYER_GZIP),
                };
                let digest = sha256_digest(&data);
                layers.push(LayerInfo {
                    digest: digest.clone(),
                    diff_id: sha256_digest(&tar),
                    media_type: media_type.to_owned(),
                    size: data.len() as u64,
                });
                blobs.insert(digest, data);
                (created_by, None)
            }
        };
        history.push(History {
            created: Some(created),
            author: None,
            created_by: Some(created_by.to_owned()),
            comment: None,
            empty_layer,
        });
    }
    let config_json = serde_json::to_vec(&ConfigFile {
        created: Some(created),
        author: Some("keel-testkit".to_owned()),
        architecture,
        os: Os::Linux,
        config: Some(config),
        rootfs: Rootfs {
            r#type: "layers".to_owned(),
            diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        history: Some(history),
    })
    .context("serialize image config")?;
    let config_digest = sha256_digest(&config_json);
    let descriptor = |media_type: &str, digest: &str, size: u64| OciDescriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size: size as i64,
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let manifest_json = serde_json::to_vec(&OciImageManifest {
        schema_version: 2,
        media_type: Some(manifest_media_type.to_owned()),
        config: descriptor(config_media_type, &config_digest, config_json.len() as u64),
        layers: layers
            .iter()
            .map(|l| descriptor(&l.media_type, &l.digest, l.size))
            .collect(),
        subject: None,
        artifact_type: None,
        annotations: None,
    })
    .context("serialize image manifest")?;
    blobs.insert(config_digest.clone(), config_json.clone());
    Ok(BuiltImage {
        variant,
        media_types,
        manifest_media_type: manifest_media_type.to_owned(),
        manifest_digest: sha256_digest(&manifest_json),
        manifest_json,
        config_media_type: config_media_type.to_owned(),
        config_digest,
        config_json,
        layers,
        blobs,
    })
}

fn strings(items: &[&str]) -> Option<Vec<String>> {
    Some(items.iter().map(|s| (*s).to_owned()).collect())
}

fn single_config() -> Config {
    Config {
        user: Some(String::new()),
        env: strings(ENV),
        cmd: strings(single_expect::CMD),
        working_dir: Some(single_expect::WORKING_DIR.to_owned()),
        ..Config::default()
    }
}

fn multi_config() -> Config {
    Config {
        user: Some(multi_expect::USER.to_owned()),
        exposed_ports: Some([multi_expect::EXPOSED_PORT.to_owned()].into()),
        env: strings(ENV),
        entrypoint: strings(multi_expect::ENTRYPOINT),
        cmd: strings(multi_expect::CMD),
        working_dir: Some(multi_expect::WORKING_DIR.to_owned()),
        ..Config::default()
    }
}

const ROOT: (u64, u64) = (0, 0);
const KEEL: (u64, u64) = (1000, 1000);

/// Layer 1 of every variant; see [`single_expect`].
fn base_layer() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX_SOURCE)
        .with_context(|| format!("read {BUSYBOX_SOURCE} (apt-get install busybox-static)"))?;
    let mut t = Tar::new(Vec::new());
    t.dir("bin", 0o755, ROOT)?;
    t.file("bin/busybox", 0o755, ROOT, BASE_MTIME, &busybox)?;
    for applet in applets() {
        t.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    for d in ["dev", "proc", "sys", "etc"] {
        t.dir(d, 0o755, ROOT)?;
    }
    t.file(
        "etc/passwd",
        0o644,
        ROOT,
        BASE_MTIME,
        single_expect::PASSWD.as_bytes(),
    )?;
    t.file(
        "etc/group",
        0o644,
        ROOT,
        BASE_MTIME,
        single_expect::GROUP.as_bytes(),
    )?;
    t.file(
        "etc/motd",
        0o644,
        ROOT,
        BASE_MTIME,
        single_expect::MOTD_CONTENT.as_bytes(),
    )?;
    t.dir("home", 0o755, ROOT)?;
    t.dir("home/keel", 0o755, KEEL)?;
    t.dir("opt", 0o755, ROOT)?;
    t.dir("opt/app", 0o755, ROOT)?;
    let old = single_expect::OLD_CONTENT.as_bytes();
    t.file("opt/app/old.txt", 0o644, ROOT, BASE_MTIME, old)?;
    t.dir("opt/app/old-dir", 0o755, ROOT)?;
    t.file("opt/app/old-dir/nested.txt", 0o644, ROOT, BASE_MTIME, old)?;
    t.dir("root", 0o700, ROOT)?;
    t.dir("tmp", 0o1777, ROOT)?;
    t.dir("usr", 0o755, ROOT)?;
    t.dir("var", 0o755, ROOT)?;
    t.dir("var/www", 0o755, ROOT)?;
    let html = single_expect::INDEX_HTML_CONTENT.as_bytes();
    t.file("var/www/index.html", 0o644, ROOT, BASE_MTIME, html)?;
    t.finish()
}

/// `Multi` layer 2; see [`multi_expect`].
fn multi_layer2() -> anyhow::Result<Vec<u8>> {
    use multi_expect as m;
    let mut t = Tar::new(Vec::new());
    t.dir("etc", 0o755, ROOT)?;
    t.file("etc/.wh.motd", 0o644, ROOT, BASE_MTIME, b"")?;
    t.dir("home", 0o755, ROOT)?;
    t.dir("home/keel", 0o755, KEEL)?;
    t.file(
        &rel(m::OWNED_FILE),
        m::OWNED_MODE,
        KEEL,
        BASE_MTIME,
        m::OWNED_CONTENT.as_bytes(),
    )?;
    t.dir("opt", 0o755, ROOT)?;
    t.dir("opt/app", 0o755, ROOT)?;
    t.file("opt/app/.wh..wh..opq", 0o644, ROOT, BASE_MTIME, b"")?;
    t.file(
        &rel(m::NEW_FILE),
        0o644,
        ROOT,
        BASE_MTIME,
        m::NEW_CONTENT.as_bytes(),
    )?;
    t.hardlink(&rel(m::HARDLINK), &rel(m::NEW_FILE))?;
    t.symlink(&rel(m::SYMLINK), m::SYMLINK_TARGET)?;
    t.file(&rel(m::MTIME_FILE), 0o644, ROOT, m::MTIME, b"stamp\n")?;
    t.finish()
}

/// `Multi` layer 3 (the zstd one).
fn multi_layer3() -> anyhow::Result<Vec<u8>> {
    let mut t = Tar::new(Vec::new());
    t.dir("etc", 0o755, ROOT)?;
    let content = multi_expect::ZSTD_CONTENT.as_bytes();
    t.file(
        &rel(multi_expect::ZSTD_FILE),
        0o644,
        ROOT,
        BASE_MTIME,
        content,
    )?;
    t.finish()
}

/// `Big` extra layer `i`: seeded random bytes plus compressible text.
fn big_layer(i: usize) -> anyhow::Result<Vec<u8>> {
    let mut rng = SplitMix64(0x6b65_656c_0000_0000 + i as u64);
    let mut random = vec![0u8; big_expect::RANDOM_BYTES];
    for chunk in random.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    const WORDS: &[&str] = &[
        "keel",
        "container",
        "layer",
        "snapshot",
        "overlay",
        "registry",
        "digest",
        "manifest",
        "pod",
        "sandbox",
        "network",
        "proxy",
        "cluster",
        "node",
        "image",
        "busybox",
    ];
    let mut text = String::with_capacity(big_expect::TEXT_BYTES + 128);
    let mut line = 0u64;
    while text.len() < big_expect::TEXT_BYTES {
        text.push_str(&format!("{line:08} "));
        for _ in 0..10 {
            let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            text.push_str(w);
            text.push(' ');
        }
        text.push('\n');
        line += 1;
    }
    text.truncate(big_expect::TEXT_BYTES);
    let mut t = Tar::new(Vec::new());
    t.dir("data", 0o755, ROOT)?;
    t.file(
        &format!("data/random-{i}.bin"),
        0o644,
        ROOT,
        BASE_MTIME,
        &random,
    )?;
    t.file(
        &format!("data/text-{i}.txt"),
        0o644,
        ROOT,
        BASE_MTIME,
        text.as_bytes(),
    )?;
    t.finish()
}

fn decoy_layer() -> anyhow::Result<Vec<u8>> {
    let mut t = Tar::new(Vec::new());
    let content = b"linux/arm64 decoy: a runtime on amd64 must not pick this\n";
    t.file(&rel(ARM64_DECOY_FILE), 0o644, ROOT, BASE_MTIME, content)?;
    t.finish()
}

/// `/a/b` -> `a/b`: tar entries are relative to the rootfs.
fn rel(path: &str) -> String {
    path.trim_start_matches('/').to_owned()
}

/// Sebastiano Vigna's SplitMix64: a fixed, documented sequence, unlike `rand`'s `StdRng`,
/// whose algorithm may change between releases (and with it the Big image's digests).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A tar writer whose headers carry only what we set (GNU format, no user/group names).
struct Tar<W: Write>(tar::Builder<W>);

impl<W: Write> Tar<W> {
    fn new(w: W) -> Self {
        Tar(tar::Builder::new(w))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: (u64, u64), mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    fn dir(&mut self, path: &str, mode: u32, owner: (u64, u64)) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner, BASE_MTIME);
        self.0
            .append_data(&mut h, path, std::io::empty())
            .with_context(|| format!("tar: add dir {path}"))
    }

    fn file(
        &mut self,
        path: &str,
        mode: u32,
        owner: (u64, u64),
        mtime: u64,
        data: &[u8],
    ) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, owner, mtime);
        h.set_size(data.len() as u64);
        self.0
            .append_data(&mut h, path, data)
            .with_context(|| format!("tar: add file {path}"))
    }

    fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, ROOT, BASE_MTIME);
        self.0
            .append_link(&mut h, path, target)
            .with_context(|| format!("tar: add symlink {path} -> {target}"))
    }

    fn hardlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, ROOT, BASE_MTIME);
        self.0
            .append_link(&mut h, path, target)
            .with_context(|| format!("tar: add hardlink {path} -> {target}"))
    }

    fn finish(self) -> anyhow::Result<W> {
        self.0.into_inner().context("tar: finish archive")
    }
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    // GzBuilder's header has mtime 0 and no file name: the output depends on the input only.
    let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    enc.write_all(data).context("gzip layer")?;
    enc.finish().context("gzip layer")
}

fn zstd_compress(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    zstd::stream::encode_all(data, 3).context("zstd layer")
}

fn decompress(blob: &[u8], media_type: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    if media_type.ends_with("zstd") {
        zstd::stream::read::Decoder::new(blob)
            .and_then(|mut d| d.read_to_end(&mut out))
            .with_context(|| format!("unzstd {media_type} layer"))?;
    } else if media_type.ends_with("gzip") {
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut out)
            .with_context(|| format!("gunzip {media_type} layer"))?;
    } else {
        bail!("unknown layer media type {media_type}");
    }
    Ok(out)
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// `name[:tag]` -> `(name, tag)`; a `:` before the last `/` belongs to a registry port.
fn split_repo_tag(repo_tag: &str) -> (&str, &str) {
    match repo_tag.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (repo_tag, "latest"),
    }
}

/// Whether `host` (`name[:port]`) names this machine, so plain HTTP is acceptable.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn client_for(host: &str) -> Client {
    let insecure = if is_loopback_host(host) {
        vec![host.to_owned()]
    } else {
        Vec::new()
    };
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        ..ClientConfig::default()
    })
}

fn registry_auth(auth: Option<(&str, &str)>) -> RegistryAuth {
    match auth {
        Some((user, pass)) => RegistryAuth::Basic(user.to_owned(), pass.to_owned()),
        None => RegistryAuth::Anonymous,
    }
}

fn parse_mt<T: std::str::FromStr>(media_type: &str) -> anyhow::Result<T> {
    media_type
        .parse()
        .map_err(|_| anyhow::anyhow!("media type {media_type:?} is not a valid header value"))
}

/// `<id>/json` of a `docker save` archive (only what loaders read).
#[derive(serde::Serialize)]
struct V1Json<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a str>,
}

/// One entry of a `docker save` `manifest.json`.
#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveManifest<'a> {
    config: &'a str,
    repo_tags: &'a [String],
    layers: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, u32, u64, u64, String)> {
        let mut ar = tar::Archive::new(tar_bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn single_is_deterministic_and_consistent() {
        let a = build(Variant::Single).unwrap();
        let b = build(Variant::Single).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.manifest_digest, sha256_digest(&a.manifest_json));
        assert_eq!(a.config_digest, sha256_digest(&a.config_json));
        assert_eq!(a.layers.len(), 1);
        let tar = a.layer_tar(0).unwrap();
        assert_eq!(a.layers[0].diff_id, sha256_digest(&tar));
        assert_eq!(a.layers[0].media_type, OCI_LAYER_GZIP);
        let cfg: serde_json::Value = serde_json::from_slice(&a.config_json).unwrap();
        assert_eq!(cfg["architecture"], "amd64");
        assert_eq!(cfg["os"], "linux");
        assert_eq!(cfg["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
        assert_eq!(cfg["config"]["User"], "");
        assert!(cfg["config"].get("Entrypoint").is_none());
        assert_eq!(cfg["rootfs"]["diff_ids"][0], a.layers[0].diff_id.as_str());
        let names: Vec<_> = entries(&tar).into_iter().map(|e| e.0).collect();
        for want in [
            "bin/busybox",
            "bin/sh",
            "etc/passwd",
            "var/www/index.html",
            "tmp",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing");
        }
    }

    #[test]
    fn multi_layers_carry_whiteouts_links_and_zstd() {
        let img = build(Variant::Multi).unwrap();
        let single = build(Variant::Single).unwrap();
        assert_eq!(img.layers.len(), multi_expect::LAYERS);
        assert_eq!(img.layers[0], single.layers[0], "base layer is shared");
        assert_eq!(img.layers[2].media_type, OCI_LAYER_ZSTD);
        let l2 = entries(&img.layer_tar(1).unwrap());
        let find = |p: &str| l2.iter().find(|e| e.0 == p).unwrap().clone();
        assert_eq!(find("etc/.wh.motd").1, tar::EntryType::Regular);
        find("opt/app/.wh..wh..opq");
        let link = find("opt/app/new-hardlink");
        assert_eq!(
            (link.1, link.5.as_str()),
            (tar::EntryType::Link, "opt/app/new.txt")
        );
        let sym = find("opt/app/current");
        assert_eq!(
            (sym.1, sym.5.as_str()),
            (tar::EntryType::Symlink, "new.txt")
        );
        let owned = find("home/keel/secret.txt");
        assert_eq!((owned.2, owned.3), (0o640, 1000));
        assert_eq!(find("opt/app/stamp").4, multi_expect::MTIME);
        let l3 = entries(&img.layer_tar(2).unwrap());
        assert!(l3.iter().any(|e| e.0 == "etc/keel-layer3"));
        let cfg: serde_json::Value = serde_json::from_slice(&img.config_json).unwrap();
        assert_eq!(cfg["config"]["User"], "keel");
        assert_eq!(
            cfg["config"]["ExposedPorts"],
            serde_json::json!({"8080/tcp": {}})
        );
        assert_eq!(cfg["history"].as_array().unwrap().len(), 4);
        assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn docker_media_types_and_index() {
        let img = build_with(Variant::Multi, MediaTypes::Docker).unwrap();
        assert_eq!(img.manifest_media_type, DOCKER_MANIFEST);
        assert!(img.layers.iter().all(|l| l.media_type == DOCKER_LAYER_GZIP));
        let m: serde_json::Value = serde_json::from_slice(&img.manifest_json).unwrap();
        assert_eq!(m["config"]["mediaType"], DOCKER_CONFIG);
        let index = img.index().unwrap();
        assert_eq!(index.media_type, DOCKER_MANIFEST_LIST);
        let v: serde_json::Value = serde_json::from_slice(&index.json).unwrap();
        assert_eq!(v["manifests"][0]["platform"]["architecture"], "arm64");
        assert_eq!(v["manifests"][1]["digest"], img.manifest_digest.as_str());
        assert_eq!(v["manifests"][1]["platform"]["os"], "linux");
    }

    #[test]
    fn layout_and_archives_are_written() {
        let img = build(Variant::Single).unwrap();
        let dir = tempfile::tempdir().unwrap();
        img.write_oci_layout(&dir.path().join("layout"), "latest")
            .unwrap();
        let index = std::fs::read(dir.path().join("layout/index.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(v["manifests"][0]["digest"], img.manifest_digest.as_str());
        let blob = dir
            .path()
            .join("layout/blobs/sha256")
            .join(hex_of(&img.manifest_digest));
        assert_eq!(std::fs::read(blob).unwrap(), img.manifest_json);

        let archive = dir.path().join("img.tar");
        img.write_docker_archive(&archive, "busybox:t1").unwrap();
        let bytes = std::fs::read(&archive).unwrap();
        let names: Vec<_> = entries(&bytes).into_iter().map(|e| e.0).collect();
        assert!(names.iter().any(|n| n == "manifest.json"));
        assert!(names.iter().any(|n| n == "repositories"));
        assert!(names.iter().any(|n| n.ends_with("/layer.tar")));
    }

    #[test]
    fn hosts_and_tags() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("registry.example:5000"));
        assert!(!is_loopback_host("10.0.0.1"));
        assert_eq!(split_repo_tag("busybox:1"), ("busybox", "1"));
        assert_eq!(split_repo_tag("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_repo_tag("h:5000/busybox"),
            ("h:5000/busybox", "latest")
        );
    }
}
