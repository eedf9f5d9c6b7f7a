//! Registry settings (plain-HTTP registries, mirrors, credentials) and the oci-client they build.
//!
//! Mirrors follow containerd's semantics: a pull of `REGISTRY/repo` is tried against each mirror
//! of REGISTRY in order with the same repository path, then against REGISTRY itself. A mirror
//! written as `http://HOST:PORT` is reached over plain HTTP; `https://` or a bare host over TLS.

use std::collections::BTreeMap;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use super::ImageError;

/// Credentials for one registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credentials {
    Basic { username: String, password: String },
    Bearer { token: String },
}

/// How the store reaches registries. Deserializable so the `[registry]` table of keel's config
/// file maps onto it directly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryOptions {
    /// `HOST[:PORT]` entries reached over plain HTTP instead of HTTPS.
    pub insecure: Vec<String>,
    /// Registry host (`docker.io`, `registry.k8s.io`, ...) to mirror URLs, tried in order.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry host to credentials.
    pub auths: BTreeMap<String, Credentials>,
    /// Layers downloaded at once per pull (default 4).
    pub max_concurrent_downloads: Option<usize>,
}

/// A mirror endpoint: the host oci-client addresses and whether it speaks plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub plain_http: bool,
}

impl RegistryOptions {
    /// Adds a mirror from the CLI form `REGISTRY=URL`.
    pub fn add_mirror_arg(&mut self, arg: &str) -> Result<(), ImageError> {
        let (registry, url) = arg.split_once('=').ok_or_else(|| ImageError::Config {
            reason: format!("registry mirror {arg:?}: expected REGISTRY=URL"),
        })?;
        parse_endpoint(url)?;
        if registry.is_empty() {
            return Err(ImageError::Config {
                reason: format!("registry mirror {arg:?}: empty registry name"),
            });
        }
        self.mirrors
            .entry(registry.to_owned())
            .or_default()
            .push(url.to_owned());
        Ok(())
    }

    /// Checks every entry, so a bad config fails at start instead of at the first pull.
    pub fn validate(&self) -> Result<(), ImageError> {
        for url in self.mirrors.values().flatten() {
            parse_endpoint(url)?;
        }
        for host in &self.insecure {
            if host.is_empty() || host.contains('/') {
                return Err(ImageError::Config {
                    reason: format!("insecure registry {host:?}: expected HOST[:PORT]"),
                });
            }
        }
        Ok(())
    }

    /// The endpoints to try for `registry`, mirrors first, the registry itself last.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self
            .mirrors
            .get(registry)
            .into_iter()
            .flatten()
            .filter_map(|u| parse_endpoint(u).ok())
            .collect();
        out.push(Endpoint {
            host: registry.to_owned(),
            plain_http: self.is_insecure(registry),
        });
        out
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    /// oci-client auth for a registry host.
    pub fn auth_for(&self, host: &str) -> RegistryAuth {
        match self.auths.get(host) {
            Some(Credentials::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credentials::Bearer { token }) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    pub fn concurrency(&self) -> usize {
        self.max_concurrent_downloads.unwrap_or(4).clamp(1, 32)
    }

    /// An oci-client configured for these settings: HTTPS except the insecure registries and
    /// plain-HTTP mirrors. Fails (instead of panicking, as `Client::new` does) when the TLS
    /// setup is impossible, e.g. a node without CA certificates.
    /// A client for one kind of endpoint. `Transport::Tls` verifies servers against the
    /// system's CA certificates, which costs ~100 ms to load (300 files here); a
    /// `Transport::PlainHttp` client never speaks TLS to the registry, so it skips them.
    pub fn client(&self, transport: Transport) -> Result<oci_client::Client, ImageError> {
        match transport {
            Transport::Tls => self.tls_client(),
            Transport::PlainHttp => plain_http_client(),
        }
    }

    fn tls_client(&self) -> Result<oci_client::Client, ImageError> {
        let mut plain: Vec<String> = self.insecure.clone();
        plain.extend(
            self.mirrors
                .values()
                .flatten()
                .filter_map(|u| parse_endpoint(u).ok())
                .filter(|e| e.plain_http)
                .map(|e| e.host),
        );
        oci_client::Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            user_agent: concat!("keel/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
        .map_err(|e| ImageError::Config {
            reason: format!(
                "cannot set up the registry client (are CA certificates installed?): {e}"
            ),
        })
    }
}

/// Parses `http://HOST:PORT`, `https://HOST[:PORT]` or `HOST[:PORT]`.
/// Which client an endpoint needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS, plus plain HTTP for the configured insecure registries and `http://` mirrors.
    Tls,
    /// Plain HTTP only.
    PlainHttp,
}

/// The plain-HTTP client. Its only trusted root is a throwaway self-signed certificate whose
/// key was discarded, so if a plain-HTTP registry redirects a download to an HTTPS host, that
/// connection fails verification (never succeeds unverified); the puller then retries the
/// endpoint with the TLS client.
fn plain_http_client() -> Result<oci_client::Client, ImageError> {
    oci_client::Client::try_from(ClientConfig {
        protocol: ClientProtocol::Http,
        tls_certs_only: vec![Certificate {
            encoding: CertificateEncoding::Pem,
            data: include_bytes!("plain_http_root.pem").to_vec(),
        }],
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        user_agent: concat!("keel/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
    .map_err(|e| ImageError::Config {
        reason: format!("cannot set up the plain-HTTP registry client: {e}"),
    })
}

pub fn parse_endpoint(url: &str) -> Result<Endpoint, ImageError> {
    let (rest, plain_http) = if let Some(r) = url.strip_prefix("http://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, false)
    } else {
        (url, false)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains('?') {
        return Err(ImageError::Config {
            reason: format!(
                "registry mirror URL {url:?}: expected http(s)://HOST[:PORT] with no path"
            ),
        });
    }
    Ok(Endpoint {
        host: host.to_owned(),
        plain_http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_before_the_registry() {
        let mut o = RegistryOptions::default();
        o.add_mirror_arg("docker.io=http://127.0.0.1:5000").unwrap();
        o.add_mirror_arg("docker.io=https://mirror.example")
            .unwrap();
        let eps = o.endpoints("docker.io");
        assert_eq!(
            eps,
            vec![
                Endpoint {
                    host: "127.0.0.1:5000".into(),
                    plain_http: true
                },
                Endpoint {
                    host: "mirror.example".into(),
                    plain_http: false
                },
                Endpoint {
                    host: "docker.io".into(),
                    plain_http: false
                },
            ]
        );
        assert_eq!(o.endpoints("quay.io").len(), 1);
    }

    #[test]
    fn bad_mirror_args_are_refused() {
        let mut o = RegistryOptions::default();
        assert!(o.add_mirror_arg("docker.io").is_err());
        assert!(o.add_mirror_arg("=http://x").is_err());
        assert!(o.add_mirror_arg("docker.io=http://x/path").is_err());
        o.insecure.push("a/b".into());
        assert!(o.validate().is_err());
    }

    #[test]
    fn config_file_table_maps_onto_options() {
        let o: RegistryOptions = serde_json::from_str(
            r#"{"insecure":["127.0.0.1:5000"],"mirrors":{"docker.io":["http://127.0.0.1:5000"]},
                "auths":{"r.example":{"basic":{"username":"u","password":"p"}}}}"#,
        )
        .unwrap();
        assert!(o.is_insecure("127.0.0.1:5000"));
        assert!(matches!(o.auth_for("r.example"), RegistryAuth::Basic(..)));
        assert!(matches!(o.auth_for("other"), RegistryAuth::Anonymous));
    }
}
