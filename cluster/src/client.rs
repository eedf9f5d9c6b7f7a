//! A kube-rs client from a kubeconfig file, for the components that talk to an API server as
//! ordinary clients (the scheduler, later the controllers and the agent): keel's own server
//! or any Kubernetes.

use std::path::Path;
use std::time::Duration;

/// What building a client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("read kubeconfig {path}: {source}")]
    Read {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path}: {source}")]
    Config {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("client for {path}: {source}")]
    Client { path: String, source: kube::Error },
}

/// A client for the current context of the kubeconfig at `path`.
pub async fn from_kubeconfig(path: &Path) -> Result<kube::Client, ClientError> {
    Ok(with_token(path, None).await?.0)
}

/// A client for the current context of the kubeconfig at `path` that authenticates with the
/// bearer `token` (None: the kubeconfig's own credentials), and the bearer token it presents,
/// if any (a node agent's endpoint accepts its own node credential).
pub async fn with_token(
    path: &Path,
    token: Option<String>,
) -> Result<(kube::Client, Option<String>), ClientError> {
    use secrecy::ExposeSecret as _;
    // kube-rs builds its TLS config from the process default; two rustls providers are linked.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let shown = path.display().to_string();
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| ClientError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|source| ClientError::Config {
                path: shown.clone(),
                source,
            })?;
    if let Some(t) = token {
        config.auth_info.token = Some(t.into());
        config.auth_info.token_file = None;
    }
    let presented = config
        .auth_info
        .token
        .as_ref()
        .map(|t| t.expose_secret().to_string());
    // Watches idle between events longer than kube-rs's default read timeout allows.
    config.read_timeout = Some(Duration::from_secs(330));
    let client = kube::Client::try_from(config).map_err(|source| ClientError::Client {
        path: shown,
        source,
    })?;
    Ok((client, presented))
}
