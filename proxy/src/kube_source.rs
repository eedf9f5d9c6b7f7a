//! The Kubernetes API source: Services and discovery.k8s.io/v1 EndpointSlices watched through
//! kube-rs (a kubeconfig, or the pod's in-cluster config), indexed per Service and turned into
//! changes of the desired service maps; with a node name, this node's Pods too (field selector
//! `spec.nodeName=<node>`), for their hostPorts (`model::hostport`).
//!
//! `Index` is pure: watcher events in, `Update`s out (the whole desired state after each
//! (re)list, the changed frontends after other events), so it is tested without a server or
//! root. `choose_source`, `client`, `probe` and `events` are the thin shell over kube-rs.
//! Reconnects, resumption from the last resourceVersion and relists after 410 Gone belong to
//! `kube_runtime::watcher` (with its default backoff); this module never retries by itself.
//!
//! Pods are optional: credentials that may not list them (kube-proxy's `system:node-proxier`
//! role has no `pods`) leave hostPorts unserved, with a warning, and Services work as before.
//!
//! Not here: node IPs from the Node object (NodePorts answer on `--node-ip`), EndpointSlice
//! hints (topology-aware routing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use keel_ebpf::SvcKey;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::model::hostport::{self, has_host_ports, pod_frontends};
use crate::model::{Desired, DesiredService, NodeContext, Skipped, desired_one, taken_reason};

/// kube-proxy's selector for both kinds: objects another proxy owns
/// (`service.kubernetes.io/service-proxy-name`) and headless Services' slices are not watched.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// Both sources were given.
    #[error("--manifests and --kubeconfig are two sources; give only one")]
    TwoSources,
    /// No source was given and this is not a pod.
    #[error(
        "no source of Services: pass --kubeconfig PATH (Kubernetes API server) or --manifests PATH \
         (YAML file); this is not a pod (KUBERNETES_SERVICE_HOST is unset), so there is no \
         in-cluster config"
    )]
    NoSource,
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster config (this pod's service account)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("API client for {url}")]
    Client { url: String, source: kube::Error },
    /// The server answered but refuses these credentials: retrying would not help.
    #[error("API server {url} refuses to list Services: {code} {message}")]
    Refused {
        url: String,
        code: u16,
        message: String,
    },
}

/// Where the API client's configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSource {
    Kubeconfig(PathBuf),
    /// The pod's service account and `KUBERNETES_SERVICE_HOST`/`_PORT`.
    InCluster,
}

/// What `keel proxy` serves from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Manifests(PathBuf),
    Api(ApiSource),
}

/// `--manifests`, else `--kubeconfig`, else the in-cluster config when running in a pod
/// (`service_host` is `KUBERNETES_SERVICE_HOST`), else an error saying what to pass.
pub fn choose_source(
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    service_host: Option<&str>,
) -> Result<Source, KubeSourceError> {
    match (manifests, kubeconfig) {
        (Some(_), Some(_)) => Err(KubeSourceError::TwoSources),
        (Some(m), None) => Ok(Source::Manifests(m)),
        (None, Some(k)) => Ok(Source::Api(ApiSource::Kubeconfig(k))),
        (None, None) if service_host.is_some_and(|h| !h.trim().is_empty()) => {
            Ok(Source::Api(ApiSource::InCluster))
        }
        (None, None) => Err(KubeSourceError::NoSource),
    }
}

/// The node name kube-proxy uses when none is given: the host name, lowercased (as the
/// kubelet names its Node).
pub fn default_node_name() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Builds the API client; returns it with the server's URL. Must run inside a tokio runtime
/// (the client spawns its worker there).
pub async fn client(source: &ApiSource) -> Result<(kube::Client, String), KubeSourceError> {
    // kube-rs takes rustls' process-wide provider; a binary linking two providers has none.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another installer is fine: any provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let config = match source {
        ApiSource::Kubeconfig(path) => {
            let err = |source| KubeSourceError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(err)?
        }
        ApiSource::InCluster => kube::Config::incluster().map_err(KubeSourceError::InCluster)?,
    };
    let url = config.cluster_url.to_string();
    match kube::Client::try_from(config) {
        Ok(c) => Ok((c, url)),
        Err(source) => Err(KubeSourceError::Client { url, source }),
    }
}

/// One small list: credentials the server refuses (401, 403) fail the start with a clear
/// error; an unreachable server is only logged, the watchers keep trying.
pub async fn probe(client: &kube::Client, url: &str) -> Result<(), KubeSourceError> {
    let api: Api<Service> = Api::all(client.clone());
    let lp = ListParams::default().limit(1);
    let list = api.list_metadata(&lp);
    match tokio::time::timeout(Duration::from_secs(10), list).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(s))) if matches!(s.code, 401 | 403) => {
            Err(KubeSourceError::Refused {
                url: url.to_string(),
                code: s.code,
                message: s.message.clone(),
            })
        }
        Ok(Err(e)) => {
            tracing::warn!(%url, "API server not answering yet, watching anyway: {e}");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(%url, "API server not answering within 10 s, watching anyway");
            Ok(())
        }
    }
}

/// What the watchers deliver.
#[derive(Debug)]
pub enum SourceEvent {
    // Boxed: a Service event is four times a slice event's size, and a batch holds thousands.
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Pod(Box<watcher::Event<Pod>>),
    /// A list or watch failed; the watcher retries after a backoff (relisting after 410 Gone).
    Error {
        kind: &'static str,
        error: watcher::Error,
    },
}

/// The field selector of the Pods watch: this node's pods (none without a node name: other
/// nodes' hostPorts are not this node's to serve).
pub fn pod_field_selector(node: &NodeContext) -> Option<String> {
    node.node_name
        .as_deref()
        .map(|n| format!("spec.nodeName={n}"))
}

/// Whether a failed list/watch is the server refusing these credentials the kind (401/403):
/// retrying succeeds only once someone grants it.
pub fn is_forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => matches!(s.code, 401 | 403),
        watcher::Error::WatchError(s) => matches!(s.code, 401 | 403),
        _ => false,
    }
}

/// Watches every namespace's Services and EndpointSlices, and the Pods `pod_fields` selects
/// (`pod_field_selector`; None: no Pods), merged into one stream.
pub fn events(
    client: kube::Client,
    pod_fields: Option<&str>,
) -> impl Stream<Item = SourceEvent> + Send + Unpin {
    let cfg = watcher::Config::default().labels(LABEL_SELECTOR);
    let services = watcher(Api::<Service>::all(client.clone()), cfg.clone())
        .default_backoff()
        .map(|r| match r {
            Ok(e) => SourceEvent::Service(Box::new(e)),
            Err(error) => SourceEvent::Error {
                kind: "Service",
                error,
            },
        });
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), cfg)
        .default_backoff()
        .map(|r| match r {
            Ok(e) => SourceEvent::Slice(Box::new(e)),
            Err(error) => SourceEvent::Error {
                kind: "EndpointSlice",
                error,
            },
        });
    let mut streams = vec![services.boxed(), slices.boxed()];
    if let Some(fields) = pod_fields {
        let cfg = watcher::Config::default().fields(fields);
        let pods = watcher(Api::<Pod>::all(client), cfg)
            .default_backoff()
            .map(|r| match r {
                Ok(e) => SourceEvent::Pod(Box::new(e)),
                Err(error) => SourceEvent::Error { kind: "Pod", error },
            });
        streams.push(pods.boxed());
    }
    futures::stream::select_all(streams)
}

/// (namespace, name).
type Ref = (String, String);

fn ns_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    m.namespace.clone().unwrap_or_else(|| "default".into())
}

fn service_ref(s: &Service) -> Ref {
    (
        ns_of(&s.metadata),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

fn slice_ref(s: &EndpointSlice) -> Ref {
    (
        ns_of(&s.metadata),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

fn pod_ref(p: &Pod) -> Ref {
    (
        ns_of(&p.metadata),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// What produced a frontend. Services sort before Pods: a Service keeps a frontend that a
/// hostPort also names (`model::desired_with_pods` decides the same way).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Service(Ref),
    Pod(Ref),
}

/// The Service a slice belongs to, from its `kubernetes.io/service-name` label.
fn slice_owner(s: &EndpointSlice) -> Option<Ref> {
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((ns_of(&s.metadata), svc.clone()))
}

/// What the sync applies next.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// Everything (first sync, after a relist, after a failed write): `Applied::apply`.
    Full(Desired),
    /// The frontends that may have changed, with their wanted state (`None`: gone):
    /// `Applied::apply_one` each.
    Changes(Vec<(SvcKey, Option<DesiredService>)>),
}

/// The API source's view of the cluster: Services, their slices, this node's pods with
/// hostPorts, and the frontends each Service and pod produces. A frontend claimed by two
/// Services (two externalIPs alike) goes to the first by namespace/name; one claimed by a
/// Service and a pod's hostPort to the Service; by two pods to the first by namespace/name.
#[derive(Debug, Default)]
pub struct Index {
    node: NodeContext,
    services: BTreeMap<Ref, Service>,
    /// This node's pods that declare a hostPort (the others never produce a frontend).
    pods: BTreeMap<Ref, Pod>,
    /// Slices by owning Service, then by slice name.
    slices: BTreeMap<Ref, BTreeMap<String, EndpointSlice>>,
    /// Slice (namespace, name) -> the Service it was filed under.
    owners: BTreeMap<Ref, Ref>,
    /// Frontends each Service and pod produced at its last translation.
    produced: BTreeMap<Owner, Desired>,
    claims: BTreeMap<SvcKey, BTreeSet<Owner>>,
    /// Services and pods to translate again.
    dirty: BTreeSet<Owner>,
    /// Objects of a (re)list in progress, swapped in at `InitDone`.
    relist_services: Option<Vec<Service>>,
    relist_slices: Option<Vec<EndpointSlice>>,
    relist_pods: Option<Vec<Pod>>,
    services_listed: bool,
    slices_listed: bool,
    /// Whether Pods are watched (a node name is known), and whether they have been listed
    /// (or cannot be: `pods_unavailable`).
    watch_pods: bool,
    pods_listed: bool,
    full: bool,
    skipped: Vec<Skipped>,
}

/// The index keeps what translation reads; managedFields and annotations (kubectl's
/// last-applied copy) are most of an object's size.
fn slim(m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
}

impl Index {
    /// An index for `node`; with a node name it waits for this node's Pods to be listed too
    /// (the stream of `events(client, pod_field_selector(&node))`).
    pub fn new(node: NodeContext) -> Index {
        Index {
            watch_pods: node.node_name.is_some(),
            node,
            full: true,
            ..Default::default()
        }
    }

    /// Whether every watched kind has been listed once (before that, no update is produced: a
    /// half-listed cluster must not overwrite the maps a previous run left).
    pub fn synced(&self) -> bool {
        self.services_listed && self.slices_listed && (self.pods_listed || !self.watch_pods)
    }

    /// Pods cannot be listed (the credentials may not): serve Services without hostPorts
    /// rather than nothing. A later successful list (permission granted) brings them in.
    /// Returns whether this changed anything (the caller warns once).
    pub fn pods_unavailable(&mut self) -> bool {
        if !self.watch_pods || self.pods_listed {
            return false;
        }
        self.pods_listed = true;
        self.full = true;
        true
    }

    /// Makes the next update a full one (after a failed write: the maps may hold anything).
    pub fn request_full(&mut self) {
        self.full = true;
    }

    pub fn on_service(&mut self, ev: watcher::Event<Service>) {
        match ev {
            watcher::Event::Apply(s) => self.put_service(s),
            watcher::Event::Delete(s) => {
                let r = service_ref(&s);
                self.services.remove(&r);
                self.dirty.insert(Owner::Service(r));
            }
            watcher::Event::Init => self.relist_services = Some(Vec::new()),
            watcher::Event::InitApply(s) => {
                self.relist_services.get_or_insert_default().push(s);
            }
            watcher::Event::InitDone => {
                // Whatever is not in the new list was deleted while the watch was down.
                let listed = self.relist_services.take().unwrap_or_default();
                self.dirty.extend(
                    std::mem::take(&mut self.services)
                        .into_keys()
                        .map(Owner::Service),
                );
                for s in listed {
                    self.put_service(s);
                }
                self.services_listed = true;
                self.full = true;
            }
        }
    }

    pub fn on_slice(&mut self, ev: watcher::Event<EndpointSlice>) {
        match ev {
            watcher::Event::Apply(s) => self.put_slice(s),
            watcher::Event::Delete(s) => self.remove_slice(&slice_ref(&s)),
            watcher::Event::Init => self.relist_slices = Some(Vec::new()),
            watcher::Event::InitApply(s) => {
                self.relist_slices.get_or_insert_default().push(s);
            }
            watcher::Event::InitDone => {
                let listed = self.relist_slices.take().unwrap_or_default();
                self.dirty.extend(
                    std::mem::take(&mut self.slices)
                        .into_keys()
                        .map(Owner::Service),
                );
                self.owners.clear();
                for s in listed {
                    self.put_slice(s);
                }
                self.slices_listed = true;
                self.full = true;
            }
        }
    }

    pub fn on_pod(&mut self, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Apply(p) => self.put_pod(p),
            watcher::Event::Delete(p) => {
                let r = pod_ref(&p);
                if self.pods.remove(&r).is_some() {
                    self.dirty.insert(Owner::Pod(r));
                }
            }
            watcher::Event::Init => self.relist_pods = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                // Only pods with hostPorts are kept: a node's list is mostly others.
                if has_host_ports(&p) {
                    self.relist_pods.get_or_insert_default().push(p);
                }
            }
            watcher::Event::InitDone => {
                let listed = self.relist_pods.take().unwrap_or_default();
                self.dirty
                    .extend(std::mem::take(&mut self.pods).into_keys().map(Owner::Pod));
                for p in listed {
                    self.put_pod(p);
                }
                self.pods_listed = true;
                self.full = true;
            }
        }
    }

    fn put_service(&mut self, mut s: Service) {
        slim(&mut s.metadata);
        let r = service_ref(&s);
        self.services.insert(r.clone(), s);
        self.dirty.insert(Owner::Service(r));
    }

    /// A pod's status changes often (conditions, container states) while its frontends
    /// change only with its phase and addresses: an event marks it dirty only then.
    fn put_pod(&mut self, mut p: Pod) {
        // A pod's ports cannot change: one without hostPorts never produces anything.
        if !has_host_ports(&p) {
            return;
        }
        slim(&mut p.metadata);
        let r = pod_ref(&p);
        let key = |p: &Pod| {
            let st = p.status.as_ref();
            (
                st.and_then(|s| s.phase.clone()),
                st.and_then(|s| s.pod_ip.clone()),
                st.and_then(|s| s.pod_ips.clone()),
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
            )
        };
        if self.pods.get(&r).map(key) != Some(key(&p)) {
            self.dirty.insert(Owner::Pod(r.clone()));
        }
        self.pods.insert(r, p);
    }

    fn put_slice(&mut self, mut s: EndpointSlice) {
        slim(&mut s.metadata);
        let sref = slice_ref(&s);
        let owner = slice_owner(&s);
        if owner.is_none() {
            self.skipped.push(Skipped {
                object: format!("EndpointSlice {}/{}", sref.0, sref.1),
                reason: format!("no {SERVICE_NAME_LABEL} label"),
            });
        }
        // The label may have changed: the slice leaves its previous Service.
        if self.owners.get(&sref) != owner.as_ref() {
            self.remove_slice(&sref);
        }
        let Some(owner) = owner else {
            return;
        };
        self.slices
            .entry(owner.clone())
            .or_default()
            .insert(sref.1.clone(), s);
        self.owners.insert(sref, owner.clone());
        self.dirty.insert(Owner::Service(owner));
    }

    fn remove_slice(&mut self, sref: &Ref) {
        let Some(owner) = self.owners.remove(sref) else {
            return;
        };
        if let Some(m) = self.slices.get_mut(&owner) {
            m.remove(&sref.1);
            if m.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(Owner::Service(owner));
    }

    /// Translates one Service or pod again; records the frontends whose owner or content may
    /// change.
    fn retranslate(&mut self, r: &Owner, touched: &mut BTreeSet<SvcKey>) {
        let new = match r {
            Owner::Service(r) => match self.services.get(r) {
                Some(svc) => {
                    let slices: Vec<&EndpointSlice> = self
                        .slices
                        .get(r)
                        .map(|m| m.values().collect())
                        .unwrap_or_default();
                    let (d, skipped) = desired_one(svc, &slices, &self.node);
                    self.skipped.extend(skipped);
                    d
                }
                None => Desired::new(),
            },
            Owner::Pod(r) => match self.pods.get(r) {
                Some(pod) => pod_frontends(pod, &self.node).unwrap_or_else(|reason| {
                    self.skipped.push(Skipped {
                        object: format!("Pod {}", hostport::pod_name(pod)),
                        reason,
                    });
                    Desired::new()
                }),
                None => Desired::new(),
            },
        };
        let old = self.produced.remove(r).unwrap_or_default();
        for k in old.keys().filter(|k| !new.contains_key(k)) {
            if let Some(c) = self.claims.get_mut(k) {
                c.remove(r);
                if c.is_empty() {
                    self.claims.remove(k);
                }
            }
            touched.insert(*k);
        }
        for (k, d) in &new {
            self.claims.entry(*k).or_default().insert(r.clone());
            if old.get(k) != Some(d) {
                touched.insert(*k);
            }
        }
        if !new.is_empty() {
            self.produced.insert(r.clone(), new);
        }
    }

    /// The wanted state of one frontend: its first claimant's.
    fn effective(&self, k: &SvcKey) -> Option<&DesiredService> {
        let owner = self.claims.get(k)?.first()?;
        self.produced.get(owner)?.get(k)
    }

    /// Reports the pods whose hostPort frontend among `keys` another claimant keeps.
    fn report_taken<'a>(&mut self, keys: impl Iterator<Item = &'a SvcKey>) {
        for k in keys {
            let Some(claims) = self.claims.get(k) else {
                continue;
            };
            let mut it = claims.iter();
            let Some(first) = it.next() else {
                continue;
            };
            let holder = match first {
                Owner::Service(_) => match self.effective(k) {
                    Some(d) => format!("Service {}", d.name),
                    None => continue,
                },
                Owner::Pod((ns, name)) => format!("Pod {ns}/{name}"),
            };
            for o in it {
                if let Owner::Pod((ns, name)) = o {
                    self.skipped.push(Skipped {
                        object: format!("Pod {ns}/{name}"),
                        reason: taken_reason(k, &holder),
                    });
                }
            }
        }
    }

    /// The whole desired state.
    pub fn desired(&self) -> Desired {
        self.claims
            .keys()
            .filter_map(|k| Some((*k, self.effective(k)?.clone())))
            .collect()
    }

    /// What to apply after the events so far (None: nothing, or not listed yet), and the
    /// objects skipped since the last call.
    pub fn take_update(&mut self) -> (Option<Update>, Vec<Skipped>) {
        if !self.synced() {
            return (None, Vec::new());
        }
        let mut touched = BTreeSet::new();
        for r in std::mem::take(&mut self.dirty) {
            self.retranslate(&r, &mut touched);
        }
        let full = std::mem::take(&mut self.full);
        if full {
            let all: Vec<SvcKey> = self.claims.keys().copied().collect();
            self.report_taken(all.iter());
        } else {
            self.report_taken(touched.iter());
        }
        let skipped = std::mem::take(&mut self.skipped);
        if full {
            return (Some(Update::Full(self.desired())), skipped);
        }
        if touched.is_empty() {
            return (None, skipped);
        }
        let changes = touched
            .into_iter()
            .map(|k| (k, self.effective(&k).cloned()))
            .collect();
        (Some(Update::Changes(changes)), skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_manifests;
    use crate::model::desired;
    use keel_ebpf::{IPPROTO_TCP, L4Addr};
    use watcher::Event;

    /// Two namespaces, a NodePort with two ports, affinity, an externalIP, a headless
    /// Service, a Service with two slices, conditions.
    const SAMPLE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  type: NodePort
  sessionAffinity: ClientIP
  externalIPs: [192.0.2.7]
  ports:
  - {name: http, port: 80, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: [10.0.1.2], conditions: {ready: true}, nodeName: n1}
- {addresses: [10.0.3.2], conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- {addresses: [10.0.2.2], nodeName: n2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: other}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
"#;

    fn objects(text: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let m = parse_manifests(text).unwrap();
        (m.services, m.slices)
    }

    fn service(name: &str, vip: &str) -> Service {
        objects(&format!(
            "kind: Service\napiVersion: v1\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n"
        ))
        .0
        .remove(0)
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> EndpointSlice {
        let eps: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        objects(&format!(
            "kind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            eps.join(", ")
        ))
        .1
        .remove(0)
    }

    fn key(vip: &str) -> SvcKey {
        SvcKey::new(vip.parse().unwrap(), 80, IPPROTO_TCP)
    }

    fn ready(u: &Option<DesiredService>) -> Vec<String> {
        let show = |b: &L4Addr| format!("{}:{}", b.ip().unwrap(), b.host_port());
        u.iter().flat_map(|d| d.ready.iter().map(show)).collect()
    }

    /// An index with both kinds listed (the given objects as the initial list).
    fn listed(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Index {
        listed_on(NodeContext::default(), services, slices)
    }

    /// An index for `node` with Services and slices listed (pods, if `node` has a name, not).
    fn listed_on(node: NodeContext, services: Vec<Service>, slices: Vec<EndpointSlice>) -> Index {
        let mut ix = Index::new(node);
        ix.on_service(Event::Init);
        for s in services {
            ix.on_service(Event::InitApply(s));
        }
        ix.on_service(Event::InitDone);
        ix.on_slice(Event::Init);
        for s in slices {
            ix.on_slice(Event::InitApply(s));
        }
        ix.on_slice(Event::InitDone);
        ix
    }

    #[test]
    fn choose_source_prefers_flags_then_in_cluster_else_says_what_to_pass() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            choose_source(p("/m.yaml"), None, Some("10.96.0.1")).unwrap(),
            Source::Manifests("/m.yaml".into())
        );
        assert_eq!(
            choose_source(None, p("/kc"), Some("10.96.0.1")).unwrap(),
            Source::Api(ApiSource::Kubeconfig("/kc".into()))
        );
        assert_eq!(
            choose_source(None, None, Some("10.96.0.1")).unwrap(),
            Source::Api(ApiSource::InCluster)
        );
        assert!(matches!(
            choose_source(p("/m"), p("/kc"), None),
            Err(KubeSourceError::TwoSources)
        ));
        let e = choose_source(None, None, Some("")).unwrap_err().to_string();
        assert!(
            e.contains("--kubeconfig") && e.contains("--manifests"),
            "{e}"
        );
    }

    #[test]
    fn nothing_is_applied_until_both_kinds_are_listed() {
        let mut ix = Index::new(NodeContext::default());
        ix.on_service(Event::Init);
        ix.on_service(Event::InitApply(service("web", "10.96.0.10")));
        ix.on_service(Event::InitDone);
        ix.on_slice(Event::Init);
        ix.on_slice(Event::InitApply(slice("web-1", "web", &["10.0.0.1"])));
        assert_eq!(ix.take_update().0, None, "slices not listed yet");
        ix.on_slice(Event::InitDone);
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!("the first update is full");
        };
        assert_eq!(d[&key("10.96.0.10")].ready.len(), 1);
        assert_eq!(ix.take_update().0, None, "nothing changed since");
    }

    #[test]
    fn full_state_equals_the_file_sources_translation() {
        let (services, slices) = objects(SAMPLE);
        let (want, _) = desired(&services, &slices, &NodeContext::default());
        let mut ix = listed(services, slices);
        assert_eq!(ix.take_update().0, Some(Update::Full(want)));
    }

    #[test]
    fn events_yield_only_the_changed_frontends() {
        let mut ix = listed(
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![slice("a-1", "a", &["10.0.0.1", "10.0.0.2"])],
        );
        ix.take_update();
        // A backend removed from a's slice: one change, a's frontend with one backend.
        ix.on_slice(Event::Apply(slice("a-1", "a", &["10.0.0.1"])));
        let (u, _) = ix.take_update();
        let Some(Update::Changes(c)) = u else {
            panic!("{u:?}")
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, key("10.96.0.1"));
        assert_eq!(ready(&c[0].1), ["10.0.0.1:8080"]);
        // A second slice for b, then b deleted: b's frontend goes.
        ix.on_slice(Event::Apply(slice("b-1", "b", &["10.0.0.9"])));
        let (u, _) = ix.take_update();
        assert!(matches!(&u, Some(Update::Changes(c)) if ready(&c[0].1) == ["10.0.0.9:8080"]));
        ix.on_service(Event::Delete(service("b", "10.96.0.2")));
        assert_eq!(
            ix.take_update().0,
            Some(Update::Changes(vec![(key("10.96.0.2"), None)]))
        );
        // An update that changes nothing the maps hold yields nothing.
        ix.on_service(Event::Apply(service("a", "10.96.0.1")));
        assert_eq!(ix.take_update().0, None);
    }

    #[test]
    fn a_relabelled_slice_moves_to_its_new_service() {
        let mut ix = listed(
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![slice("s", "a", &["10.0.0.1"])],
        );
        ix.take_update();
        ix.on_slice(Event::Apply(slice("s", "b", &["10.0.0.1"])));
        let Some(Update::Changes(c)) = ix.take_update().0 else {
            panic!()
        };
        let c: BTreeMap<SvcKey, Vec<String>> = c.into_iter().map(|(k, d)| (k, ready(&d))).collect();
        assert_eq!(c[&key("10.96.0.1")], Vec::<String>::new());
        assert_eq!(c[&key("10.96.0.2")], ["10.0.0.1:8080"]);
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let mut ix = listed(
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            vec![
                slice("a-1", "a", &["10.0.0.1"]),
                slice("b-1", "b", &["10.0.0.2"]),
            ],
        );
        ix.take_update();
        // 410 Gone: the watcher lists again; b and a-1 are gone, and until InitDone the old
        // state stands.
        ix.on_service(Event::Init);
        ix.on_service(Event::InitApply(service("a", "10.96.0.1")));
        ix.on_slice(Event::Init);
        ix.on_slice(Event::InitApply(slice("b-1", "b", &["10.0.0.2"])));
        assert_eq!(ix.take_update().0, None);
        ix.on_service(Event::InitDone);
        ix.on_slice(Event::InitDone);
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!("a relist yields a full update")
        };
        assert_eq!(d.len(), 1);
        assert!(d[&key("10.96.0.1")].ready.is_empty());
    }

    #[test]
    fn a_frontend_claimed_twice_survives_the_first_claimants_deletion() {
        let mut ix = listed(
            vec![service("a", "10.96.0.1"), service("b", "10.96.0.1")],
            vec![
                slice("a-1", "a", &["10.0.0.1"]),
                slice("b-1", "b", &["10.0.0.2"]),
            ],
        );
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!()
        };
        assert_eq!(d[&key("10.96.0.1")].name, "ns/a:http", "first by name wins");
        ix.on_service(Event::Delete(service("a", "10.96.0.1")));
        let Some(Update::Changes(c)) = ix.take_update().0 else {
            panic!()
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].1.as_ref().unwrap().name, "ns/b:http");
        assert_eq!(ready(&c[0].1), ["10.0.0.2:8080"]);
    }

    #[test]
    fn a_failed_write_asks_for_a_full_update_and_skips_are_reported() {
        let mut ix = listed(vec![service("a", "10.96.0.1")], vec![]);
        ix.take_update();
        ix.request_full();
        assert!(matches!(ix.take_update().0, Some(Update::Full(_))));
        let mut s = slice("x", "a", &[]);
        s.metadata.labels = None;
        ix.on_slice(Event::Apply(s));
        let (u, skipped) = ix.take_update();
        assert_eq!(u, None);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("service-name"), "{skipped:?}");
    }

    fn n1() -> NodeContext {
        NodeContext {
            node_name: Some("n1".into()),
            node_ips: vec!["192.168.1.5".parse().unwrap()],
        }
    }

    /// A pod on n1 with hostPort `host` -> 80 and status `status` (YAML flow mapping).
    fn pod(name: &str, host: u16, status: &str) -> Pod {
        parse_manifests(&format!(
            "kind: Pod\napiVersion: v1\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  nodeName: n1\n  containers: [{{name: c, image: x, ports: [{{containerPort: 80, hostPort: {host}}}]}}]\nstatus: {status}\n"
        ))
        .unwrap()
        .pods
        .remove(0)
    }

    const UP: &str = "{phase: Running, podIP: 10.0.0.7}";

    fn node_key(port: u16) -> SvcKey {
        SvcKey::new("192.168.1.5".parse().unwrap(), port, IPPROTO_TCP)
    }

    fn nodeport(name: &str, port: u16) -> Service {
        objects(&format!(
            "kind: Service\napiVersion: v1\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.50\n  ports: [{{name: http, port: 80, protocol: TCP, nodePort: {port}}}]\n"
        ))
        .0
        .remove(0)
    }

    /// An index for n1 with Services and slices listed and the given pods as the pods' list.
    fn listed_with_pods(services: Vec<Service>, pods: Vec<Pod>) -> Index {
        let mut ix = listed_on(n1(), services, Vec::new());
        assert_eq!(ix.take_update().0, None, "pods not listed yet");
        ix.on_pod(Event::Init);
        for p in pods {
            ix.on_pod(Event::InitApply(p));
        }
        ix.on_pod(Event::InitDone);
        ix
    }

    #[test]
    fn pod_field_selector_is_this_nodes_and_none_without_a_name() {
        assert_eq!(
            pod_field_selector(&n1()).as_deref(),
            Some("spec.nodeName=n1")
        );
        assert_eq!(pod_field_selector(&NodeContext::default()), None);
        // Without a node name no pod watch runs, and the index does not wait for one.
        assert!(listed(vec![], vec![]).synced());
    }

    #[test]
    fn host_ports_follow_the_pods_phase_and_address_per_event() {
        let mut ix = listed_with_pods(
            vec![],
            vec![
                pod("web", 8080, UP),
                pod("pending", 8081, "{phase: Pending}"),
            ],
        );
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!("the first update is full")
        };
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(ready(&d.get(&node_key(8080)).cloned()), ["10.0.0.7:80"]);
        assert_eq!(d[&node_key(8080)].name, "ns/web:8080/TCP");
        // The pending pod gets its address: its frontend alone is written.
        ix.on_pod(Event::Apply(pod(
            "pending",
            8081,
            "{phase: Running, podIP: 10.0.0.8}",
        )));
        let (u, _) = ix.take_update();
        let Some(Update::Changes(c)) = u else {
            panic!("{u:?}")
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, node_key(8081));
        assert_eq!(ready(&c[0].1), ["10.0.0.8:80"]);
        // A status change that moves nothing (a condition) yields nothing.
        let mut p = pod("web", 8080, UP);
        p.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        ix.on_pod(Event::Apply(p));
        assert_eq!(ix.take_update().0, None);
        // A pod without hostPorts is not even kept.
        let mut plain = pod("plain", 8082, UP);
        plain.spec.as_mut().unwrap().containers[0]
            .ports
            .as_mut()
            .unwrap()[0]
            .host_port = None;
        ix.on_pod(Event::Apply(plain));
        assert_eq!(ix.take_update().0, None);
        assert!(
            !ix.pods
                .contains_key(&("ns".to_string(), "plain".to_string()))
        );
        // It finishes: the frontend goes; then the pod is deleted: nothing more.
        ix.on_pod(Event::Apply(pod(
            "web",
            8080,
            "{phase: Succeeded, podIP: 10.0.0.7}",
        )));
        assert_eq!(
            ix.take_update().0,
            Some(Update::Changes(vec![(node_key(8080), None)]))
        );
        ix.on_pod(Event::Delete(pod("web", 8080, UP)));
        assert_eq!(ix.take_update().0, None);
        ix.on_pod(Event::Delete(pod("pending", 8081, UP)));
        assert_eq!(
            ix.take_update().0,
            Some(Update::Changes(vec![(node_key(8081), None)]))
        );
    }

    #[test]
    fn a_service_keeps_a_frontend_a_host_port_names_whichever_comes_first() {
        let mut ix = listed_with_pods(vec![], vec![pod("a-pod", 30080, UP)]);
        ix.take_update();
        // The Service comes second and still takes the frontend; the pod is reported.
        ix.on_service(Event::Apply(nodeport("z-svc", 30080)));
        let (u, skipped) = ix.take_update();
        let Some(Update::Changes(c)) = u else {
            panic!("{u:?}")
        };
        let np = c.iter().find(|(k, _)| *k == node_key(30080)).unwrap();
        assert_eq!(np.1.as_ref().unwrap().name, "ns/z-svc:http");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].object, "Pod ns/a-pod");
        assert!(
            skipped[0].reason.contains("Service ns/z-svc:http"),
            "{skipped:?}"
        );
        // The Service goes: the pod's hostPort is back.
        ix.on_service(Event::Delete(nodeport("z-svc", 30080)));
        let Some(Update::Changes(c)) = ix.take_update().0 else {
            panic!()
        };
        let np = c.iter().find(|(k, _)| *k == node_key(30080)).unwrap();
        assert_eq!(ready(&np.1), ["10.0.0.7:80"]);
    }

    #[test]
    fn full_state_with_pods_equals_the_file_sources_translation() {
        let (services, slices) = objects(SAMPLE);
        let pods = vec![
            pod("b", 8080, UP),
            pod("a", 8080, "{phase: Running, podIP: 10.0.0.9}"),
            pod("c", 30080, UP),
            pod("d", 9, "{phase: Running, podIP: 10.0.0.300}"),
        ];
        let (want, want_skipped) =
            crate::model::desired_with_pods(&services, &slices, &pods, &n1());
        let mut ix = Index::new(n1());
        ix.on_pod(Event::Init);
        for p in pods {
            ix.on_pod(Event::InitApply(p));
        }
        ix.on_pod(Event::InitDone);
        ix.on_service(Event::Init);
        for s in services {
            ix.on_service(Event::InitApply(s));
        }
        ix.on_service(Event::InitDone);
        ix.on_slice(Event::Init);
        for s in slices {
            ix.on_slice(Event::InitApply(s));
        }
        ix.on_slice(Event::InitDone);
        let (u, mut skipped) = ix.take_update();
        assert_eq!(u, Some(Update::Full(want)));
        let key = |s: &Skipped| (s.object.clone(), s.reason.clone());
        skipped.sort_by_key(key);
        let mut want_skipped = want_skipped;
        want_skipped.sort_by_key(key);
        assert_eq!(skipped, want_skipped, "b and c taken, d's address bad");
        assert_eq!(skipped.len(), 3);
    }

    /// Two Services naming one frontend: both sources give it to the first by namespace/name,
    /// whatever order the objects came in.
    #[test]
    fn a_frontend_two_services_name_is_the_first_by_name_in_both_sources() {
        let (a, b) = (service("a", "10.96.0.7"), service("b", "10.96.0.7"));
        let slices = vec![
            slice("a-1", "a", &["10.0.0.1"]),
            slice("b-1", "b", &["10.0.0.2"]),
        ];
        for services in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let (want, _) = crate::model::desired(&services, &slices, &n1());
            assert_eq!(want.len(), 1);
            let only = want.values().next().unwrap();
            assert_eq!(only.name, "ns/a:http", "{want:?}");
            let mut ix = listed_on(n1(), services, slices.clone());
            ix.on_pod(Event::Init);
            ix.on_pod(Event::InitDone);
            assert_eq!(ix.take_update().0, Some(Update::Full(want)));
        }
    }

    #[test]
    fn forbidden_pods_leave_the_services_served() {
        let mut ix = Index::new(n1());
        ix.on_service(Event::Init);
        ix.on_service(Event::InitApply(service("a", "10.96.0.1")));
        ix.on_service(Event::InitDone);
        ix.on_slice(Event::Init);
        ix.on_slice(Event::InitDone);
        assert_eq!(ix.take_update().0, None);
        let refused = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            kube::core::Status::failure("pods is forbidden", "Forbidden").with_code(403),
        )));
        assert!(is_forbidden(&refused));
        let unreachable = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            kube::core::Status::failure("etcd", "InternalError").with_code(500),
        )));
        assert!(!is_forbidden(&unreachable));
        assert!(ix.pods_unavailable());
        assert!(!ix.pods_unavailable(), "only once");
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!("Services are served without pods")
        };
        assert!(d.contains_key(&key("10.96.0.1")));
        // Granted later: the pods' list brings the hostPorts in.
        ix.on_pod(Event::Init);
        ix.on_pod(Event::InitApply(pod("web", 8080, UP)));
        ix.on_pod(Event::InitDone);
        let Some(Update::Full(d)) = ix.take_update().0 else {
            panic!()
        };
        assert!(d.contains_key(&node_key(8080)));
    }
}
