//! The Kubernetes API source: Services and discovery.k8s.io/v1 EndpointSlices watched through
//! kube-rs (a kubeconfig, or the pod's in-cluster config), indexed per Service and turned into
//! changes of the desired service maps.
//!
//! `Index` is pure: watcher events in, `Update`s out (the whole desired state after each
//! (re)list, the changed frontends after other events), so it is tested without a server or
//! root. `choose_source`, `client`, `probe` and `events` are the thin shell over kube-rs.
//! Reconnects, resumption from the last resourceVersion and relists after 410 Gone belong to
//! `kube_runtime::watcher` (with its default backoff); this module never retries by itself.
//!
//! Not here: node IPs from the Node object (NodePorts answer on `--node-ip`), EndpointSlice
//! hints (topology-aware routing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use keel_ebpf::SvcKey;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::model::{Desired, DesiredService, NodeContext, Skipped, desired_one};

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
    /// A list or watch failed; the watcher retries after a backoff (relisting after 410 Gone).
    Error {
        kind: &'static str,
        error: watcher::Error,
    },
}

/// Watches every namespace's Services and EndpointSlices, merged into one stream.
pub fn events(client: kube::Client) -> impl Stream<Item = SourceEvent> + Send + Unpin {
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
    let slices = watcher(Api::<EndpointSlice>::all(client), cfg)
        .default_backoff()
        .map(|r| match r {
            Ok(e) => SourceEvent::Slice(Box::new(e)),
            Err(error) => SourceEvent::Error {
                kind: "EndpointSlice",
                error,
            },
        });
    futures::stream::select(services, slices).boxed()
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

/// The API source's view of the cluster: Services, their slices, and the frontends each
/// Service produces. A frontend claimed by two Services (two externalIPs alike) goes to the
/// first by namespace/name.
#[derive(Debug, Default)]
pub struct Index {
    node: NodeContext,
    services: BTreeMap<Ref, Service>,
    /// Slices by owning Service, then by slice name.
    slices: BTreeMap<Ref, BTreeMap<String, EndpointSlice>>,
    /// Slice (namespace, name) -> the Service it was filed under.
    owners: BTreeMap<Ref, Ref>,
    /// Frontends each Service produced at its last translation.
    produced: BTreeMap<Ref, Desired>,
    claims: BTreeMap<SvcKey, BTreeSet<Ref>>,
    /// Services to translate again.
    dirty: BTreeSet<Ref>,
    /// Objects of a (re)list in progress, swapped in at `InitDone`.
    relist_services: Option<Vec<Service>>,
    relist_slices: Option<Vec<EndpointSlice>>,
    services_listed: bool,
    slices_listed: bool,
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
    pub fn new(node: NodeContext) -> Index {
        Index {
            node,
            full: true,
            ..Default::default()
        }
    }

    /// Whether both kinds have been listed once (before that, no update is produced: a
    /// half-listed cluster must not overwrite the maps a previous run left).
    pub fn synced(&self) -> bool {
        self.services_listed && self.slices_listed
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
                self.dirty.insert(r);
            }
            watcher::Event::Init => self.relist_services = Some(Vec::new()),
            watcher::Event::InitApply(s) => {
                self.relist_services.get_or_insert_default().push(s);
            }
            watcher::Event::InitDone => {
                // Whatever is not in the new list was deleted while the watch was down.
                let listed = self.relist_services.take().unwrap_or_default();
                self.dirty
                    .extend(std::mem::take(&mut self.services).into_keys());
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
                self.dirty
                    .extend(std::mem::take(&mut self.slices).into_keys());
                self.owners.clear();
                for s in listed {
                    self.put_slice(s);
                }
                self.slices_listed = true;
                self.full = true;
            }
        }
    }

    fn put_service(&mut self, mut s: Service) {
        slim(&mut s.metadata);
        let r = service_ref(&s);
        self.services.insert(r.clone(), s);
        self.dirty.insert(r);
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
        self.dirty.insert(owner);
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
        self.dirty.insert(owner);
    }

    /// Translates one Service again; records the frontends whose owner or content may change.
    fn retranslate(&mut self, r: &Ref, touched: &mut BTreeSet<SvcKey>) {
        let new = match self.services.get(r) {
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
        let skipped = std::mem::take(&mut self.skipped);
        if std::mem::take(&mut self.full) {
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
        let mut ix = Index::new(NodeContext::default());
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
}
