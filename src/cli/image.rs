//! `keel image ...`: the image store for people. Parses flags, calls keel-runtime's ImageStore,
//! prints results. Pull progress is a bar per layer on a terminal, plain lines otherwise.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use keel_runtime::image::{
    Credentials, ImageRecord, ImageStore, PullEvent, PullRequest, RegistryOptions, RemoveMode,
};

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image from a registry (e.g. `busybox`, `127.0.0.1:5000/app:v1`, `repo@sha256:...`).
    Pull(PullArgs),
    /// List images, one a line: reference, id, size.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Print an image's record and config as JSON.
    Inspect {
        /// Image reference, id or id prefix.
        image: String,
    },
    /// Remove images: a tag is untagged (the image goes with its last name); an id removes the
    /// image with all its names.
    #[command(alias = "remove")]
    Rm {
        /// Image references, ids or id prefixes.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Import images from OCI-layout (`oci-archive`) or docker-archive (`docker save`)
    /// tarballs, optionally gzip- or zstd-compressed.
    Import {
        /// Tarballs to import.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Remove unnamed images, then every blob, snapshot and leftover of killed pulls that no
    /// image needs.
    Prune {
        /// Remove every image, not only unnamed ones.
        #[arg(long)]
        all: bool,
    },
}

/// How to reach registries; added to the `[registry]` table of the config file.
#[derive(Args, Debug, Default, Clone)]
pub struct RegistryFlags {
    /// Registry reached over plain HTTP (HOST:PORT). Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure: Vec<String>,
    /// Mirror for a registry: every pull of REGISTRY (e.g. docker.io) tries URL first
    /// (http://HOST:PORT for plain HTTP). Repeatable; tried in order.
    #[arg(long = "registry-mirror", value_name = "REGISTRY=URL")]
    pub mirrors: Vec<String>,
}

impl RegistryFlags {
    /// The config file's registry options with these flags applied on top.
    pub fn apply(&self, base: &RegistryOptions) -> anyhow::Result<RegistryOptions> {
        let mut opts = base.clone();
        opts.insecure.extend(self.insecure.iter().cloned());
        for m in &self.mirrors {
            opts.add_mirror_arg(m)?;
        }
        opts.validate()?;
        Ok(opts)
    }
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference.
    pub image: String,
    #[command(flatten)]
    pub registry: RegistryFlags,
    /// Credentials for the image's registry, as USER:PASSWORD (or set KEEL_REGISTRY_AUTH).
    #[arg(
        long,
        env = "KEEL_REGISTRY_AUTH",
        hide_env_values = true,
        value_name = "USER:PASSWORD"
    )]
    pub creds: Option<String>,
    /// Print only the image id.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print only image ids.
    #[arg(long, short)]
    pub quiet: bool,
    /// Show repo digests too.
    #[arg(long)]
    pub digests: bool,
}

pub fn run(root: &Path, config: &Config, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(async {
        match cmd {
            ImageCommand::Pull(args) => pull(root, config, args).await,
            ImageCommand::Ls(args) => ls(&open(root, config, &config.registry)?, args).await,
            ImageCommand::Inspect { image } => {
                inspect(&open(root, config, &config.registry)?, &image).await
            }
            ImageCommand::Rm { images } => {
                rm(&open(root, config, &config.registry)?, &images).await
            }
            ImageCommand::Import { files } => {
                import(&open(root, config, &config.registry)?, &files).await
            }
            ImageCommand::Prune { all } => prune(&open(root, config, &config.registry)?, all).await,
        }
    })
}

/// The node's image store with the config file's options (and `registry`, which flags may
/// have extended).
pub fn open(
    root: &Path,
    config: &Config,
    registry: &RegistryOptions,
) -> anyhow::Result<ImageStore> {
    ImageStore::open_with(root, registry.clone(), config.images.clone())
        .with_context(|| format!("open image store under {}", root.display()))
}

async fn pull(root: &Path, config: &Config, args: PullArgs) -> anyhow::Result<ExitCode> {
    let opts = args.registry.apply(&config.registry)?;
    let store = open(root, config, &opts)?;
    let mut req = PullRequest::new(&args.image);
    if let Some(c) = &args.creds {
        let (username, password) = c
            .split_once(':')
            .context("--creds: expected USER:PASSWORD")?;
        req.credentials = Some(Credentials::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        });
    }
    let progress = if args.quiet {
        None
    } else if std::io::stdout().is_terminal() {
        Some(Progress::bars())
    } else {
        Some(Progress::lines())
    };
    if let Some(p) = &progress {
        let p = p.clone();
        req = req.progress(move |ev| p.event(ev));
    }
    let report = store.pull(req).await?;
    if let Some(p) = &progress {
        p.finish();
    }
    if args.quiet {
        println!("{}", report.image.id);
    } else {
        println!(
            "pulled {} ({}): {} layers downloaded ({}), {} already present",
            args.image,
            report.image.id,
            report.downloaded_layers,
            human(report.downloaded_bytes),
            report.reused_layers
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Pull progress: one bar per layer on a terminal, one line per finished layer otherwise.
#[derive(Clone)]
struct Progress {
    bars: Option<Arc<MultiProgress>>,
    layers: Arc<Mutex<HashMap<String, ProgressBar>>>,
}

impl Progress {
    fn bars() -> Self {
        Progress {
            bars: Some(Arc::new(MultiProgress::new())),
            layers: Arc::default(),
        }
    }

    fn lines() -> Self {
        Progress {
            bars: None,
            layers: Arc::default(),
        }
    }

    fn event(&self, ev: PullEvent) {
        match (&self.bars, ev) {
            (
                _,
                PullEvent::Resolved {
                    manifest_digest,
                    layers,
                    total_bytes,
                },
            ) => {
                let line = format!(
                    "resolved {manifest_digest}: {layers} layers, {}",
                    human(total_bytes)
                );
                match &self.bars {
                    Some(m) => {
                        let _ = m.println(line);
                    }
                    None => println!("{line}"),
                }
            }
            (None, PullEvent::LayerReused { digest, .. }) => {
                println!("{}: already present", short(&digest))
            }
            (None, PullEvent::LayerDone { digest }) => println!("{}: done", short(&digest)),
            (None, PullEvent::LayerProgress { .. }) => {}
            (Some(m), PullEvent::LayerReused { digest, size }) => {
                let bar = m.add(ProgressBar::new(size));
                bar.set_style(style());
                bar.set_prefix(short(&digest).to_owned());
                bar.finish_with_message("already present");
            }
            (
                Some(m),
                PullEvent::LayerProgress {
                    digest,
                    downloaded,
                    size,
                },
            ) => {
                let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
                let bar = layers.entry(digest.clone()).or_insert_with(|| {
                    let b = m.add(ProgressBar::new(size));
                    b.set_style(style());
                    b.set_prefix(short(&digest).to_owned());
                    b
                });
                bar.set_position(downloaded);
            }
            (Some(_), PullEvent::LayerDone { digest }) => {
                let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = layers.get(&digest) {
                    b.finish_with_message("done");
                }
            }
        }
    }

    fn finish(&self) {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        for b in layers.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The name shown for an image: its tags, else its repo digests, else `<none>`.
fn names(rec: &ImageRecord) -> Vec<String> {
    if !rec.repo_tags.is_empty() {
        rec.repo_tags.clone()
    } else if !rec.repo_digests.is_empty() {
        rec.repo_digests.clone()
    } else {
        vec!["<none>".to_owned()]
    }
}

async fn ls(store: &ImageStore, args: LsArgs) -> anyhow::Result<ExitCode> {
    let images = store.list().await?;
    if args.quiet {
        for rec in &images {
            println!("{}", rec.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<(String, String, String, String)> = images
        .iter()
        .flat_map(|rec| {
            let digest = rec.repo_digests.first().cloned().unwrap_or_default();
            names(rec).into_iter().map(move |n| {
                (
                    n,
                    rec.short_id().to_owned(),
                    human(rec.size),
                    digest.clone(),
                )
            })
        })
        .collect();
    let w = rows
        .iter()
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0)
        .max("REFERENCE".len());
    if args.digests {
        println!(
            "{:<w$}  {:<12}  {:>10}  DIGEST",
            "REFERENCE", "IMAGE ID", "SIZE"
        );
    } else {
        println!("{:<w$}  {:<12}  {:>10}", "REFERENCE", "IMAGE ID", "SIZE");
    }
    for (name, id, size, digest) in rows {
        if args.digests {
            println!("{name:<w$}  {id:<12}  {size:>10}  {digest}");
        } else {
            println!("{name:<w$}  {id:<12}  {size:>10}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect(store: &ImageStore, name: &str) -> anyhow::Result<ExitCode> {
    let rec = store
        .get(name)
        .await?
        .with_context(|| format!("image {name:?} not found on this node"))?;
    let config = store.config(&rec).await?;
    let out = serde_json::json!({ "image": rec, "config": config });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

async fn rm(store: &ImageStore, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for name in names {
        match store.remove(name, RemoveMode::Untag, &HashSet::new()).await {
            Ok(report) => {
                for t in report.untagged {
                    println!("Untagged: {t}");
                }
                for id in report.deleted {
                    println!("Deleted: {id}");
                }
            }
            Err(e) => {
                eprintln!("keel: remove {name}: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

async fn import(store: &ImageStore, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    for f in files {
        let recs = store
            .import(f)
            .await
            .with_context(|| format!("import {}", f.display()))?;
        for rec in recs {
            println!("imported {} ({})", names(&rec).join(", "), rec.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn prune(store: &ImageStore, all: bool) -> anyhow::Result<ExitCode> {
    let r = store.prune(all, &HashSet::new()).await?;
    for id in &r.deleted {
        println!("Deleted: {id}");
    }
    println!(
        "removed {} images, {} blobs, {} snapshots, {} leftovers of interrupted work",
        r.deleted.len(),
        r.blobs_removed,
        r.snapshots_removed,
        r.leftovers_removed
    );
    Ok(ExitCode::SUCCESS)
}
