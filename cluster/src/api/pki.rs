//! The API server's credentials in its data dir: a CA and a serving certificate (generated with
//! rcgen on first start, reused afterwards), the admin and node join bearer tokens, and the admin
//! kubeconfig.
//!
//! Layout under the data dir: `pki/ca.crt`, `pki/ca.key`, `pki/server.crt`, `pki/server.key`,
//! `tokens/admin`, `tokens/node-join`, `kubeconfig`. Every file is written to a temp file, fsynced
//! and renamed; keys and tokens are mode 0600. Must not serve or check requests (see `auth.rs`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;

/// What can go wrong with the credentials on disk.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{path}: not a valid PEM {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(
        "{dir}: incomplete credentials ({missing} is missing but others exist); remove the pki \
         directory to generate a new CA"
    )]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The loaded credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub admin_token: String,
    pub node_join_token: String,
}

const PKI_FILES: [&str; 4] = ["ca.crt", "ca.key", "server.crt", "server.key"];

/// Loads the credentials under `data_dir`, generating what is missing. `sans` are the extra DNS
/// names and IPs the serving certificate must cover (besides localhost and loopback).
pub fn ensure(data_dir: &Path, sans: &[String]) -> Result<Credentials, PkiError> {
    let pki = data_dir.join("pki");
    std::fs::create_dir_all(&pki).map_err(io(&pki))?;
    let present: Vec<bool> = PKI_FILES.iter().map(|f| pki.join(f).exists()).collect();
    if present.iter().all(|p| !p) {
        generate(&pki, sans)?;
    } else if let Some(i) = present.iter().position(|p| !p) {
        return Err(PkiError::Incomplete {
            dir: pki,
            missing: PKI_FILES[i],
        });
    }
    let read = |name: &str| {
        let p = pki.join(name);
        std::fs::read_to_string(&p).map_err(io(&p))
    };
    let tokens = data_dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(io(&tokens))?;
    Ok(Credentials {
        ca_pem: read("ca.crt")?,
        cert_pem: read("server.crt")?,
        key_pem: read("server.key")?,
        admin_token: ensure_token(&tokens.join("admin"))?,
        node_join_token: ensure_token(&tokens.join("node-join"))?,
    })
}

fn generate(pki: &Path, sans: &[String]) -> Result<(), PkiError> {
    let gen_err = |what| move |source| PkiError::Generate { what, source };
    let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "keel-ca");
    ca_params.not_after = rcgen::date_time_ymd(2125, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err("CA"))?;

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
    ];
    if let Ok(host) = rustix::system::uname().nodename().to_str() {
        names.push(host.to_string());
    }
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let key = KeyPair::generate().map_err(gen_err("server key"))?;
    let mut params = CertificateParams::new(names).map_err(gen_err("server certificate"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "keel-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.not_after = rcgen::date_time_ymd(2125, 1, 1);
    let issuer = Issuer::new(ca_params, &ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(gen_err("server certificate"))?;

    // The CA last: its presence marks a complete set.
    write_secure(
        &pki.join("server.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_secure(&pki.join("server.crt"), cert.pem().as_bytes(), 0o644)?;
    write_secure(
        &pki.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_secure(&pki.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Reads a token file, or writes a new random token into it.
fn ensure_token(path: &Path) -> Result<String, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => new_token(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_token(path),
        Err(e) => Err(io(path)(e)),
    }
}

fn new_token(path: &Path) -> Result<String, PkiError> {
    let bytes: [u8; 24] = rand::random();
    let token = hex(&bytes);
    write_secure(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `data` crash-safely: temp file with `mode`, fsync, rename, fsync of the directory.
pub fn write_secure(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// The rustls configuration serving the certificate (HTTP/2 and HTTP/1.1 by ALPN).
pub fn server_config(creds: &Credentials, dir: &Path) -> Result<rustls::ServerConfig, PkiError> {
    let cert_path = dir.join("pki/server.crt");
    let key_path = dir.join("pki/server.key");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| PkiError::Pem {
                path: cert_path,
                what: "certificate",
                reason: e.to_string(),
            })?;
    let key =
        PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| PkiError::Pem {
            path: key_path,
            what: "private key",
            reason: e.to_string(),
        })?;
    // The CA goes with the chain: a joining agent finds it there and checks it against the pin
    // in its join token (see `crate::join`).
    let mut certs = certs;
    for ca in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        certs.push(ca.map_err(|e| PkiError::Pem {
            path: dir.join("pki/ca.crt"),
            what: "certificate",
            reason: e.to_string(),
        })?);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The admin kubeconfig for a server reachable at `server_url`.
pub fn kubeconfig(creds: &Credentials, server_url: &str) -> String {
    kubeconfig_for(server_url, &creds.ca_pem, "keel-admin", &creds.admin_token)
}

/// A kubeconfig for `server_url` trusting `ca_pem`, authenticating as `user` with `token`.
pub fn kubeconfig_for(server_url: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: keel
  cluster:
    server: {server_url}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: keel
  context:
    cluster: keel
    user: {user}
    namespace: default
current-context: keel
"
    )
}

/// The URL clients use for a listen address: a wildcard becomes loopback.
pub fn server_url(listen: std::net::SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    match ip {
        IpAddr::V4(v4) => format!("https://{v4}:{}", listen.port()),
        IpAddr::V6(v6) => format!("https://[{v6}]:{}", listen.port()),
    }
}

/// The Node annotation in which an agent publishes the SHA-256 (hex) of its endpoint's
/// certificate; the API server accepts only that certificate when it proxies to the node.
pub const AGENT_CERT_PIN_ANNOTATION: &str = "keel.dev/agent-cert-sha256";

/// A fresh self-signed serving configuration for a node agent's endpoint, covering `names`
/// (IPs or DNS names), and the pin of its certificate (SHA-256 of the DER, hex). Agents have no
/// CA-signed certificate; the pin, which only the node itself may write into its Node, takes the
/// CA's place.
pub fn self_signed_server(names: &[String]) -> Result<(rustls::ServerConfig, String), PkiError> {
    let gen_err = |what| move |source| PkiError::Generate { what, source };
    let key = KeyPair::generate().map_err(gen_err("agent key"))?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(gen_err("agent certificate"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "keel-agent");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("agent certificate"))?;
    let pin = hex(&sha2::Sha256::digest(cert.der()));
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|reason| PkiError::Pem {
        path: PathBuf::from("(agent key)"),
        what: "private key",
        reason: reason.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, pin))
}

/// A client configuration that trusts exactly the server certificate pinned by `pin`
/// (see [`self_signed_server`]); signatures are still verified, so only the key holder passes.
pub fn pinned_client(pin: &str) -> Result<rustls::ClientConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(PinnedCert {
        pin: pin.to_ascii_lowercase(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCert {
    pin: String,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if hex(&sha2::Sha256::digest(end_entity.as_ref())) == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's certificate does not match the pin in its Node object".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = ensure(dir.path(), &["10.1.2.3".into()]).unwrap();
        let b = ensure(dir.path(), &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert_ne!(a.admin_token, a.node_join_token);
        let mode = std::fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&a, dir.path()).unwrap();
        let kc = kubeconfig(&a, "https://127.0.0.1:6443");
        assert!(kc.contains("server: https://127.0.0.1:6443"));
        assert!(kc.contains(&a.admin_token));
    }

    #[test]
    fn incomplete_pki_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ensure(dir.path(), &[]).unwrap();
        std::fs::remove_file(dir.path().join("pki/server.key")).unwrap();
        let e = ensure(dir.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("server.key is missing"), "{e}");
    }

    #[test]
    fn wildcard_listen_becomes_loopback() {
        assert_eq!(
            server_url("0.0.0.0:6443".parse().unwrap()),
            "https://127.0.0.1:6443"
        );
        assert_eq!(server_url("[::]:1".parse().unwrap()), "https://[::1]:1");
    }
}
