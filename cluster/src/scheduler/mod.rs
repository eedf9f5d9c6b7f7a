//! The scheduler: binds every pod without a node to the node that fits it best, through the
//! `pods/binding` subresource, as kube-scheduler does. An ordinary API client (kube-rs), so it
//! runs inside `keel server` and against any Kubernetes API server (`keel scheduler`).
//!
//! Shape: two watchers (nodes, pods) feed one [`cache::Cache`] and one [`queue::Queue`] under a
//! mutex; one loop pops pods, decides with the pure [`score::choose`] (filters in
//! [`filter`]), counts the pod on its node at once ("assumes" it) and hands the binding to a task
//! (at most `bind_concurrency` in flight). A failed binding un-assumes and backs off. A pod that
//! fits nowhere gets a `FailedScheduling` event saying why (once per distinct message) and waits in
//! the back-off queue until its back-off ends or the cluster changes.
//!
//! Not here: preemption, pod (anti-)affinity, topology spread constraints, scheduling gates,
//! the `PodScheduled` condition, `Scheduled` events (10,000 pods would mean 10,000 more writes).

pub mod cache;
pub mod filter;
pub mod quantity;
pub mod queue;
pub mod score;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Event, EventSource, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use tokio::sync::{Notify, Semaphore};

use cache::{Cache, Needs};
use queue::Queue;
use score::Decision;

/// The name pods ask for in `spec.schedulerName` (empty means this one too).
pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Pods whose `spec.schedulerName` is this (or empty) are ours.
    pub name: String,
    /// Bindings in flight at once.
    pub bind_concurrency: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            name: DEFAULT_SCHEDULER_NAME.to_string(),
            bind_concurrency: 32,
        }
    }
}

/// What stops the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A watch stream ended (the watchers retry errors themselves, so this is a shutdown).
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

/// A pod waiting for a node.
#[derive(Debug, Clone)]
struct Pending {
    uid: String,
    namespace: String,
    name: String,
    needs: Needs,
}

#[derive(Default)]
struct State {
    cache: Cache,
    queue: Queue,
    pending: HashMap<String, Pending>,
    /// Keys with a binding in flight.
    binding: HashSet<String>,
    /// The last FailedScheduling message sent per key.
    told: HashMap<String, String>,
    nodes_synced: bool,
    pods_synced: bool,
    /// Uids seen since a pod watch (re)started, to drop what vanished meanwhile.
    relisting: Option<HashSet<String>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    config: SchedulerConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is plain bookkeeping; a panic in one leaves usable data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ours(&self, pod: &Pod) -> bool {
        let name = pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref());
        name.is_none_or(|n| n.is_empty() || n == self.config.name)
    }
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Runs the scheduler until a watch ends.
pub async fn run(client: kube::Client, config: SchedulerConfig) -> Result<(), SchedulerError> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        config,
    });
    let nodes = tokio::spawn(watch_nodes(client.clone(), shared.clone()));
    let pods = tokio::spawn(watch_pods(client.clone(), shared.clone()));
    let sched = tokio::spawn(schedule_loop(client, shared));
    tokio::select! {
        _ = nodes => Err(SchedulerError::WatchEnded("node")),
        _ = pods => Err(SchedulerError::WatchEnded("pod")),
        _ = sched => Err(SchedulerError::WatchEnded("scheduling")),
    }
}

async fn watch_nodes(client: kube::Client, shared: Arc<Shared>) {
    let api: Api<Node> = Api::all(client);
    let mut events = watcher(api).boxed();
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: node watch");
                continue;
            }
        };
        let mut st = shared.lock();
        match ev {
            WatchEvent::Init => st.cache.clear_nodes(),
            WatchEvent::InitApply(n) => {
                st.cache.upsert_node(&n);
            }
            WatchEvent::InitDone => {
                st.nodes_synced = true;
                st.queue.retry_all();
            }
            WatchEvent::Apply(n) => {
                if st.cache.upsert_node(&n) {
                    st.queue.retry_all();
                }
            }
            WatchEvent::Delete(n) => st
                .cache
                .remove_node(n.metadata.name.as_deref().unwrap_or("")),
        }
        drop(st);
        shared.wake.notify_one();
    }
}

fn watcher<K>(api: Api<K>) -> impl futures::Stream<Item = Result<WatchEvent<K>, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

async fn watch_pods(client: kube::Client, shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(client);
    let mut events = watcher(api).boxed();
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: pod watch");
                continue;
            }
        };
        let mut st = shared.lock();
        match ev {
            WatchEvent::Init => st.relisting = Some(HashSet::new()),
            WatchEvent::InitApply(p) => {
                if let (Some(seen), Some(uid)) = (st.relisting.as_mut(), p.metadata.uid.clone()) {
                    seen.insert(uid);
                }
                pod_changed(&shared, &mut st, &p);
            }
            WatchEvent::InitDone => {
                if let Some(seen) = st.relisting.take() {
                    let gone: Vec<(String, String)> = st
                        .pending
                        .iter()
                        .filter(|(_, p)| !seen.contains(&p.uid))
                        .map(|(k, p)| (k.clone(), p.uid.clone()))
                        .collect();
                    for (k, uid) in gone {
                        pod_gone(&mut st, &k, &uid);
                    }
                    st.cache.retain_assigned(|uid| seen.contains(uid));
                    st.queue.retry_all();
                }
                st.pods_synced = true;
            }
            WatchEvent::Apply(p) => pod_changed(&shared, &mut st, &p),
            WatchEvent::Delete(p) => {
                let k = key(
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or(""),
                );
                pod_gone(&mut st, &k, p.metadata.uid.as_deref().unwrap_or(""));
                st.queue.retry_all();
            }
        }
        drop(st);
        shared.wake.notify_one();
    }
}

fn pod_gone(st: &mut State, k: &str, uid: &str) {
    st.cache.unassign(uid);
    st.pending.remove(k);
    st.queue.forget(k);
    st.told.remove(k);
}

fn pod_changed(shared: &Shared, st: &mut State, p: &Pod) {
    let (Some(ns), Some(name), Some(uid)) = (
        p.metadata.namespace.as_deref(),
        p.metadata.name.as_deref(),
        p.metadata.uid.as_deref(),
    ) else {
        return;
    };
    let k = key(ns, name);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    let finished = matches!(phase, Some("Succeeded") | Some("Failed"));
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("");
    if !node.is_empty() {
        // Bound (by us or anyone): count it on its node until it finishes.
        if finished {
            st.cache.unassign(uid);
            st.queue.retry_all();
        } else {
            st.cache.assign(uid, node, Needs::of(p));
        }
        st.pending.remove(&k);
        st.queue.forget(&k);
        st.told.remove(&k);
        return;
    }
    if finished || p.metadata.deletion_timestamp.is_some() || !shared.ours(p) {
        st.pending.remove(&k);
        st.queue.forget(&k);
        return;
    }
    if let Some(old) = st.pending.get(&k)
        && old.uid != uid
    {
        // Deleted and created again under the same name while we were not looking.
        let old_uid = old.uid.clone();
        pod_gone(st, &k, &old_uid);
    }
    st.pending.insert(
        k.clone(),
        Pending {
            uid: uid.to_string(),
            namespace: ns.to_string(),
            name: name.to_string(),
            needs: Needs::of(p),
        },
    );
    if !st.binding.contains(&k) {
        st.queue.add(&k);
    }
}

enum Step {
    Bind(Pending, String),
    Tell(Pending, String),
    Nothing,
    Wait(Option<Instant>),
}

async fn schedule_loop(client: kube::Client, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(shared.config.bind_concurrency.max(1)));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let step = next_step(&shared);
        match step {
            Step::Bind(p, node) => {
                let (client, shared) = (client.clone(), shared.clone());
                tokio::spawn(async move {
                    bind(client, &shared, p, node).await;
                    drop(permit);
                });
            }
            Step::Tell(p, message) => {
                drop(permit);
                tokio::spawn(tell(client.clone(), p, message));
            }
            Step::Nothing => drop(permit),
            Step::Wait(until) => {
                drop(permit);
                let woken = shared.wake.notified();
                match until {
                    Some(at) => {
                        let _ = tokio::time::timeout_at(at.into(), woken).await;
                    }
                    None => woken.await,
                }
            }
        }
    }
}

fn next_step(shared: &Shared) -> Step {
    let now = Instant::now();
    let mut st = shared.lock();
    if !(st.nodes_synced && st.pods_synced) {
        return Step::Wait(None);
    }
    let Some(k) = st.queue.pop(now) else {
        return Step::Wait(st.queue.next_backoff());
    };
    let Some(p) = st.pending.get(&k).cloned() else {
        return Step::Nothing;
    };
    if st.binding.contains(&k) {
        return Step::Nothing;
    }
    match score::choose(&p.uid, &p.needs, st.cache.nodes()) {
        Decision::Node(node) => {
            st.cache.assign(&p.uid, &node, p.needs.clone());
            st.binding.insert(k);
            Step::Bind(p, node)
        }
        Decision::Unschedulable { nodes, reasons } => {
            st.queue.back_off(&k, now);
            let message = filter::unschedulable_message(nodes, &reasons);
            if st.told.get(&k) == Some(&message) {
                return Step::Nothing;
            }
            st.told.insert(k, message.clone());
            Step::Tell(p, message)
        }
    }
}

async fn bind(client: kube::Client, shared: &Shared, p: Pending, node: String) {
    let api: Api<Pod> = Api::namespaced(client, &p.namespace);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            uid: Some(p.uid.clone()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.clone()),
            ..ObjectReference::default()
        },
    };
    let result: Result<serde_json::Value, kube::Error> = api
        .create_subresource("binding", &p.name, &PostParams::default(), &binding)
        .await;
    let k = key(&p.namespace, &p.name);
    let mut st = shared.lock();
    st.binding.remove(&k);
    match result {
        Ok(_) => {
            st.pending.remove(&k);
            st.queue.forget(&k);
            st.told.remove(&k);
            tracing::debug!(pod = %k, %node, "bound");
        }
        Err(e) => {
            // Not bound (gone, already bound elsewhere, or the server failed): the watch tells
            // the truth about the pod; until then it is not counted and waits its back-off.
            tracing::warn!(pod = %k, %node, error = %e, "binding failed");
            st.cache.unassign(&p.uid);
            if st.pending.contains_key(&k) {
                st.queue.back_off(&k, Instant::now());
            }
        }
    }
    drop(st);
    shared.wake.notify_one();
}

async fn tell(client: kube::Client, p: Pending, message: String) {
    tracing::info!(pod = %key(&p.namespace, &p.name), %message, "FailedScheduling");
    let api: Api<Event> = Api::namespaced(client, &p.namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", p.name)),
            namespace: Some(p.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            uid: Some(p.uid.clone()),
            ..ObjectReference::default()
        },
        reason: Some("FailedScheduling".into()),
        message: Some(message),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(DEFAULT_SCHEDULER_NAME.into()),
            host: None,
        }),
        reporting_component: Some(DEFAULT_SCHEDULER_NAME.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    };
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, "create FailedScheduling event");
    }
}
