//! Startup, readiness and liveness probes, as kubelet runs them: one task per running container
//! that has any, which runs exec probes through CRI ExecSync, httpGet with an HTTP/1.1 GET to the
//! pod IP (2xx and 3xx succeed) and tcpSocket with a connect, each with its timeout, period,
//! initial delay and success/failure thresholds. The task publishes what it concluded; the sync
//! pass reads it (`ready` and `started` in the container status, a failed liveness or startup
//! probe makes it stop the container, which is then restarted by the restart policy).
//!
//! Pure: [`ProbeSpec::of`] and [`Counter`]. Must not write pods or drive containers itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keel_cri::api;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;

use crate::Cri;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Exec(Vec<String>),
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
}

/// A probe with kubelet's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeSpec {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        v.map_or(default, |s| u64::try_from(s).unwrap_or(0))
            .max(min),
    )
}

fn port_of(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("port {n} is out of range")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("no container port named {name:?}"))
        }
    }
}

impl ProbeSpec {
    /// The probe `p` of container `c`; the error says what cannot be run.
    pub fn of(p: &Probe, c: &Container) -> Result<ProbeSpec, String> {
        let action = if let Some(e) = &p.exec {
            let cmd = e.command.clone().unwrap_or_default();
            if cmd.is_empty() {
                return Err("exec probe without a command".into());
            }
            Action::Exec(cmd)
        } else if let Some(h) = &p.http_get {
            if h.scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
            {
                return Err("httpGet probes over HTTPS are not supported yet".into());
            }
            Action::Http {
                host: h.host.clone().filter(|h| !h.is_empty()),
                port: port_of(&h.port, c)?,
                path: h
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/".into()),
                headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|hh| (hh.name.clone(), hh.value.clone()))
                    .collect(),
            }
        } else if let Some(t) = &p.tcp_socket {
            Action::Tcp {
                host: t.host.clone().filter(|h| !h.is_empty()),
                port: port_of(&t.port, c)?,
            }
        } else if p.grpc.is_some() {
            return Err("grpc probes are not supported yet".into());
        } else {
            return Err("the probe has no handler (exec, httpGet or tcpSocket)".into());
        };
        Ok(ProbeSpec {
            action,
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: p.success_threshold.map_or(1, |n| n.max(1) as u32),
            failure_threshold: p.failure_threshold.map_or(3, |n| n.max(1) as u32),
        })
    }
}

/// Consecutive results against the thresholds: the probe's conclusion changes only after
/// `success_threshold` successes or `failure_threshold` failures in a row.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    successes: u32,
    failures: u32,
    pub result: Option<bool>,
}

impl Counter {
    /// Records one run; the conclusion after it.
    pub fn record(&mut self, ok: bool, spec: &ProbeSpec) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= spec.success_threshold {
                self.result = Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= spec.failure_threshold {
                self.result = Some(false);
            }
        }
        self.result
    }
}

/// What the probes of one container concluded so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The startup probe succeeded (or there is none).
    pub started: bool,
    /// The readiness probe succeeds (or there is none, once started).
    pub ready: bool,
    /// The liveness or startup probe failed: the container must be restarted.
    pub failed: Option<&'static str>,
}

/// The probe tasks of this node's containers, by container id.
#[derive(Default)]
pub(crate) struct Probers {
    tasks: HashMap<String, JoinHandle<()>>,
    verdicts: Arc<Mutex<HashMap<String, Verdict>>>,
}

impl Probers {
    /// The verdict for running container `id` of spec `c`, starting its probe task on first
    /// sight. None: the container has no probes (it is ready once running).
    pub fn verdict(
        &mut self,
        id: &str,
        c: &Container,
        pod_ip: Option<IpAddr>,
        cri: &Cri,
    ) -> Option<Verdict> {
        if c.startup_probe.is_none() && c.readiness_probe.is_none() && c.liveness_probe.is_none() {
            return None;
        }
        if !self.tasks.contains_key(id) {
            let spec = |p: &Option<Probe>, kind: &str| {
                p.as_ref().and_then(|p| match ProbeSpec::of(p, c) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(container = %c.name, "{kind} probe ignored: {e}");
                        None
                    }
                })
            };
            let set = ProbeSet {
                startup: spec(&c.startup_probe, "startup"),
                readiness: spec(&c.readiness_probe, "readiness"),
                liveness: spec(&c.liveness_probe, "liveness"),
            };
            let initial = Verdict {
                started: set.startup.is_none(),
                ready: false,
                failed: None,
            };
            self.verdicts
                .lock()
                .expect("verdicts lock")
                .insert(id.to_string(), initial);
            let task = tokio::spawn(run(
                id.to_string(),
                set,
                pod_ip,
                cri.clone(),
                self.verdicts.clone(),
            ));
            self.tasks.insert(id.to_string(), task);
        }
        self.verdicts
            .lock()
            .expect("verdicts lock")
            .get(id)
            .copied()
    }

    /// Stops the tasks of containers not in `running`.
    pub fn retain(&mut self, running: &std::collections::HashSet<String>) {
        self.tasks.retain(|id, t| {
            let keep = running.contains(id);
            if !keep {
                t.abort();
            }
            keep
        });
        self.verdicts
            .lock()
            .expect("verdicts lock")
            .retain(|id, _| running.contains(id));
    }
}

struct ProbeSet {
    startup: Option<ProbeSpec>,
    readiness: Option<ProbeSpec>,
    liveness: Option<ProbeSpec>,
}

/// The probe task of one container: startup first, then readiness and liveness side by side.
async fn run(
    id: String,
    set: ProbeSet,
    pod_ip: Option<IpAddr>,
    cri: Cri,
    verdicts: Arc<Mutex<HashMap<String, Verdict>>>,
) {
    let update = |f: &dyn Fn(&mut Verdict)| {
        if let Some(v) = verdicts.lock().expect("verdicts lock").get_mut(&id) {
            f(v);
        }
    };
    if let Some(spec) = &set.startup {
        tokio::time::sleep(spec.initial_delay).await;
        let mut c = Counter::default();
        loop {
            match c.record(probe(spec, &id, pod_ip, &cri).await, spec) {
                Some(true) => break,
                Some(false) => {
                    update(&|v| v.failed = Some("startup"));
                    return;
                }
                None => tokio::time::sleep(spec.period).await,
            }
        }
        update(&|v| v.started = true);
    }
    let readiness = async {
        let Some(spec) = &set.readiness else {
            update(&|v| v.ready = true);
            return;
        };
        tokio::time::sleep(spec.initial_delay).await;
        let mut c = Counter::default();
        loop {
            if let Some(r) = c.record(probe(spec, &id, pod_ip, &cri).await, spec) {
                update(&|v| v.ready = r);
            }
            tokio::time::sleep(spec.period).await;
        }
    };
    let liveness = async {
        let Some(spec) = &set.liveness else { return };
        tokio::time::sleep(spec.initial_delay).await;
        let mut c = Counter::default();
        loop {
            if c.record(probe(spec, &id, pod_ip, &cri).await, spec) == Some(false) {
                update(&|v| v.failed = Some("liveness"));
                return;
            }
            tokio::time::sleep(spec.period).await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// Runs a probe once: success or not (a timeout is a failure).
async fn probe(spec: &ProbeSpec, id: &str, pod_ip: Option<IpAddr>, cri: &Cri) -> bool {
    let target = |host: &Option<String>, port: u16| -> Option<SocketAddr> {
        let ip = match host {
            Some(h) => h.parse().ok()?,
            None => pod_ip?,
        };
        Some(SocketAddr::new(ip, port))
    };
    match &spec.action {
        Action::Exec(cmd) => {
            let mut cri = cri.clone();
            let req = api::ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.clone(),
                timeout: spec.timeout.as_secs() as i64,
            };
            match cri.runtime.exec_sync(req).await {
                Ok(r) => r.into_inner().exit_code == 0,
                Err(e) => {
                    tracing::debug!(container = id, "exec probe: {e}");
                    false
                }
            }
        }
        Action::Tcp { host, port } => match target(host, *port) {
            Some(addr) => matches!(
                tokio::time::timeout(spec.timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            ),
            None => false,
        },
        Action::Http {
            host,
            port,
            path,
            headers,
        } => match target(host, *port) {
            Some(addr) => tokio::time::timeout(spec.timeout, http_get(addr, path, headers))
                .await
                .is_ok_and(|code| code.is_some_and(|c| (200..400).contains(&c))),
            None => false,
        },
    }
}

/// GET `path` from `addr` over HTTP/1.1; the status code.
async fn http_get(addr: SocketAddr, path: &str, headers: &[(String, String)]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf)
}

/// The status code of an HTTP/1.x response's first line.
fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn specs_get_kubelets_defaults_and_resolve_named_ports() {
        let c = container(
            json!({"name": "web", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/healthz"}},
            "livenessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 2, "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["true"]}, "initialDelaySeconds": 3}}),
        );
        let r = ProbeSpec::of(c.readiness_probe.as_ref().unwrap(), &c).unwrap();
        assert_eq!(
            r.action,
            Action::Http {
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            (
                r.period,
                r.timeout,
                r.success_threshold,
                r.failure_threshold
            ),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let l = ProbeSpec::of(c.liveness_probe.as_ref().unwrap(), &c).unwrap();
        assert_eq!(
            l.action,
            Action::Tcp {
                host: None,
                port: 9000
            }
        );
        assert_eq!((l.period, l.failure_threshold), (Duration::from_secs(2), 1));
        let s = ProbeSpec::of(c.startup_probe.as_ref().unwrap(), &c).unwrap();
        assert_eq!(s.initial_delay, Duration::from_secs(3));

        let bad = container(json!({"name": "x",
            "readinessProbe": {"httpGet": {"port": "nope"}},
            "livenessProbe": {"grpc": {"port": 1}}}));
        let e = ProbeSpec::of(bad.readiness_probe.as_ref().unwrap(), &bad).unwrap_err();
        assert!(e.contains("nope"), "{e}");
        assert!(ProbeSpec::of(bad.liveness_probe.as_ref().unwrap(), &bad).is_err());
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let c = container(
            json!({"name": "x", "readinessProbe": {"exec": {"command": ["true"]},
            "successThreshold": 2, "failureThreshold": 2}}),
        );
        let spec = ProbeSpec::of(c.readiness_probe.as_ref().unwrap(), &c).unwrap();
        let mut n = Counter::default();
        assert_eq!(n.record(true, &spec), None);
        assert_eq!(n.record(false, &spec), None);
        assert_eq!(n.record(true, &spec), None);
        assert_eq!(n.record(true, &spec), Some(true));
        assert_eq!(n.record(false, &spec), Some(true));
        assert_eq!(n.record(false, &spec), Some(false));
        assert_eq!(n.record(true, &spec), Some(false));
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 500 x\r\n"), Some(500));
        assert_eq!(parse_status_line(b"SSH-2.0\r\n"), None);
    }
}
