//! The Node: machine capacity, registration (create or update), and the heartbeats (the Lease
//! in `kube-node-lease`, and the Ready condition's `lastHeartbeatTime`), as kubelet does them.
//! Must not touch pods.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use keel_cluster::api::pki::AGENT_CERT_PIN_ANNOTATION;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{AgentError, Cri, api_err, cri_err};

/// What the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub pods: u32,
}

impl Capacity {
    /// CPUs the process may run on, memory from /proc/meminfo.
    pub fn of_machine(pods: u32) -> Result<Capacity, AgentError> {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .map_err(|source| AgentError::Machine {
                what: "cpu count",
                source,
            })?;
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").map_err(|source| AgentError::Machine {
                what: "/proc/meminfo",
                source,
            })?;
        Ok(Capacity {
            cpus,
            memory_bytes: parse_meminfo(&meminfo).unwrap_or(0),
            pods,
        })
    }
}

/// `MemTotal` of /proc/meminfo, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let n: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(n * 1024),
        _ => None,
    }
}

/// The host name (the Hostname address), as the kernel has it.
pub(crate) fn hostname() -> Result<String, AgentError> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .map_err(|source| AgentError::Machine {
            what: "/proc/sys/kernel/hostname",
            source,
        })
}

/// Without a configured node IP: loopback, which every machine has (real nodes pass theirs;
/// guessing the right interface is left to the operator, as kubelet's `--node-ip`).
pub(crate) fn default_node_ip() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// `<runtime_name>://<runtime_version>` from the CRI Version RPC.
pub(crate) async fn runtime_version(cri: &mut Cri) -> Result<String, AgentError> {
    let v = cri
        .runtime
        .version(keel_cri::api::VersionRequest {
            version: "v1".into(),
        })
        .await
        .map_err(cri_err("Version"))?
        .into_inner();
    Ok(format!("{}://{}", v.runtime_name, v.runtime_version))
}

/// What the Node says about itself.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub name: String,
    pub hostname: String,
    pub node_ip: IpAddr,
    /// The log endpoint's port and certificate pin, if it serves.
    pub endpoint: Option<(u16, String)>,
    pub capacity: Capacity,
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
    pub runtime_version: String,
}

impl Registration {
    /// The Node's status: capacity, allocatable = capacity - reserved, addresses, nodeInfo,
    /// Ready=True heartbeating now.
    pub fn status(&self, transition: &Time) -> NodeStatus {
        let c = self.capacity;
        let capacity = BTreeMap::from([
            ("cpu".to_owned(), Quantity(c.cpus.to_string())),
            ("memory".to_owned(), Quantity(format!("{}", c.memory_bytes))),
            ("pods".to_owned(), Quantity(c.pods.to_string())),
        ]);
        let cpu_alloc = (c.cpus * 1000).saturating_sub(self.reserved_cpu_millis);
        let mem_alloc = c.memory_bytes.saturating_sub(self.reserved_memory_bytes);
        let allocatable = BTreeMap::from([
            ("cpu".to_owned(), Quantity(format!("{cpu_alloc}m"))),
            ("memory".to_owned(), Quantity(format!("{mem_alloc}"))),
            ("pods".to_owned(), Quantity(c.pods.to_string())),
        ]);
        NodeStatus {
            capacity: Some(capacity),
            allocatable: Some(allocatable),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: self.node_ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: self.hostname.clone(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: std::env::consts::ARCH.into(),
                operating_system: std::env::consts::OS.into(),
                container_runtime_version: self.runtime_version.clone(),
                kubelet_version: format!("keel-agent/{}", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            }),
            conditions: Some(vec![ready_condition(transition)]),
            // Port 0 says nothing serves (a restarted agent may no longer).
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: self.endpoint.as_ref().map_or(0, |(p, _)| i32::from(*p)),
                }),
            }),
            ..Default::default()
        }
    }

    /// The Node's annotations: the log endpoint's certificate pin, or its removal.
    fn annotations(&self) -> serde_json::Value {
        let pin = self.endpoint.as_ref().map(|(_, pin)| pin.clone());
        json!({ AGENT_CERT_PIN_ANNOTATION: pin })
    }
}

fn ready_condition(transition: &Time) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KeelAgentReady".into()),
        message: Some("keel agent is posting ready status".into()),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        last_transition_time: Some(transition.clone()),
    }
}

/// Creates the Node or keeps the existing one, then writes its status.
pub(crate) async fn register(client: &kube::Client, reg: &Registration) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(reg.name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_owned(), reg.name.clone()),
                (
                    "kubernetes.io/os".to_owned(),
                    std::env::consts::OS.to_owned(),
                ),
                (
                    "kubernetes.io/arch".to_owned(),
                    std::env::consts::ARCH.to_owned(),
                ),
            ])),
            ..Default::default()
        },
        ..Default::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(api_err(format!("create node {}", reg.name))(e)),
    }
    let meta =
        json!({"metadata": {"labels": node.metadata.labels, "annotations": reg.annotations()}});
    nodes
        .patch(&reg.name, &PatchParams::default(), &Patch::Merge(&meta))
        .await
        .map_err(api_err(format!("update node {}", reg.name)))?;
    let status = reg.status(&Time(Timestamp::now()));
    nodes
        .patch_status(
            &reg.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map_err(api_err(format!("node {} status", reg.name)))?;
    Ok(())
}

/// Renews the Lease and the Ready heartbeat every `interval`. A failed renewal is logged and
/// retried at the next tick (the API server may be restarting); it never ends on its own.
pub(crate) async fn heartbeat_loop(
    client: kube::Client,
    reg: Registration,
    interval: Duration,
) -> Result<(), AgentError> {
    let transition = Time(Timestamp::now());
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&client, &reg.name, interval).await {
            tracing::warn!(node = %reg.name, "lease: {e}");
        }
        let nodes: Api<Node> = Api::all(client.clone());
        let patch = json!({"status": {"conditions": [ready_condition(&transition)]}});
        if let Err(e) = nodes
            .patch_status(&reg.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(node = %reg.name, "ready heartbeat: {e}");
        }
    }
}

async fn renew_lease(
    client: &kube::Client,
    node: &str,
    interval: Duration,
) -> Result<(), AgentError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let spec = LeaseSpec {
        holder_identity: Some(node.to_owned()),
        lease_duration_seconds: Some((interval.as_secs() * 4).max(1) as i32),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..Default::default()
    };
    match leases
        .get_opt(node)
        .await
        .map_err(api_err(format!("get lease {node}")))?
    {
        Some(_) => {
            leases
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "spec": spec })),
                )
                .await
                .map_err(api_err(format!("renew lease {node}")))?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.to_owned()),
                    namespace: Some("kube-node-lease".into()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map_err(api_err(format!("create lease {node}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_in_bytes() {
        let text = "MemTotal:       16318480 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo(text), Some(16318480 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn allocatable_is_capacity_minus_reserved() {
        let reg = Registration {
            name: "n1".into(),
            hostname: "h".into(),
            node_ip: IpAddr::from([10, 0, 0, 1]),
            endpoint: Some((10250, "ab12".into())),
            capacity: Capacity {
                cpus: 4,
                memory_bytes: 8 << 30,
                pods: 110,
            },
            reserved_cpu_millis: 500,
            reserved_memory_bytes: 1 << 30,
            runtime_version: "keel://0.1.0".into(),
        };
        let s = reg.status(&Time(Timestamp::now()));
        let a = s.allocatable.unwrap();
        assert_eq!(a["cpu"].0, "3500m");
        assert_eq!(a["memory"].0, (7u64 << 30).to_string());
        assert_eq!(s.capacity.unwrap()["cpu"].0, "4");
        let addrs = s.addresses.unwrap();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[0].address, "10.0.0.1");
        assert_eq!(
            s.node_info.unwrap().container_runtime_version,
            "keel://0.1.0"
        );
        let port = s.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port;
        assert_eq!(port, 10250);
        assert_eq!(reg.annotations()[AGENT_CERT_PIN_ANNOTATION], "ab12");
        let ready = &s.conditions.unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
    }
}
