//! Pure: a Pod -> the CRI sandbox config and the container configs kubelet would send. No I/O
//! but reading the node's resolv.conf for `dnsPolicy: Default`, which the caller passes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod};
use keel_cluster::scheduler::quantity;
use keel_cri::api;

use crate::AgentError;

/// Labels kubelet puts on sandboxes and containers; the pod uid one links a sandbox back to
/// its pod (adoption after a restart, orphan teardown).
pub(crate) const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub(crate) const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub(crate) const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub(crate) const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// What DNS settings pods get.
#[derive(Debug, Clone, Default)]
pub(crate) struct DnsSettings {
    pub cluster_dns: Option<IpAddr>,
    pub cluster_domain: String,
    /// The node's resolv.conf (servers, searches, options).
    pub host: api::DnsConfig,
}

pub(crate) struct PodKey {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

pub(crate) fn key(pod: &Pod) -> PodKey {
    PodKey {
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

/// Parses resolv.conf text.
pub(crate) fn parse_resolv_conf(text: &str) -> api::DnsConfig {
    let mut dns = api::DnsConfig::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => dns.servers.extend(f.next().map(str::to_owned)),
            Some("search") | Some("domain") => dns.searches = f.map(str::to_owned).collect(),
            Some("options") => dns.options.extend(f.map(str::to_owned)),
            _ => {}
        }
    }
    dns
}

/// The pod's DNS by its dnsPolicy (kubelet's rules; ClusterFirst without a cluster DNS falls
/// back to the node's, as kubelet does).
pub(crate) fn dns_config(pod: &Pod, dns: &DnsSettings) -> api::DnsConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let host_network = spec.host_network.unwrap_or(false);
    let cluster = match (policy, host_network) {
        ("ClusterFirst", false) | ("ClusterFirstWithHostNet", _) => dns.cluster_dns,
        _ => None,
    };
    let mut out = match (policy, cluster) {
        ("None", _) => api::DnsConfig::default(),
        (_, Some(server)) => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            let d = &dns.cluster_domain;
            api::DnsConfig {
                servers: vec![server.to_string()],
                searches: vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()],
                options: vec!["ndots:5".into()],
            }
        }
        _ => dns.host.clone(),
    };
    if let Some(extra) = spec.dns_config {
        out.servers.extend(extra.nameservers.unwrap_or_default());
        out.searches.extend(extra.searches.unwrap_or_default());
        for o in extra.options.unwrap_or_default() {
            match (o.name, o.value) {
                (Some(n), Some(v)) => out.options.push(format!("{n}:{v}")),
                (Some(n), None) => out.options.push(n),
                _ => {}
            }
        }
    }
    out
}

/// The sandbox's log directory: `<root>/<namespace>_<name>_<uid>`.
pub(crate) fn log_directory(root: &Path, k: &PodKey) -> String {
    root.join(format!("{}_{}_{}", k.namespace, k.name, k.uid))
        .display()
        .to_string()
}

fn protocol(p: Option<&str>) -> i32 {
    match p {
        Some("UDP") => api::Protocol::Udp as i32,
        Some("SCTP") => api::Protocol::Sctp as i32,
        _ => api::Protocol::Tcp as i32,
    }
}

/// RunPodSandbox's config.
pub(crate) fn sandbox_config(
    pod: &Pod,
    log_root: &Path,
    dns: &DnsSettings,
) -> api::PodSandboxConfig {
    let k = key(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.insert(LABEL_POD_UID.into(), k.uid.clone());
    labels.insert(LABEL_POD_NAME.into(), k.name.clone());
    labels.insert(LABEL_POD_NAMESPACE.into(), k.namespace.clone());
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| api::PortMapping {
            protocol: protocol(p.protocol.as_deref()),
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    let hostname = spec.hostname.clone().unwrap_or_else(|| k.name.clone());
    let mode = |node: bool| {
        if node {
            api::NamespaceMode::Node as i32
        } else {
            api::NamespaceMode::Pod as i32
        }
    };
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: k.name.clone(),
            uid: k.uid.clone(),
            namespace: k.namespace.clone(),
            attempt: 0,
        }),
        hostname,
        log_directory: log_directory(log_root, &k),
        dns_config: Some(dns_config(pod, dns)),
        port_mappings,
        labels,
        annotations: pod
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: mode(host_network),
                    pid: if spec.share_process_namespace.unwrap_or(false) {
                        api::NamespaceMode::Pod as i32
                    } else if spec.host_pid.unwrap_or(false) {
                        api::NamespaceMode::Node as i32
                    } else {
                        api::NamespaceMode::Container as i32
                    },
                    ipc: mode(spec.host_ipc.unwrap_or(false)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bad(pod: &PodKey, reason: String) -> AgentError {
    AgentError::PodSpec {
        pod: format!("{}/{}", pod.namespace, pod.name),
        reason,
    }
}

/// Linux resources from the container's requests and limits (kubelet's cgroup math:
/// shares = request millis * 1024 / 1000, min 2; quota = limit millis * period / 1000).
pub(crate) fn resources(
    c: &Container,
    k: &PodKey,
) -> Result<api::LinuxContainerResources, AgentError> {
    let r = c.resources.clone().unwrap_or_default();
    let limits = r.limits.unwrap_or_default();
    let requests = r.requests.unwrap_or_default();
    let parse_milli = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
        quantity::milli(&q.0)
            .map_err(|e| bad(k, format!("container {}: cpu {}: {}", c.name, q.0, e.0)))
    };
    let mut out = api::LinuxContainerResources::default();
    let cpu_request = match requests.get("cpu").or(limits.get("cpu")) {
        Some(q) => Some(parse_milli(q)?),
        None => None,
    };
    out.cpu_shares = cpu_request.map_or(2, |m| (m * 1024 / 1000).max(2));
    if let Some(q) = limits.get("cpu") {
        out.cpu_period = 100_000;
        out.cpu_quota = (parse_milli(q)? * 100_000 / 1000).max(1000);
    }
    if let Some(q) = limits.get("memory") {
        out.memory_limit_in_bytes = quantity::units(&q.0)
            .map_err(|e| bad(k, format!("container {}: memory {}: {}", c.name, q.0, e.0)))?;
    }
    Ok(out)
}

/// CreateContainer's config for restart number `attempt` of container `c`, with its
/// environment `env` (see pod_env.rs); `$(VAR)` in the command and args is expanded from it.
pub(crate) fn container_config(
    pod: &Pod,
    c: &Container,
    attempt: u32,
    env: Vec<(String, String)>,
) -> Result<api::ContainerConfig, AgentError> {
    let k = key(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let expand_all = |v: &Option<Vec<String>>| -> Vec<String> {
        v.iter()
            .flatten()
            .map(|a| crate::pod_env::expand(a, &lookup))
            .collect()
    };
    let command = expand_all(&c.command);
    let args = expand_all(&c.args);
    let envs = env
        .iter()
        .map(|(key, value)| api::KeyValue {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    let sc = c.security_context.clone().unwrap_or_default();
    let psc = spec.security_context.clone().unwrap_or_default();
    let run_as_user = sc.run_as_user.or(psc.run_as_user);
    let run_as_group = sc.run_as_group.or(psc.run_as_group);
    let caps = sc.capabilities.clone().unwrap_or_default();
    let security_context = api::LinuxContainerSecurityContext {
        capabilities: Some(api::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged: sc.privileged.unwrap_or(false),
        namespace_options: Some(api::NamespaceOption {
            network: if spec.host_network.unwrap_or(false) {
                api::NamespaceMode::Node as i32
            } else {
                api::NamespaceMode::Pod as i32
            },
            pid: if spec.share_process_namespace.unwrap_or(false) {
                api::NamespaceMode::Pod as i32
            } else if spec.host_pid.unwrap_or(false) {
                api::NamespaceMode::Node as i32
            } else {
                api::NamespaceMode::Container as i32
            },
            ..Default::default()
        }),
        run_as_user: run_as_user.map(|value| api::Int64Value { value }),
        run_as_group: run_as_group.map(|value| api::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: psc.supplemental_groups.unwrap_or_default(),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        ..Default::default()
    };
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(api::ImageSpec {
            image: c.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs,
        labels: HashMap::from([
            (LABEL_POD_UID.to_owned(), k.uid.clone()),
            (LABEL_POD_NAME.to_owned(), k.name.clone()),
            (LABEL_POD_NAMESPACE.to_owned(), k.namespace.clone()),
            (LABEL_CONTAINER_NAME.to_owned(), c.name.clone()),
        ]),
        log_path: format!("{}/{attempt}.log", c.name),
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources(c, &k)?),
            security_context: Some(security_context),
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web() -> Pod {
        pod(json!({
            "metadata": {"name": "web", "namespace": "prod", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"containers": [{
                "name": "c", "image": "busybox", "command": ["sh"], "args": ["-c", "true"],
                "workingDir": "/tmp", "stdin": true, "tty": true,
                "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 81, "protocol": "UDP"}],
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m"}},
                "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}
            }]}
        }))
    }

    #[test]
    fn sandbox_has_metadata_labels_log_dir_and_host_ports() {
        let dns = DnsSettings {
            cluster_dns: Some(IpAddr::from([10, 96, 0, 10])),
            cluster_domain: "cluster.local".into(),
            host: api::DnsConfig::default(),
        };
        let s = sandbox_config(&web(), Path::new("/var/log/pods"), &dns);
        let m = s.metadata.unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str(), m.uid.as_str()),
            ("web", "prod", "u1")
        );
        assert_eq!(s.hostname, "web");
        assert_eq!(s.log_directory, "/var/log/pods/prod_web_u1");
        assert_eq!(s.labels[LABEL_POD_UID], "u1");
        assert_eq!(s.labels["app"], "web");
        assert_eq!(s.port_mappings.len(), 1);
        assert_eq!(s.port_mappings[0].host_port, 8080);
        let d = s.dns_config.unwrap();
        assert_eq!(d.servers, ["10.96.0.10"]);
        assert_eq!(d.searches[0], "prod.svc.cluster.local");
        assert_eq!(d.options, ["ndots:5"]);
    }

    #[test]
    fn dns_policies() {
        let host = parse_resolv_conf("nameserver 1.1.1.1\nsearch example.org\noptions edns0\n");
        assert_eq!(host.servers, ["1.1.1.1"]);
        assert_eq!(host.searches, ["example.org"]);
        let mut dns = DnsSettings {
            cluster_dns: None,
            cluster_domain: "cluster.local".into(),
            host: host.clone(),
        };
        // ClusterFirst without a cluster DNS: the node's.
        assert_eq!(dns_config(&web(), &dns), host);
        dns.cluster_dns = Some(IpAddr::from([10, 96, 0, 10]));
        let mut p = web();
        p.spec.as_mut().unwrap().dns_policy = Some("Default".into());
        assert_eq!(dns_config(&p, &dns), host);
        let p = pod(
            json!({"metadata": {"name": "x"}, "spec": {"dnsPolicy": "None", "containers": [],
            "dnsConfig": {"nameservers": ["9.9.9.9"], "options": [{"name": "ndots", "value": "2"}]}}}),
        );
        let d = dns_config(&p, &dns);
        assert_eq!(d.servers, ["9.9.9.9"]);
        assert_eq!(d.options, ["ndots:2"]);
        assert!(d.searches.is_empty());
    }

    #[test]
    fn container_config_translates_spec() {
        let p = web();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env = vec![("A".to_string(), "1".to_string())];
        let cc = container_config(&p, c, 2, env).unwrap();
        assert_eq!(cc.metadata.as_ref().unwrap().attempt, 2);
        assert_eq!(cc.command, ["sh"]);
        assert_eq!(cc.args, ["-c", "true"]);
        assert_eq!(cc.working_dir, "/tmp");
        assert!(cc.stdin && cc.tty && !cc.stdin_once);
        assert_eq!(
            (cc.envs[0].key.as_str(), cc.envs[0].value.as_str()),
            ("A", "1")
        );
        assert_eq!(cc.log_path, "c/2.log");
        assert_eq!(cc.labels[LABEL_CONTAINER_NAME], "c");
        let linux = cc.linux.unwrap();
        let r = linux.resources.unwrap();
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 50_000));
        assert_eq!(r.cpu_shares, 256);
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        let sc = linux.security_context.unwrap();
        assert_eq!(sc.run_as_user.unwrap().value, 1000);
        assert!(sc.readonly_rootfs);
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, ["ALL"]);
    }

    #[test]
    fn bad_quantity_names_the_pod() {
        let mut p = web();
        p.spec.as_mut().unwrap().containers[0]
            .resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .insert(
                "cpu".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("lots".into()),
            );
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let e = container_config(&p, &c, 0, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prod/web") && e.contains("lots"), "{e}");
    }
}
