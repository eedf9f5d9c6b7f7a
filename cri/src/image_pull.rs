//! PullImage: pulls through keel-runtime's image store (mirrors, plain-HTTP registries and
//! configured credentials apply) and answers the image id as `image_ref`, as containerd does.
//!
//! The request's `AuthConfig` (what kubelet found in the pod's image pull secrets or a credential
//! provider) overrides the configured credentials for the image's registry; see
//! [`credentials`] for how its fields become keel-runtime [`Credentials`].

use base64::Engine as _;
use keel_runtime::image::{Credentials, PullEvent, PullRequest, reference};

use crate::image_convert::image_name;
use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn pull_image(
    svc: &CriService,
    req: api::PullImageRequest,
) -> Result<api::PullImageResponse, CriError> {
    let name = image_name(req.image.as_ref(), "image.image")?;
    let parsed = reference::parse(name)?;
    let creds = credentials(req.auth.as_ref(), parsed.registry())?;
    if req.auth.is_some() && creds.is_none() {
        tracing::debug!(
            registry = parsed.registry(),
            "auth config not for this registry"
        );
    }
    let store = svc.images.clone();
    let mut pull = PullRequest::new(name);
    pull.credentials = creds;
    let pull = pull.progress(|ev| match ev {
        PullEvent::Resolved {
            manifest_digest,
            layers,
            total_bytes,
        } => tracing::debug!(%manifest_digest, layers, total_bytes, "resolved"),
        PullEvent::LayerDone { digest } => tracing::debug!(%digest, "layer done"),
        PullEvent::LayerReused { .. } | PullEvent::LayerProgress { .. } => {}
    });
    let report = store.pull(pull).await?;
    tracing::info!(
        id = %report.image.id,
        downloaded_layers = report.downloaded_layers,
        downloaded_bytes = report.downloaded_bytes,
        reused_layers = report.reused_layers,
        "pulled"
    );
    Ok(api::PullImageResponse {
        image_ref: report.image.id,
    })
}

/// The credentials a CRI `AuthConfig` gives for `registry` (the image's registry host as
/// keel-runtime normalizes it, `docker.io` for Docker Hub). Follows containerd's `ParseAuth`:
/// - a `server_address` naming another registry means the config is not for this pull: none;
/// - `username` (+ `password`) first, then `identity_token` (containerd passes it as the secret
///   with an empty user; keel's registry client sends it as basic auth rather than an OAuth2
///   refresh-token grant, so registries accepting only the grant will refuse it), then `auth`
///   (base64 of `user:password`, NULs trimmed off the password as docker writes them), then
///   `registry_token` as a bearer token (containerd ignores it; CRI-O uses it the same way);
/// - nothing set: anonymous (None).
pub(crate) fn credentials(
    auth: Option<&api::AuthConfig>,
    registry: &str,
) -> Result<Option<Credentials>, CriError> {
    let Some(auth) = auth else { return Ok(None) };
    if !auth.server_address.is_empty()
        && canonical_host(server_host(&auth.server_address)) != canonical_host(registry)
    {
        return Ok(None);
    }
    if !auth.username.is_empty() {
        return Ok(Some(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(Credentials::Basic {
            username: String::new(),
            password: auth.identity_token.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|e| CriError::invalid("auth.auth", format!("not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| CriError::invalid("auth.auth", "not UTF-8 after base64 decoding"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| CriError::invalid("auth.auth", "expected base64 of USER:PASSWORD"))?;
        return Ok(Some(Credentials::Basic {
            username: username.to_owned(),
            password: password.trim_matches('\0').to_owned(),
        }));
    }
    if !auth.registry_token.is_empty() {
        return Ok(Some(Credentials::Bearer {
            token: auth.registry_token.clone(),
        }));
    }
    Ok(None)
}

/// The host of a `server_address`, which kubelet writes as a bare `host[:port]` or as a URL
/// (`https://index.docker.io/v1/`).
fn server_host(address: &str) -> &str {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    rest.split('/').next().unwrap_or(rest)
}

/// Docker Hub answers to several names; everything else is compared as written.
fn canonical_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        h => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials::Basic {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn username_and_password_win() {
        let a = api::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            auth: "eDp5".into(),
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(credentials(Some(&a), "r:5000").unwrap(), basic("u", "p"));
        assert_eq!(credentials(None, "r:5000").unwrap(), None);
        let empty = api::AuthConfig::default();
        assert_eq!(credentials(Some(&empty), "r:5000").unwrap(), None);
    }

    #[test]
    fn auth_is_base64_of_user_colon_password() {
        let a = api::AuthConfig {
            // "user:pa:ss\0" as docker may write it.
            auth: base64::engine::general_purpose::STANDARD.encode("user:pa:ss\0"),
            ..Default::default()
        };
        assert_eq!(credentials(Some(&a), "r").unwrap(), basic("user", "pa:ss"));
        let bad = api::AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        };
        let e = credentials(Some(&bad), "r").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("auth.auth"), "{e}");
        let no_colon = api::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("user"),
            ..Default::default()
        };
        assert!(credentials(Some(&no_colon), "r").is_err());
    }

    #[test]
    fn tokens_map_to_basic_identity_and_bearer() {
        let id = api::AuthConfig {
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert_eq!(credentials(Some(&id), "r").unwrap(), basic("", "refresh"));
        let tok = api::AuthConfig {
            registry_token: "tok".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials(Some(&tok), "r").unwrap(),
            Some(Credentials::Bearer {
                token: "tok".into()
            })
        );
    }

    #[test]
    fn a_config_for_another_registry_is_not_used() {
        let mut a = api::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            server_address: "other.example:5000".into(),
            ..Default::default()
        };
        assert_eq!(credentials(Some(&a), "127.0.0.1:5000").unwrap(), None);
        a.server_address = "127.0.0.1:5000".into();
        assert_eq!(
            credentials(Some(&a), "127.0.0.1:5000").unwrap(),
            basic("u", "p")
        );
        a.server_address = "https://index.docker.io/v1/".into();
        assert_eq!(credentials(Some(&a), "docker.io").unwrap(), basic("u", "p"));
        assert_eq!(credentials(Some(&a), "quay.io").unwrap(), None);
    }
}
