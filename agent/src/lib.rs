//! keel-agent: the node agent. Registers the Node, renews its Lease and Ready heartbeat, and
//! drives the pods bound to it through a CRI endpoint (keel's `keel cri`, or any CRI runtime).
//!
//! It is an ordinary API client (kube-rs), so it runs against keel's API server and against
//! Kubernetes. It owns no container state: everything about sandboxes and containers is read
//! back from the CRI on every sync, and the link between a pod and its sandbox is the pod uid
//! label kubelet uses (`io.kubernetes.pod.uid`), so a restarted agent adopts what it finds.
//!
//! | file | owns |
//! | --- | --- |
//! | `node.rs` | machine capacity (pure `/proc/meminfo` parsing), the Node object, registration, Lease and Ready heartbeats |
//! | `pod_spec.rs` | pure: Pod -> CRI `PodSandboxConfig` / `ContainerConfig` (DNS, ports, env, resources, security context) |
//! | `pod_env.rs` | pure: a container's environment (envFrom, valueFrom fieldRef/configMapKeyRef/secretKeyRef, `$(VAR)`) |
//! | `pod_status.rs` | pure: CRI sandbox + container states -> `PodStatus`; the restart decision and back-off |
//! | `pod_sync.rs` | the pod watcher and the sync loop: CRI calls, status writes, deletions, orphan teardown |
//! | `logs.rs` | pure: which CRI log file, which lines, how `kubectl logs` shows them |
//! | `volumes.rs` | a pod's emptyDir, hostPath, configMap and secret volumes under the pod dir, and the containers' mounts |
//! | `probes.rs` | startup, readiness and liveness probes (exec, httpGet, tcpSocket): one task per probed container |
//! | `log_server.rs` | the HTTPS log endpoint the API server proxies `pods/log` to (node credential only, pinned certificate) |
//!
//! Not yet: init containers, other volume types (PVCs, projected, downwardAPI), image pull secrets, `resourceFieldRef` env, events, exec/attach/port-forward streaming.

mod log_server;
mod logs;
pub mod network;
mod node;
mod pod_env;
mod pod_spec;
mod pod_status;
mod pod_sync;
mod probes;
mod volumes;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_cri::api::image_service_client::ImageServiceClient;
use keel_cri::api::runtime_service_client::RuntimeServiceClient;
use keel_cri::tonic::transport::Channel;

pub use node::{Capacity, parse_meminfo};
pub use pod_status::restart_delay;

/// What the agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connecting to the CRI socket.
    #[error("connect to CRI socket {path}: {source}")]
    CriConnect {
        path: String,
        source: keel_cri::tonic::transport::Error,
    },
    /// A CRI call failed.
    #[error("CRI {call}: {status}")]
    Cri {
        call: &'static str,
        status: keel_cri::tonic::Status,
    },
    /// An API call failed.
    #[error("API {what}: {source}")]
    Api { what: String, source: kube::Error },
    /// Building the API client.
    #[error(transparent)]
    Client(#[from] keel_cluster::client::ClientError),
    /// Reading machine facts (meminfo, hostname).
    #[error("read {what}: {source}")]
    Machine {
        what: &'static str,
        source: std::io::Error,
    },
    /// The log endpoint cannot be set up.
    #[error("log endpoint: {0}")]
    Endpoint(String),
    /// The node's range could not be given to the pod network.
    #[error("set up the pod network for the node's range {cidr}: {reason}")]
    Network { cidr: String, reason: String },
    /// A pod's spec cannot be turned into CRI configs.
    #[error("pod {pod}: {reason}")]
    PodSpec { pod: String, reason: String },
}

/// The agent's settings. [`AgentConfig::new`] fills kubelet's defaults.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Node's name (and the `spec.nodeName` of the pods this agent runs).
    pub node_name: String,
    /// The CRI endpoint's unix socket.
    pub cri_socket: PathBuf,
    /// Pod logs go to `<pod_log_dir>/<namespace>_<name>_<uid>/<container>/<restart>.log`.
    pub pod_log_dir: PathBuf,
    /// Pods' volumes live in `<pod_dir>/<uid>/volumes/<kind>/<name>`.
    pub pod_dir: PathBuf,
    /// The InternalIP address and every pod's hostIP. None: 127.0.0.1.
    pub node_ip: Option<IpAddr>,
    /// CPU kept from pods, in millicores (capacity - reserved = allocatable).
    pub reserved_cpu_millis: u64,
    /// Memory kept from pods, in bytes.
    pub reserved_memory_bytes: u64,
    /// Pods per node.
    pub max_pods: u32,
    /// How often the Lease and the Ready heartbeat are renewed.
    pub heartbeat_interval: Duration,
    /// The first restart back-off of a container that exits (then doubling, at most 5 min).
    pub restart_backoff_base: Duration,
    /// How often pods are synced even without a watch event (container exits are seen then).
    pub sync_interval: Duration,
    /// The cluster DNS server for `dnsPolicy: ClusterFirst`; None: the node's resolv.conf.
    pub cluster_dns: Option<IpAddr>,
    /// The cluster domain for DNS search paths.
    pub cluster_domain: String,
    /// Where the log endpoint (`kubectl logs` through the API server) listens; None: nowhere.
    pub listen: Option<SocketAddr>,
    /// The node's own API credential, the only bearer the log endpoint accepts. None: the
    /// endpoint is not started (an agent running on another credential cannot check callers).
    pub credential: Option<String>,
    /// The node's range from node IPAM: CNI set up with it, routes to the other nodes. None:
    /// the CNI config is the operator's (a fixed range), no routes.
    pub pod_network: Option<network::PodNetwork>,
}

impl AgentConfig {
    pub fn new(node_name: impl Into<String>, cri_socket: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            node_name: node_name.into(),
            cri_socket: cri_socket.into(),
            pod_log_dir: PathBuf::from("/var/log/pods"),
            pod_dir: PathBuf::from("/var/lib/keel/agent/pods"),
            node_ip: None,
            reserved_cpu_millis: 0,
            reserved_memory_bytes: 0,
            max_pods: 110,
            heartbeat_interval: Duration::from_secs(10),
            restart_backoff_base: Duration::from_secs(10),
            sync_interval: Duration::from_secs(1),
            cluster_dns: None,
            cluster_domain: "cluster.local".into(),
            listen: None,
            credential: None,
            pod_network: None,
        }
    }
}

/// The CRI clients the agent drives (one channel).
#[derive(Clone)]
pub(crate) struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
}

/// The node agent: [`Agent::run`] registers the node, then heartbeats and syncs pods until
/// it fails or is dropped.
pub struct Agent {
    config: AgentConfig,
    client: kube::Client,
    cri: Cri,
}

impl Agent {
    /// Connects to the CRI socket; `client` talks to the API server.
    pub async fn new(config: AgentConfig, client: kube::Client) -> Result<Agent, AgentError> {
        let channel = keel_cri::client::connect(&config.cri_socket)
            .await
            .map_err(|source| AgentError::CriConnect {
                path: config.cri_socket.display().to_string(),
                source,
            })?;
        let (runtime, image) = keel_cri::client::clients(channel);
        Ok(Agent {
            config,
            client,
            cri: Cri { runtime, image },
        })
    }

    /// As [`Agent::new`], with a client for the kubeconfig at `kubeconfig`. With `join_token`
    /// (the cluster's node join token) the agent authenticates as its node, with the credential
    /// minted from it; otherwise with the kubeconfig's user. Either way, a node credential becomes
    /// the one the log endpoint accepts.
    pub async fn from_kubeconfig(
        mut config: AgentConfig,
        kubeconfig: &Path,
        join_token: Option<&str>,
    ) -> Result<Agent, AgentError> {
        let minted = join_token.map(|t| keel_cluster::api::node_credential(t, &config.node_name));
        let (client, presented) = keel_cluster::client::with_token(kubeconfig, minted).await?;
        let own = format!("node.{}.", config.node_name);
        if config.credential.is_none() {
            config.credential = presented.filter(|t| t.starts_with(&own));
        }
        Agent::new(config, client).await
    }

    /// Registers the Node, then runs the heartbeats and the pod sync until one fails.
    pub async fn run(self) -> Result<(), AgentError> {
        let node_ip = match self.config.node_ip {
            Some(ip) => ip,
            None => node::default_node_ip(),
        };
        let hostname = node::hostname()?;
        let version = node::runtime_version(&mut self.cri.clone()).await?;
        let capacity = Capacity::of_machine(self.config.max_pods)?;
        let endpoint = self.start_log_endpoint(node_ip, &hostname).await?;
        let registration = node::Registration {
            name: self.config.node_name.clone(),
            hostname,
            node_ip,
            endpoint,
            capacity,
            reserved_cpu_millis: self.config.reserved_cpu_millis,
            reserved_memory_bytes: self.config.reserved_memory_bytes,
            runtime_version: version,
        };
        node::register(&self.client, &registration).await?;
        tracing::info!(node = %self.config.node_name, "node registered");
        let heartbeat = node::heartbeat_loop(
            self.client.clone(),
            registration,
            self.config.heartbeat_interval,
        );
        let (client, cri, mut config) = (self.client, self.cri, self.config);
        let sync = async move {
            if let Some(net) = config.pod_network.take() {
                let cidr = network::wait_for_pod_cidr(&client, &config.node_name).await?;
                (net.install)(&cidr).map_err(|reason| AgentError::Network {
                    cidr: cidr.clone(),
                    reason,
                })?;
                tracing::info!(pod_cidr = %cidr, "pod network set up with the node's range");
                if net.routes {
                    let (client, own) = (client.clone(), config.node_name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = network::route_loop(client, own).await {
                            tracing::error!("node routes: {e}");
                        }
                    });
                }
            }
            pod_sync::run(client, cri, config, node_ip).await
        };
        tokio::select! {
            r = heartbeat => r,
            r = sync => r,
        }
    }
}

impl Agent {
    /// Binds and starts the log endpoint if configured; its port and certificate pin.
    async fn start_log_endpoint(
        &self,
        node_ip: IpAddr,
        hostname: &str,
    ) -> Result<Option<(u16, String)>, AgentError> {
        let Some(listen) = self.config.listen else {
            return Ok(None);
        };
        let Some(credential) = self.config.credential.clone() else {
            tracing::warn!(
                "pod logs are not served: the agent has no node credential (start it with \
                 --token, or a kubeconfig holding this node's credential)"
            );
            return Ok(None);
        };
        let names = vec![node_ip.to_string(), hostname.to_string()];
        let server = log_server::LogServer::bind(listen, &names).await?;
        let published = (server.port, server.pin.clone());
        tracing::info!(%listen, port = server.port, "log endpoint listening");
        let ctx = Arc::new(log_server::Ctx {
            credential,
            pod_log_dir: self.config.pod_log_dir.clone(),
            cri: self.cri.clone(),
        });
        tokio::spawn(server.serve(ctx));
        Ok(Some(published))
    }
}

pub(crate) fn cri_err(call: &'static str) -> impl FnOnce(keel_cri::tonic::Status) -> AgentError {
    move |status| AgentError::Cri { call, status }
}

pub(crate) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Api { what, source }
}
