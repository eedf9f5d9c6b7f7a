//! keel's config file: one TOML file whose tables map onto the library crates' option types.
//! Flags given on the command line are applied on top of it by each subcommand.
//!
//! ```toml
//! [images]
//! keep_layer_blobs = false                 # keep compressed layers after unpacking
//! [registry]
//! insecure = ["127.0.0.1:5000"]            # plain-HTTP registries
//! max_concurrent_downloads = 4
//! [registry.mirrors]
//! "docker.io" = ["http://127.0.0.1:5000"]  # tried in order, then docker.io itself
//! [registry.auths."registry.example.com"]
//! basic = { username = "me", password = "secret" }
//! ```

use std::path::Path;

use anyhow::Context;
use keel_runtime::image::{RegistryOptions, StoreOptions};
use serde::Deserialize;

/// Where keel looks for its config when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/keel/config.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub images: StoreOptions,
    pub registry: RegistryOptions,
}

impl Config {
    /// Reads `path`, or the default file if it exists, or returns the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, required) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(e) => return Err(e).with_context(|| format!("read config {}", path.display())),
        };
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        cfg.registry
            .validate()
            .with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[registry]\ninsecure = [\"127.0.0.1:5000\"]\n[registry.mirrors]\n\"docker.io\" = [\"http://127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.registry.endpoints("docker.io").len(), 2);
        std::fs::write(&p, "[registry]\ninsecur = []\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("insecur"), "{e}");
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
