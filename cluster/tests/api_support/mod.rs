//! Helpers shared by the API server tests: a server on a temp data dir (redb or etcd), Debian's
//! kubectl pointed at it, and kube-rs clients with the admin or a node credential.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use keel_cluster::api::{ApiConfig, ApiServer};
use keel_cluster::store::{self, Store, StoreConfig};
use keel_testkit::etcd::Etcd;

/// An API server on 127.0.0.1 with its data dir; stops when dropped.
pub struct TestServer {
    pub server: Option<ApiServer>,
    pub addr: SocketAddr,
    pub store_config: StoreConfig,
    pub config: ApiConfig,
    pub dir: tempfile::TempDir,
    pub etcd: Option<Etcd>,
}

fn config(dir: &Path, addr: SocketAddr) -> ApiConfig {
    let mut c = ApiConfig::new(dir.to_path_buf(), addr);
    c.bookmark_interval = Duration::from_secs(1);
    c.gc_interval = Duration::from_secs(2);
    c
}

impl TestServer {
    /// A server on the embedded redb store.
    pub async fn redb() -> TestServer {
        Self::redb_with(|_| {}).await
    }

    pub async fn redb_with(tweak: impl FnOnce(&mut ApiConfig)) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("keel-api-")
            .tempdir()
            .expect("temp dir");
        let store_config = StoreConfig::Redb {
            data_dir: dir.path().to_path_buf(),
        };
        let mut c = config(dir.path(), "127.0.0.1:0".parse().unwrap());
        tweak(&mut c);
        Self::start(dir, store_config, c, None).await
    }

    /// A server on a fresh etcd (Debian's etcd-server on loopback).
    pub async fn etcd() -> TestServer {
        let etcd = tokio::task::spawn_blocking(Etcd::start)
            .await
            .expect("etcd start task")
            .expect("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)");
        let dir = tempfile::Builder::new()
            .prefix("keel-api-")
            .tempdir()
            .expect("temp dir");
        let store_config = StoreConfig::Etcd {
            endpoints: vec![etcd.endpoint()],
        };
        let c = config(dir.path(), "127.0.0.1:0".parse().unwrap());
        Self::start(dir, store_config, c, Some(etcd)).await
    }

    async fn start(
        dir: tempfile::TempDir,
        store_config: StoreConfig,
        mut config: ApiConfig,
        etcd: Option<Etcd>,
    ) -> TestServer {
        let store = open_store(&store_config).await;
        let server = ApiServer::start(config.clone(), store)
            .await
            .expect("start API server");
        let addr = server.local_addr;
        config.listen = addr;
        TestServer {
            server: Some(server),
            addr,
            store_config,
            config,
            dir,
            etcd,
        }
    }

    /// Stops the server (closing every connection) and starts it again on the same address and
    /// data.
    pub async fn restart(&mut self) {
        self.stop().await;
        let store = open_store(&self.store_config).await;
        let mut last = None;
        for _ in 0..50 {
            match ApiServer::start(self.config.clone(), store.clone()).await {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                // The old listener may take a moment to go.
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("restart API server: {:?}", last);
    }

    pub async fn stop(&mut self) {
        self.server = None;
        // Let aborted tasks drop their store handles.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node_join_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tokens/node-join"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Runs kubectl against the server.
    pub async fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(args, None).await
    }

    pub async fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(&self.kubeconfig(), self.dir.path(), args, stdin).await
    }

    /// Runs kubectl and returns stdout, failing the test on a non-zero exit.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).await;
        assert!(
            out.status.success(),
            "kubectl {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `manifest`.
    pub async fn apply(&self, manifest: &str) -> String {
        let out = self
            .kubectl_with(&["apply", "-f", "-"], Some(manifest))
            .await;
        assert!(
            out.status.success(),
            "apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kube-rs client with the admin credentials.
    pub async fn client(&self) -> kube::Client {
        client_for(&self.kubeconfig(), None).await
    }

    /// A kube-rs client with a bearer token of our choice.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        client_for(&self.kubeconfig(), Some(token)).await
    }
}

async fn open_store(c: &StoreConfig) -> Arc<dyn Store> {
    let mut last = None;
    for _ in 0..50 {
        match store::open(c).await {
            Ok(s) => return s,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("open store {c:?}: {last:?}");
}

/// Debian's kubectl with this kubeconfig and a private discovery cache.
pub async fn kubectl(
    kubeconfig: &Path,
    cache: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache.join("kubectl-cache"))
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .expect("run kubectl (Debian's kubernetes-client; `cargo xtask setup` installs it)");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin piped");
        pipe.write_all(input.as_bytes())
            .await
            .expect("write kubectl stdin");
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl took over 60 s")
        .expect("kubectl output")
}

pub async fn client_for(kubeconfig: &Path, token: Option<&str>) -> kube::Client {
    // kube-rs builds its TLS config from the process default; rustls has two providers here.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kube config");
    if let Some(t) = token {
        config.auth_info.token = Some(t.to_string().into());
    }
    config.read_timeout = Some(Duration::from_secs(60));
    kube::Client::try_from(config).expect("kube client")
}

/// The HTTP code of a kube-rs error (0 when it is not an API error).
pub fn code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
