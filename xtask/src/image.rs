//! `cargo xtask image busybox`: builds the busybox test images (`keel_testkit::image_builder`)
//! and writes them as an OCI layout, OCI archive or docker archive, or pushes them to a
//! registry. Parses flags and dispatches only; what an image contains lives in the testkit.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel_testkit::image_builder::{self, MediaTypes, Variant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantArg {
    /// One layer: busybox, users keel/nobody, /var/www.
    Single,
    /// Three layers: whiteouts, opaque dir, links, owners, a zstd layer.
    Multi,
    /// ~50 MiB over five layers, for benchmarks.
    Big,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MediaTypesArg {
    Oci,
    Docker,
}

/// Flags of `cargo xtask image busybox` (the subcommand names the image). With no output flag,
/// writes an OCI layout to target/images/busybox-<variant>.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[arg(long, value_enum, default_value = "single")]
    pub variant: VariantArg,
    /// Media types of manifest, config and layers (docker = schema2; zstd layers become gzip).
    #[arg(long, value_enum, default_value = "oci")]
    pub media_types: MediaTypesArg,
    /// Push to REF (`host[:port]/repo[:tag]`); loopback hosts are spoken to over plain HTTP.
    #[arg(long, value_name = "REF")]
    pub push: Option<String>,
    /// With --push: push an index (linux/amd64 + an arm64 decoy) under the tag instead.
    #[arg(long, requires = "push")]
    pub index: bool,
    /// With --push: basic-auth credentials as USER:PASSWORD.
    #[arg(long, value_name = "USER:PASSWORD", env = "KEEL_REGISTRY_AUTH")]
    pub auth: Option<String>,
    /// Write an OCI image layout into DIR.
    #[arg(long, value_name = "DIR")]
    pub oci_dir: Option<PathBuf>,
    /// Write the OCI image layout as a tar file.
    #[arg(long, value_name = "FILE")]
    pub oci_archive: Option<PathBuf>,
    /// Write a `docker save` archive (tagged busybox:<variant>).
    #[arg(long, value_name = "FILE")]
    pub docker_archive: Option<PathBuf>,
}

/// Builds the image and writes/pushes it as asked; prints the manifest digest.
pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let variant = match args.variant {
        VariantArg::Single => Variant::Single,
        VariantArg::Multi => Variant::Multi,
        VariantArg::Big => Variant::Big,
    };
    let media_types = match args.media_types {
        MediaTypesArg::Oci => MediaTypes::Oci,
        MediaTypesArg::Docker => MediaTypes::Docker,
    };
    let img = image_builder::build_with(variant, media_types)
        .with_context(|| format!("build busybox {}", variant.name()))?;
    let tag = variant.name();

    let no_output = args.push.is_none()
        && args.oci_dir.is_none()
        && args.oci_archive.is_none()
        && args.docker_archive.is_none();
    let default_dir = no_output.then(|| default_layout_dir(variant));
    if let Some(dir) = args.oci_dir.as_deref().or(default_dir.as_deref()) {
        img.write_oci_layout(dir, tag)?;
        println!("wrote OCI layout {} (ref {tag})", dir.display());
    }
    if let Some(path) = &args.oci_archive {
        img.write_oci_archive(path, tag)?;
        println!("wrote OCI archive {} (ref {tag})", path.display());
    }
    if let Some(path) = &args.docker_archive {
        img.write_docker_archive(path, &format!("busybox:{tag}"))?;
        println!("wrote docker archive {} (busybox:{tag})", path.display());
    }
    if let Some(reference) = &args.push {
        let (host, repository, ref_tag) = parse_ref(reference)?;
        let auth = match &args.auth {
            Some(a) => Some(a.split_once(':').context("--auth must be USER:PASSWORD")?),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("build tokio runtime")?;
        if args.index {
            let index = runtime
                .block_on(img.push_index(host, repository, ref_tag, auth))
                .with_context(|| format!("push index to {reference}"))?;
            println!("pushed index {reference} {}", index.digest);
        } else {
            runtime
                .block_on(img.push(host, repository, ref_tag, auth))
                .with_context(|| format!("push {reference}"))?;
            println!("pushed {reference}");
        }
    }
    println!("{}", img.manifest_digest);
    Ok(())
}

/// `<workspace>/target/images/busybox-<variant>` (or under `CARGO_TARGET_DIR`).
fn default_layout_dir(variant: Variant) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target
        .join("images")
        .join(format!("busybox-{}", variant.name()))
}

fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

/// `host[:port]/repo/path[:tag]` -> `(host, repo/path, tag)`; the tag defaults to `latest`.
/// A host is required: this tool never pushes to a default (remote) registry.
fn parse_ref(reference: &str) -> anyhow::Result<(&str, &str, &str)> {
    let Some((host, rest)) = reference.split_once('/') else {
        bail!("--push {reference}: expected host[:port]/repository[:tag]");
    };
    if host.is_empty() || rest.is_empty() {
        bail!("--push {reference}: expected host[:port]/repository[:tag]");
    }
    if rest.contains('@') {
        bail!("--push {reference}: push by tag, not by digest");
    }
    let (repository, tag) = match rest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (rest, "latest"),
    };
    Ok((host, repository, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_push_refs() {
        assert_eq!(
            parse_ref("127.0.0.1:5000/busybox:latest").unwrap(),
            ("127.0.0.1:5000", "busybox", "latest")
        );
        assert_eq!(
            parse_ref("localhost:5000/lib/busybox").unwrap(),
            ("localhost:5000", "lib/busybox", "latest")
        );
        assert!(parse_ref("busybox").is_err());
        assert!(parse_ref("h/busybox@sha256:00").is_err());
    }
}
