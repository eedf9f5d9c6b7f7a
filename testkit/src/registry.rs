//! A throwaway OCI distribution registry for tests: Debian's `docker-registry` (distribution 2.8)
//! on 127.0.0.1, storing into a temp dir, optionally behind htpasswd basic auth.
//!
//! Owns the registry process, its config, its storage and its log file; all of them go away when
//! the [`Registry`] is dropped (the child is killed and reaped, also when the test panics).
//! It listens on loopback only and never talks to any other registry (no proxy/mirror config).
//!
//! Basic auth is served over plain HTTP: distribution 2.8's htpasswd backend accepts that (checked
//! against Debian's 2.8.2 package), so tests need no certificates.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Debian's build of distribution/distribution.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long the registry may take to answer `GET /v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a fresh port when another process grabbed ours between probe and start.
const START_ATTEMPTS: usize = 3;
/// The basic-auth realm the registry announces.
pub const REALM: &str = "keel-test";

/// How to run the registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password (bcrypt htpasswd file).
    pub htpasswd: Option<(String, String)>,
}

/// A running `docker-registry` on 127.0.0.1:<free port>. Killed and its storage removed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    auth: Option<(String, String)>,
    // Last field: removed after the child is gone (fields drop in declaration order, after Drop).
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits (at most ~10 s) until `GET /v2/` answers 200 or 401.
    pub fn start(opts: RegistryOptions) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("keel-registry-")
            .tempdir()
            .context("create registry temp dir")?;
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage)
            .with_context(|| format!("create registry storage {}", storage.display()))?;
        let htpasswd = match &opts.htpasswd {
            Some((user, pass)) => Some(write_htpasswd(dir.path(), user, pass)?),
            None => None,
        };

        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match spawn_and_wait(dir.path(), &storage, htpasswd.as_deref(), addr) {
                Ok(child) => {
                    return Ok(Registry {
                        child,
                        addr,
                        auth: opts.htpasswd,
                        dir,
                    });
                }
                Err(e) => {
                    let port_taken = format!("{e:#}").contains("address already in use");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry: no start attempt made")))
    }

    /// Starts a registry without auth.
    pub fn start_anonymous() -> anyhow::Result<Registry> {
        Registry::start(RegistryOptions::default())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The credentials the registry requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's filesystem storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the content of blob `digest` (`sha256:<hex>` or bare hex), so a
    /// test can corrupt or remove it.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let prefix = hex.get(..2).unwrap_or(hex);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(prefix)
            .join(hex)
            .join("data")
    }

    /// What the registry wrote to stdout/stderr so far (warnings and errors only).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Status code of an anonymous `GET /v2/` (200 open, 401 auth required).
    pub fn v2_status(&self) -> anyhow::Result<u16> {
        http_get_status(self.addr, "/v2/", None)
    }

    /// Status code of `GET path` with optional basic-auth credentials.
    pub fn get_status(&self, path: &str, auth: Option<(&str, &str)>) -> anyhow::Result<u16> {
        http_get_status(self.addr, path, auth)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Kill fails only if the child already exited; wait reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_htpasswd(dir: &Path, user: &str, pass: &str) -> anyhow::Result<PathBuf> {
    let line = crate::run("htpasswd", &["-Bbn", user, pass])
        .context("generate bcrypt htpasswd entry (apt-get install apache2-utils)")?;
    let path = dir.join("htpasswd");
    std::fs::write(&path, line.trim_end().as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn config_yaml(storage: &Path, htpasswd: Option<&Path>, addr: SocketAddr) -> String {
    // Paths come from tempfile (no quotes or newlines); YAML single quotes keep them literal.
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: '{}'\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: keel-test-secret\n",
        storage.display()
    );
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: {REALM}\n    path: '{}'\n",
            path.display()
        ));
    }
    yaml
}

fn spawn_and_wait(
    dir: &Path,
    storage: &Path,
    htpasswd: Option<&Path>,
    addr: SocketAddr,
) -> anyhow::Result<Child> {
    let config = dir.join("config.yml");
    std::fs::write(&config, config_yaml(storage, htpasswd, addr))
        .with_context(|| format!("write {}", config.display()))?;
    let log_path = dir.join("registry.log");
    // A file, not a pipe: nobody drains a pipe while the test runs, and a full one would block
    // the registry.
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("dup {}", log_path.display()))?;
    let mut child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .with_context(|| {
            format!("spawn {REGISTRY_BIN} (apt-get install docker-registry) for {addr}")
        })?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("registry on {addr} exited with {status}: {}", log.trim());
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("registry on {addr}: wait: {e}");
            }
        }
        if let Ok(200 | 401) = http_get_status(addr, "/v2/", None) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "registry on {addr} did not answer GET /v2/ within {START_TIMEOUT:?}: {}",
                log.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port the kernel just handed out on 127.0.0.1. Racy by nature (released before the registry
/// binds it); `Registry::start` retries with a new port when that race is lost.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(l.local_addr().context("local_addr of 127.0.0.1:0")?.port())
}

/// Minimal HTTP/1.0 GET returning the status code; enough for readiness and auth checks
/// without pulling an HTTP client into the harness.
fn http_get_status(
    addr: SocketAddr,
    path: &str,
    auth: Option<(&str, &str)>,
) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .with_context(|| format!("set timeout on {addr}"))?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some((user, pass)) = auth {
        req.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(format!("{user}:{pass}").as_bytes())
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .with_context(|| format!("send GET {path} to {addr}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("read GET {path} from {addr}"))?;
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path} from {addr}: bad status line {head:?}"))
}

/// Standard base64 with padding (RFC 4648), for one Authorization header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn config_has_delete_and_auth() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 5000));
        let y = config_yaml(Path::new("/st"), Some(Path::new("/h")), addr);
        assert!(y.contains("rootdirectory: '/st'"));
        assert!(y.contains("enabled: true"));
        assert!(y.contains("addr: 127.0.0.1:5000"));
        assert!(y.contains("realm: keel-test"));
        assert!(y.contains("path: '/h'"));
        assert!(!config_yaml(Path::new("/st"), None, addr).contains("auth:"));
    }
}
