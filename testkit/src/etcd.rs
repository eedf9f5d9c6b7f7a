//! A throwaway etcd for tests: Debian's `etcd-server` (etcd 3.4) as a one-member cluster on
//! 127.0.0.1 with free client and peer ports, storing into a temp dir.
//!
//! Owns the etcd process, its data dir and its log file; all of them go away when the [`Etcd`]
//! is dropped (the child is killed and reaped, also when the test panics). It listens on
//! loopback only. Tests that need a crash use [`Etcd::kill`] and [`Etcd::restart`], which keep
//! the data dir and the ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Debian's build of etcd.
const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take to report itself healthy.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with fresh ports when another process grabbed one between probe and start.
const START_ATTEMPTS: usize = 3;

/// A running etcd on 127.0.0.1:<free port>. Killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    // Last field: removed after the child is gone (fields drop in declaration order, after Drop).
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits (at most ~10 s) until `GET /health` answers 200.
    pub fn start() -> anyhow::Result<Etcd> {
        if !Path::new(ETCD_BIN).exists() {
            bail!(
                "{ETCD_BIN} is missing: install Debian's etcd-server (`cargo xtask setup` or \
                 `apt-get install etcd-server`)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("keel-etcd-")
            .tempdir()
            .context("create etcd temp dir")?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let client = loopback(crate::registry::free_port()?);
            let peer = loopback(crate::registry::free_port()?);
            match spawn_and_wait(dir.path(), client, peer) {
                Ok(child) => {
                    return Ok(Etcd {
                        child: Some(child),
                        client,
                        peer,
                        dir,
                    });
                }
                Err(e) => {
                    let port_taken = format!("{e:#}").contains("address already in use");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                    // A failed first start may leave a half-initialized member behind.
                    let _ = std::fs::remove_dir_all(data_dir(dir.path()));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("etcd: no start attempt made")))
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// etcd's data dir (its WAL and snapshots).
    pub fn data_dir(&self) -> PathBuf {
        data_dir(self.dir.path())
    }

    /// What etcd wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// SIGKILLs etcd (no shutdown of any kind) and reaps it; the data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Kill fails only if the child already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports (after [`Etcd::kill`]) and waits until
    /// it is healthy.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let child = spawn_and_wait(self.dir.path(), self.client, self.peer)
            .with_context(|| format!("restart etcd on {}", self.client))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("data")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("etcd.log")
}

/// The command line of a one-member cluster named `default` on loopback.
fn etcd_args(data: &Path, client: SocketAddr, peer: SocketAddr) -> Vec<String> {
    let client_url = format!("http://{client}");
    let peer_url = format!("http://{peer}");
    vec![
        "--name=default".into(),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        "--initial-cluster-state=new".into(),
        "--initial-cluster-token=keel-test".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
        "--log-level=warn".into(),
    ]
}

fn spawn_and_wait(dir: &Path, client: SocketAddr, peer: SocketAddr) -> anyhow::Result<Child> {
    let log_file = log_path(dir);
    // A file, not a pipe: nobody drains a pipe while the test runs, and a full one would block
    // etcd. Appending keeps the log of a run before a restart.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
        .with_context(|| format!("create {}", log_file.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("dup {}", log_file.display()))?;
    let mut cmd = Command::new(ETCD_BIN);
    cmd.args(etcd_args(&data_dir(dir), client, peer))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // etcd reads its flags from ETCD_* too; the host's must not leak into the test's etcd.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(&name);
        }
    }
    if std::env::consts::ARCH != "x86_64" && std::env::consts::ARCH != "aarch64" {
        cmd.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {ETCD_BIN} for {client}"))?;

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let log = std::fs::read_to_string(&log_file).unwrap_or_default();
                bail!("etcd on {client} exited with {status}: {}", log.trim());
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("etcd on {client}: wait: {e}");
            }
        }
        if healthy(client) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            bail!(
                "etcd on {client} was not healthy within {START_TIMEOUT:?}: {}",
                log.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `GET /health` answers 200 with `"health":"true"` (etcd has a leader and serves).
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_secs(2))).is_err() {
        return false;
    }
    let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = Vec::new();
    if s.read_to_end(&mut resp).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&resp);
    (text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")) && health_true(&text)
}

fn health_true(response: &str) -> bool {
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.replace(' ', "").contains("\"health\":\"true\""))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_describe_a_loopback_member() {
        let client = loopback(2379);
        let peer = loopback(2380);
        let args = etcd_args(Path::new("/d"), client, peer);
        assert!(args.contains(&"--data-dir=/d".to_string()));
        assert!(args.contains(&"--listen-client-urls=http://127.0.0.1:2379".to_string()));
        assert!(args.contains(&"--initial-cluster=default=http://127.0.0.1:2380".to_string()));
        assert!(args.iter().all(|a| !a.contains("0.0.0.0")));
    }

    #[test]
    fn health_body_is_parsed() {
        assert!(health_true(
            "HTTP/1.0 200 OK\r\nA: b\r\n\r\n{\"health\":\"true\"}"
        ));
        assert!(!health_true(
            "HTTP/1.0 200 OK\r\n\r\n{\"health\":\"false\"}"
        ));
    }
}
