//! `GET pods/<name>/log`: the API server finds the pod's node and streams the container's log
//! from that node's agent, as kube-apiserver does through the kubelet.
//!
//! The agent is reached at the Node's InternalIP and `status.daemonEndpoints.kubeletEndpoint`
//! port over HTTPS. Its self-signed certificate is accepted only if it matches the pin the node
//! wrote into its own Node (`keel.dev/agent-cert-sha256`; only that node's credential may write
//! it), and the request carries the node's own credential, which the agent checks: neither side
//! can be impersonated by another node. Must not read logs itself: what is in the log and how it
//! is followed is the agent's business (agent/src/logs.rs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::auth::node_credential;
use super::objects::{self, State};
use super::pki;
use super::resources::{self, Resource};
use super::status::ApiError;

/// How long connecting to a node's agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The log query parameters passed on to the agent, with the check each one gets here so that
/// a bad value is answered by the API server, naming the parameter.
const PASSED: [(&str, Check); 7] = [
    ("follow", Check::Bool),
    ("previous", Check::Bool),
    ("timestamps", Check::Bool),
    ("tailLines", Check::Count { min: 0 }),
    ("limitBytes", Check::Count { min: 1 }),
    ("sinceSeconds", Check::Count { min: 1 }),
    ("sinceTime", Check::Time),
];

#[derive(Clone, Copy)]
enum Check {
    Bool,
    Count { min: i64 },
    Time,
}

/// Checks the log query; the parameters to pass on, in a fixed order.
pub(crate) fn log_params(
    q: &HashMap<String, String>,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let mut out = Vec::new();
    for (name, check) in PASSED {
        let Some(v) = q.get(name) else { continue };
        let ok = match check {
            Check::Bool => matches!(v.as_str(), "true" | "false" | "1" | "0" | ""),
            Check::Count { min } => v.parse::<i64>().is_ok_and(|n| n >= min),
            Check::Time => chrono::DateTime::parse_from_rfc3339(v).is_ok(),
        };
        if !ok {
            let want = match check {
                Check::Bool => "true or false".to_string(),
                Check::Count { min } => format!("an integer >= {min}"),
                Check::Time => "an RFC 3339 time".to_string(),
            };
            return Err(ApiError::bad_request(format!(
                "invalid log query parameter {name}={v:?}: must be {want}"
            )));
        }
        if q.contains_key("sinceSeconds") && q.contains_key("sinceTime") && name == "sinceTime" {
            return Err(ApiError::bad_request(
                "at most one of sinceSeconds or sinceTime may be specified",
            ));
        }
        out.push((name, v.clone()));
    }
    Ok(out)
}

/// The container a log request names: `container`, or the pod's only container.
pub(crate) fn log_container(
    pod: &Value,
    name: &str,
    asked: Option<&str>,
) -> Result<String, ApiError> {
    let names = |field: &str| -> Vec<String> {
        pod["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let containers = names("containers");
    let init = names("initContainers");
    match asked.filter(|c| !c.is_empty()) {
        Some(c) if containers.iter().chain(&init).any(|n| n == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// Where a node's agent serves: address, port and certificate pin.
fn agent_endpoint(node: &Value, node_name: &str) -> Result<(IpAddr, u16, String), ApiError> {
    let ip = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "InternalIP")
        .find_map(|a| a["address"].as_str()?.parse::<IpAddr>().ok());
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let pin = node["metadata"]["annotations"][pki::AGENT_CERT_PIN_ANNOTATION].as_str();
    match (ip, port, pin) {
        (Some(ip), Some(port), Some(pin)) => Ok((ip, port, pin.to_string())),
        _ => Err(ApiError::unavailable(format!(
            "node {node_name} publishes no agent endpoint (InternalIP, \
             daemonEndpoints.kubeletEndpoint.Port and the {} annotation): its agent does not \
             serve logs",
            pki::AGENT_CERT_PIN_ANNOTATION
        ))),
    }
}

/// `GET /api/v1/namespaces/<ns>/pods/<name>/log`.
pub(crate) async fn pod_log(
    state: &State,
    res: &Resource,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let params = log_params(q)?;
    let (pod, _) = objects::get(state, res, Some(ns), name).await?;
    let container = log_container(&pod, name, q.get("container").map(String::as_str))?;
    let node_name = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_string();
    let nodes = resources::lookup("", "v1", "nodes").expect("nodes are served");
    let (node, _) = objects::get(state, nodes, None, &node_name).await?;
    let (ip, port, pin) = agent_endpoint(&node, &node_name)?;
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();

    let mut path = format!(
        "/containerLogs/{}/{}/{}?podUID={}",
        encode(ns),
        encode(name),
        encode(&container),
        encode(uid)
    );
    for (k, v) in &params {
        path.push_str(&format!("&{k}={}", encode(v)));
    }
    let target = format!("https://{}{path}", std::net::SocketAddr::new(ip, port));
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("{what} {target}: {e}"))
    };

    let tls = pki::pinned_client(&pin).map_err(|e| ApiError::internal(e.to_string()))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((ip, port)))
        .await
        .map_err(|_| fail("connect to", &"timed out"))?
        .map_err(|e| fail("connect to", &e))?;
    let _ = tcp.set_nodelay(true);
    let server_name = rustls::pki_types::ServerName::IpAddress(ip.into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail("TLS to", &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail("HTTP to", &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "agent log connection");
        }
    });
    let credential = node_credential(&state.tokens.node_join, &node_name);
    let req = Request::get(path)
        .header(
            header::HOST,
            std::net::SocketAddr::new(ip, port).to_string(),
        )
        .header(header::AUTHORIZATION, format!("Bearer {credential}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail("GET", &e))?;
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("text/plain"));
    out.headers_mut().insert(header::CONTENT_TYPE, ct);
    if parts.status == StatusCode::UNAUTHORIZED {
        tracing::warn!(node = %node_name, "the node's agent refused the node's credential");
    }
    Ok(out)
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_container_is_named_or_the_only_one() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(log_container(&one, "p", None).unwrap(), "app");
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}],
                                  "initContainers": [{"name": "init"}]}});
        let e = log_container(&two, "p", None).unwrap_err().to_status();
        assert_eq!(e["code"], 400);
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("choose one of: [a b]")
        );
        assert_eq!(log_container(&two, "p", Some("init")).unwrap(), "init");
        let e = log_container(&two, "p", Some("zz"))
            .unwrap_err()
            .to_status();
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("container zz is not valid")
        );
    }

    #[test]
    fn log_parameters_are_checked_and_named() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = log_params(&q(&[("follow", "true"), ("tailLines", "0"), ("x", "y")])).unwrap();
        assert_eq!(
            ok,
            vec![("follow", "true".into()), ("tailLines", "0".into())]
        );
        for bad in [
            ("tailLines", "-1"),
            ("limitBytes", "0"),
            ("follow", "yes"),
            ("sinceTime", "now"),
        ] {
            let e = log_params(&q(&[bad])).unwrap_err().to_status();
            assert!(e["message"].as_str().unwrap().contains(bad.0), "{e}");
        }
        assert!(
            log_params(&q(&[
                ("sinceSeconds", "5"),
                ("sinceTime", "2026-01-01T00:00:00Z")
            ]))
            .is_err()
        );
    }

    #[test]
    fn a_node_without_an_agent_endpoint_is_unavailable() {
        let node =
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}});
        let e = agent_endpoint(&node, "n1").unwrap_err().to_status();
        assert_eq!(e["code"], 503);
        let node = json!({
            "metadata": {"annotations": {pki::AGENT_CERT_PIN_ANNOTATION: "ab"}},
            "status": {"addresses": [{"type": "Hostname", "address": "h"},
                                     {"type": "InternalIP", "address": "10.0.0.2"}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        let (ip, port, pin) = agent_endpoint(&node, "n1").unwrap();
        assert_eq!(
            (ip.to_string().as_str(), port, pin.as_str()),
            ("10.0.0.2", 10250, "ab")
        );
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
