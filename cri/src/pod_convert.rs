//! Pure translation between CRI pod sandbox messages and keel-runtime's pod types:
//! `PodSandboxConfig` -> [`PodConfig`], [`PodInfo`] -> `PodSandbox` / `PodSandboxStatus`, CRI
//! filters -> [`PodFilter`] plus what the runtime filter cannot say.
//!
//! The runtime's pod name is unique per node; CRI's uniqueness key is the whole metadata
//! (name, namespace, uid, attempt), so the runtime name is [`unique_name`] of it (containerd's
//! `makeSandboxName`) and the CRI name travels in the reserved annotation [`POD_NAME_KEY`],
//! which never shows in CRI answers.

use std::collections::{BTreeMap, HashMap};

use keel_runtime::pod::{
    DnsConfig, PodConfig, PodFilter, PodInfo, PodRecord, PodState, PortMapping, Protocol,
};

use crate::{CriError, api};

/// Annotation holding the CRI metadata name of a pod (reserved; stripped from answers).
pub(crate) const POD_NAME_KEY: &str = "io.keel.cri.pod-name";
/// Every annotation key keel-cri reserves for itself starts with this.
pub(crate) const RESERVED_PREFIX: &str = "io.keel.cri.";

/// The runtime name of a sandbox: unique for each CRI metadata.
pub(crate) fn unique_name(m: &api::PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// The CRI metadata name of a pod.
pub(crate) fn cri_name(pod: &PodRecord) -> String {
    pod.config
        .annotations
        .get(POD_NAME_KEY)
        .cloned()
        .unwrap_or_else(|| {
            pod.config
                .name
                .split('_')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

/// Labels or annotations as CRI shows them: without keel-cri's reserved keys.
pub(crate) fn visible(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn port(value: i32, field: &'static str) -> Result<u16, CriError> {
    u16::try_from(value).map_err(|_| CriError::invalid(field, format!("{value} is not a port")))
}

/// What RunPodSandbox asks the runtime for.
pub(crate) fn pod_config(config: Option<&api::PodSandboxConfig>) -> Result<PodConfig, CriError> {
    let config = config.ok_or_else(|| CriError::invalid("config", "missing"))?;
    let m = config
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata", "missing"))?;
    if m.name.is_empty() {
        return Err(CriError::invalid("config.metadata.name", "empty"));
    }
    if m.name.contains('_') || m.namespace.contains('_') {
        // The unique name joins the fields with '_'.
        return Err(CriError::invalid(
            "config.metadata",
            "name and namespace must not contain '_'",
        ));
    }
    let linux = config.linux.clone().unwrap_or_default();
    let ns = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let mut annotations: BTreeMap<String, String> = config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(POD_NAME_KEY.to_owned(), m.name.clone());
    let port_mappings = config
        .port_mappings
        .iter()
        .map(|p| {
            Ok(PortMapping {
                protocol: match api::Protocol::try_from(p.protocol) {
                    Ok(api::Protocol::Udp) => Protocol::Udp,
                    Ok(api::Protocol::Sctp) => Protocol::Sctp,
                    Ok(api::Protocol::Tcp) => Protocol::Tcp,
                    Err(_) => {
                        return Err(CriError::invalid(
                            "config.port_mappings.protocol",
                            format!("unknown protocol {}", p.protocol),
                        ));
                    }
                },
                container_port: port(p.container_port, "config.port_mappings.container_port")?,
                host_port: port(p.host_port, "config.port_mappings.host_port")?,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect::<Result<_, CriError>>()?;
    let mut pod = PodConfig {
        name: unique_name(m),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        attempt: m.attempt,
        hostname: (!config.hostname.is_empty()).then(|| config.hostname.clone()),
        dns: config.dns_config.as_ref().map(|d| DnsConfig {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
        share_pid: ns.pid == api::NamespaceMode::Pod as i32,
        cgroup_parent: (!linux.cgroup_parent.is_empty()).then(|| linux.cgroup_parent.clone()),
        sysctls: linux.sysctls.into_iter().collect(),
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        annotations,
        port_mappings,
        log_directory: (!config.log_directory.is_empty())
            .then(|| config.log_directory.clone().into()),
        ..Default::default()
    };
    pod.host.network = ns.network == api::NamespaceMode::Node as i32;
    pod.host.pid = ns.pid == api::NamespaceMode::Node as i32;
    pod.host.ipc = ns.ipc == api::NamespaceMode::Node as i32;
    Ok(pod)
}

fn metadata(rec: &PodRecord) -> api::PodSandboxMetadata {
    api::PodSandboxMetadata {
        name: cri_name(rec),
        uid: rec.config.uid.clone(),
        namespace: rec.config.namespace.clone(),
        attempt: rec.config.attempt,
    }
}

pub(crate) fn state(s: PodState) -> api::PodSandboxState {
    match s {
        PodState::Ready => api::PodSandboxState::SandboxReady,
        PodState::Creating | PodState::NotReady => api::PodSandboxState::SandboxNotready,
    }
}

fn nanos(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(0)
}

/// A pod as ListPodSandbox shows it.
pub(crate) fn pod_sandbox(info: &PodInfo) -> api::PodSandbox {
    let rec = &info.record;
    api::PodSandbox {
        id: rec.id.clone(),
        metadata: Some(metadata(rec)),
        state: state(info.state) as i32,
        created_at: nanos(rec.created_at),
        labels: visible(&rec.config.labels),
        annotations: visible(&rec.config.annotations),
        runtime_handler: String::new(),
    }
}

/// The namespace modes a pod was run with, as CRI spells them.
pub(crate) fn namespace_options(config: &PodConfig) -> api::NamespaceOption {
    let mode = |host: bool| {
        if host {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        }
    };
    api::NamespaceOption {
        network: mode(config.host.network) as i32,
        pid: if config.host.pid {
            api::NamespaceMode::Node
        } else if config.share_pid {
            api::NamespaceMode::Pod
        } else {
            api::NamespaceMode::Container
        } as i32,
        ipc: mode(config.host.ipc) as i32,
        ..Default::default()
    }
}

/// A pod as PodSandboxStatus shows it.
pub(crate) fn pod_status(info: &PodInfo) -> api::PodSandboxStatus {
    let rec = &info.record;
    let mut ips = rec.network.ips.iter().map(|ip| ip.to_string());
    let network = if rec.config.host.network {
        // Host-network pods have the node's addresses; kubelet fills them in itself.
        None
    } else {
        Some(api::PodSandboxNetworkStatus {
            ip: ips.next().unwrap_or_default(),
            additional_ips: ips.map(|ip| api::PodIp { ip }).collect(),
        })
    };
    api::PodSandboxStatus {
        id: rec.id.clone(),
        metadata: Some(metadata(rec)),
        state: state(info.state) as i32,
        created_at: nanos(rec.created_at),
        network,
        linux: Some(api::LinuxPodSandboxStatus {
            namespaces: Some(api::Namespace {
                options: Some(namespace_options(&rec.config)),
            }),
        }),
        labels: visible(&rec.config.labels),
        annotations: visible(&rec.config.annotations),
        runtime_handler: String::new(),
    }
}

/// The runtime filter for a CRI pod filter.
pub(crate) fn pod_filter(f: Option<&api::PodSandboxFilter>) -> PodFilter {
    let Some(f) = f else {
        return PodFilter::default();
    };
    PodFilter {
        id_prefix: (!f.id.is_empty()).then(|| f.id.clone()),
        // By [`state_matches`]: CRI's NOTREADY covers the runtime's Creating and NotReady.
        state: None,
        labels: f
            .label_selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Whether a pod matches a CRI filter's state: the runtime's NotReady filter misses pods
/// whose run never finished (Creating), which CRI shows as NOTREADY too.
pub(crate) fn state_matches(f: Option<&api::PodSandboxFilter>, info: &PodInfo) -> bool {
    f.and_then(|f| f.state.as_ref())
        .is_none_or(|s| s.state == state(info.state) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 2,
            }),
            hostname: "web-0".into(),
            log_directory: "/var/log/pods/default_web_u1".into(),
            dns_config: Some(api::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: vec![api::PortMapping {
                protocol: api::Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            }],
            labels: HashMap::from([("app".into(), "web".into())]),
            annotations: HashMap::from([("note".into(), "x".into())]),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/podu1".into(),
                sysctls: HashMap::from([("net.ipv4.ip_forward".into(), "1".into())]),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Pod as i32,
                        pid: api::NamespaceMode::Container as i32,
                        ipc: api::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_sandbox_config_becomes_a_pod_config() {
        let p = pod_config(Some(&config())).unwrap();
        assert_eq!(p.name, "web_default_u1_2");
        assert_eq!(p.namespace, "default");
        assert_eq!(p.attempt, 2);
        assert_eq!(p.hostname.as_deref(), Some("web-0"));
        assert_eq!(p.dns.as_ref().unwrap().options, vec!["ndots:5"]);
        assert!(!p.host.network && !p.host.pid && p.host.ipc);
        assert!(!p.share_pid);
        assert_eq!(p.cgroup_parent.as_deref(), Some("/kubepods/podu1"));
        assert_eq!(p.sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(p.port_mappings[0].protocol, Protocol::Udp);
        assert_eq!(p.port_mappings[0].host_port, 5353);
        assert_eq!(p.annotations[POD_NAME_KEY], "web");
        assert_eq!(
            p.log_directory.as_deref(),
            Some(std::path::Path::new("/var/log/pods/default_web_u1"))
        );
    }

    #[test]
    fn malformed_sandbox_configs_name_the_field() {
        let e = pod_config(None).unwrap_err();
        assert!(e.to_string().contains("config"), "{e}");
        let mut c = config();
        c.metadata = None;
        assert!(
            pod_config(Some(&c))
                .unwrap_err()
                .to_string()
                .contains("config.metadata")
        );
        let mut c = config();
        c.metadata.as_mut().unwrap().name.clear();
        assert!(
            pod_config(Some(&c))
                .unwrap_err()
                .to_string()
                .contains("config.metadata.name")
        );
        let mut c = config();
        c.port_mappings[0].host_port = 70000;
        let e = pod_config(Some(&c)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("host_port"), "{e}");
    }

    #[test]
    fn a_pod_round_trips_metadata_labels_and_namespaces() {
        let cfg = pod_config(Some(&config())).unwrap();
        let rec = PodRecord {
            id: "abc".into(),
            config: cfg,
            created_at: chrono::Utc::now(),
            state: PodState::Ready,
            hostname: "web-0".into(),
            cgroup_parent: "kubepods/podu1".into(),
            namespaces: Default::default(),
            keeper: None,
            shm: None,
            network: keel_runtime::pod::PodIps {
                ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                details: serde_json::Value::Null,
            },
            network_ready: true,
            stopped_at: None,
        };
        let info = PodInfo {
            record: rec,
            state: PodState::Ready,
        };
        let s = pod_status(&info);
        let m = s.metadata.unwrap();
        assert_eq!(
            (
                m.name.as_str(),
                m.namespace.as_str(),
                m.uid.as_str(),
                m.attempt
            ),
            ("web", "default", "u1", 2)
        );
        assert_eq!(s.state, api::PodSandboxState::SandboxReady as i32);
        let net = s.network.unwrap();
        assert_eq!(net.ip, "10.1.0.5");
        assert_eq!(net.additional_ips[0].ip, "fd00::5");
        assert_eq!(s.labels["app"], "web");
        assert_eq!(s.annotations["note"], "x");
        assert!(!s.annotations.contains_key(POD_NAME_KEY));
        let ns = s.linux.unwrap().namespaces.unwrap().options.unwrap();
        assert_eq!(ns.ipc, api::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, api::NamespaceMode::Container as i32);
        let listed = pod_sandbox(&info);
        assert_eq!(listed.id, "abc");
        assert_eq!(listed.labels, s.labels);
    }

    #[test]
    fn filters_translate_state_and_labels() {
        let f = api::PodSandboxFilter {
            id: "ab".into(),
            state: Some(api::PodSandboxStateValue {
                state: api::PodSandboxState::SandboxNotready as i32,
            }),
            label_selector: HashMap::from([("app".into(), "web".into())]),
        };
        let pf = pod_filter(Some(&f));
        assert_eq!(pf.id_prefix.as_deref(), Some("ab"));
        assert_eq!(pf.state, None);
        assert_eq!(pf.labels["app"], "web");
        assert!(pod_filter(None).id_prefix.is_none());
    }
}
