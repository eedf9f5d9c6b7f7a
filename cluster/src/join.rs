//! Joining a node to a keel server with nothing but its URL and the join token.
//!
//! The join token (`<server data dir>/node-token`) is `keel1.<ca-sha256>.<secret>`: the SHA-256
//! (hex) of the DER of the cluster CA, and the node join secret (`tokens/node-join`). The agent
//! opens a TLS connection to the server, takes the CA from the certificate chain the server
//! presents, and accepts it only if its hash is the pinned one and the serving certificate chains
//! to it; then it writes a kubeconfig trusting that CA and authenticating with the node
//! credential minted from the secret. A man in the middle without the CA's key fails the
//! handshake: it can neither forge the CA (pin) nor sign for it.

use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest as _;
use tokio::net::TcpStream;

use crate::api::pki::hex;

const PREFIX: &str = "keel1.";

/// What joining can fail with.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "the join token is not `keel1.<ca-sha256>.<secret>` (the contents of the server's \
         <data dir>/node-token): {0}"
    )]
    Token(&'static str),
    #[error("--server {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error(
        "TLS handshake with {url}: {reason} (is the join token from this server, and does its \
         certificate cover this address? see keel server --tls-san)"
    )]
    Handshake { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub ca_sha256: String,
    /// The node join secret (what `keel_cluster::api::node_credential` is keyed with).
    pub secret: String,
}

impl JoinToken {
    /// The token for the CA `ca_pem` (its first certificate) and `secret`.
    pub fn new(ca_pem: &str, secret: &str) -> Result<JoinToken, JoinError> {
        use rustls::pki_types::pem::PemObject as _;
        let der = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or(JoinError::Token("the CA is not a PEM certificate"))?;
        Ok(JoinToken {
            ca_sha256: hex(&sha2::Sha256::digest(der.as_ref())),
            secret: secret.to_string(),
        })
    }

    pub fn parse(s: &str) -> Result<JoinToken, JoinError> {
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(JoinError::Token("it does not start with keel1."))?;
        let (hash, secret) = rest
            .split_once('.')
            .ok_or(JoinError::Token("no secret after the CA hash"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(JoinError::Token("the CA hash is not 64 hex digits"));
        }
        if secret.is_empty() {
            return Err(JoinError::Token("the secret is empty"));
        }
        Ok(JoinToken {
            ca_sha256: hash.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}.{}", self.ca_sha256, self.secret)
    }
}

/// The host and port of an `https://` URL.
fn host_port(url: &str) -> Result<(String, u16), JoinError> {
    let bad = |reason: &str| JoinError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("expected https://HOST[:PORT]"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in host"))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
        None => 443,
    };
    Ok((host, port))
}

/// Connects to the server at `url` and returns its CA (PEM), checked against `token`'s pin.
pub async fn fetch_ca(url: &str, token: &JoinToken) -> Result<String, JoinError> {
    let (host, port) = host_port(url)?;
    let server_name = ServerName::try_from(host.clone()).map_err(|e| JoinError::Url {
        url: url.to_string(),
        reason: format!("host {host:?}: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let found = Arc::new(Mutex::new(None));
    let verifier = Arc::new(PinnedCa {
        pin: token.ca_sha256.clone(),
        provider: provider.clone(),
        found: found.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| JoinError::Connect {
            url: url.to_string(),
            source,
        })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| JoinError::Handshake {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let der: CertificateDer<'static> =
        found
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| JoinError::Handshake {
                url: url.to_string(),
                reason: "the server presented no CA".into(),
            })?;
    Ok(pem("CERTIFICATE", der.as_ref()))
}

/// The kubeconfig a joined node uses: `url`, trusting `ca_pem`, as node `node_name`.
pub fn node_kubeconfig(url: &str, ca_pem: &str, token: &JoinToken, node_name: &str) -> String {
    let credential = crate::api::node_credential(&token.secret, node_name);
    crate::api::pki::kubeconfig_for(url, ca_pem, &format!("node-{node_name}"), &credential)
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Accepts the chain only if it carries the pinned CA and the serving certificate verifies
/// against it (name, validity, signature); records the CA.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex(&sha2::Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the CA hash in the join token".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().unwrap() = Some(ca.clone().into_owned());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_named() {
        let t = JoinToken {
            ca_sha256: "ab".repeat(32),
            secret: "s3cr3t".into(),
        };
        assert_eq!(JoinToken::parse(&format!("{t}\n")).unwrap(), t);
        for (bad, why) in [
            ("s3cr3t", "keel1."),
            ("keel1.abcd", "no secret"),
            ("keel1.abcd.s", "64 hex"),
            (&format!("keel1.{}.", "ab".repeat(32)), "empty"),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("https://10.0.0.1:6443").unwrap(),
            ("10.0.0.1".into(), 6443)
        );
        assert_eq!(host_port("https://[::1]:7/x").unwrap(), ("::1".into(), 7));
        assert_eq!(host_port("https://h").unwrap(), ("h".into(), 443));
        assert!(host_port("http://h:1").is_err());
        assert!(host_port("https://h:x").is_err());
    }

    /// Against a real server: the right pin yields its CA, a wrong one fails the handshake.
    #[tokio::test]
    async fn the_ca_is_fetched_only_with_the_right_pin() {
        let dir = tempfile::tempdir().unwrap();
        let creds = crate::api::pki::ensure(dir.path(), &[]).unwrap();
        let tls = crate::api::pki::server_config(&creds, dir.path()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let url = format!("https://127.0.0.1:{}", addr.port());
        let good = JoinToken::new(&creds.ca_pem, &creds.node_join_token).unwrap();
        let ca = fetch_ca(&url, &good).await.unwrap();
        assert_eq!(ca.trim(), creds.ca_pem.trim());
        let wrong = JoinToken {
            ca_sha256: "00".repeat(32),
            ..good
        };
        let e = fetch_ca(&url, &wrong).await.unwrap_err().to_string();
        assert!(e.contains("does not match the CA hash"), "{e}");
    }
}
