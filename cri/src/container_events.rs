//! GetContainerEvents: a server stream of CONTAINER_CREATED / STARTED / STOPPED / DELETED
//! events (kubelet's evented PLEG), from a tokio broadcast fed by the RPCs that change
//! containers and by [`watch`], which notices containers whose init exited on its own.
//!
//! Each container's last reported status is kept in [`Events`], and an event is sent only when
//! it changes that status ([`Events::transition`]), so an exit seen both by StopContainer and
//! by the watcher is reported once. A subscriber that falls behind by more than [`CAPACITY`]
//! events misses the oldest (kubelet relists then, as it does on any gap).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use keel_runtime::container::{ListFilter, Status};
use keel_runtime::pod::PodRuntime;
use tokio::sync::{broadcast, watch as watch_channel};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use tonic::codegen::BoxStream;

use crate::service::CriService;
use crate::{CriError, api, container_convert, pod_convert};

/// Events buffered per subscriber.
pub(crate) const CAPACITY: usize = 1024;
/// How often [`watch`] looks for exits.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The kind of a container event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Created,
    Started,
    Stopped,
    Deleted,
}

impl Kind {
    fn cri(self) -> api::ContainerEventType {
        match self {
            Kind::Created => api::ContainerEventType::ContainerCreatedEvent,
            Kind::Started => api::ContainerEventType::ContainerStartedEvent,
            Kind::Stopped => api::ContainerEventType::ContainerStoppedEvent,
            Kind::Deleted => api::ContainerEventType::ContainerDeletedEvent,
        }
    }

    /// The status a container has after this event (`None`: gone).
    fn status(self) -> Option<Status> {
        match self {
            Kind::Created => Some(Status::Created),
            Kind::Started => Some(Status::Running),
            Kind::Stopped => Some(Status::Exited),
            Kind::Deleted => None,
        }
    }
}

/// The event broadcast and each container's last reported status.
pub(crate) struct Events {
    tx: broadcast::Sender<api::ContainerEventResponse>,
    reported: Mutex<HashMap<String, Status>>,
}

impl Default for Events {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Events {
            tx,
            reported: Mutex::default(),
        }
    }
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<api::ContainerEventResponse> {
        self.tx.subscribe()
    }

    /// Whether `kind` changes what was last reported for `id` (and records it if so).
    pub fn transition(&self, id: &str, kind: Kind) -> bool {
        let mut m = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        match kind.status() {
            Some(s) => m.insert(id.to_owned(), s) != Some(s),
            None => {
                m.remove(id);
                true
            }
        }
    }

    /// Remembers a status without reporting it (the watcher's first look after a start).
    fn seed(&self, id: &str, status: Status) {
        let mut m = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_owned()).or_insert(status);
    }

    fn reported(&self, id: &str) -> Option<Status> {
        let m = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).copied()
    }

    /// Sends `kind` for container `id` of pod `pod_id` if it is news. Blocking (reads the
    /// container's and the pod's records for the statuses the event carries).
    pub fn publish(&self, pods: &PodRuntime, id: &str, pod_id: Option<&str>, kind: Kind) {
        if !self.transition(id, kind) {
            return;
        }
        let ev = event(pods, id, pod_id, kind);
        // No subscriber is not an error.
        let _ = self.tx.send(ev);
    }
}

/// The event message: the container's status (unless deleted) and its pod's status.
pub(crate) fn event(
    pods: &PodRuntime,
    id: &str,
    pod_id: Option<&str>,
    kind: Kind,
) -> api::ContainerEventResponse {
    let status = pods.containers().status(id).ok();
    let pod_id = pod_id
        .map(str::to_owned)
        .or_else(|| status.as_ref().and_then(|s| s.record.config.pod_id.clone()));
    let pod_sandbox_status = pod_id
        .and_then(|p| pods.status(&p).ok())
        .map(|p| pod_convert::pod_status(&p));
    api::ContainerEventResponse {
        container_id: id.to_owned(),
        container_event_type: kind.cri() as i32,
        created_at: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        pod_sandbox_status,
        containers_statuses: status
            .filter(|_| kind != Kind::Deleted)
            .map(|s| container_convert::container_status(&s))
            .into_iter()
            .collect(),
    }
}

pub(crate) async fn get_container_events(
    svc: &CriService,
    _req: api::GetEventsRequest,
) -> Result<BoxStream<api::ContainerEventResponse>, CriError> {
    let stream = BroadcastStream::new(svc.events.subscribe()).filter_map(|r| match r {
        Ok(ev) => Some(Ok(ev)),
        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
            tracing::warn!(missed = n, "container events subscriber fell behind");
            None
        }
    });
    Ok(Box::pin(stream))
}

/// Reports STOPPED for containers that exited by themselves, until `stop` turns true. The
/// first look only remembers what is there (a restarted daemon does not replay old exits).
pub(crate) async fn watch(
    svc: std::sync::Arc<CriService>,
    mut stop: watch_channel::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let pods = svc.pods.clone();
        let listed =
            tokio::task::spawn_blocking(move || pods.containers().list(&ListFilter::default()))
                .await;
        match listed {
            Ok(Ok(list)) => {
                let svc2 = std::sync::Arc::clone(&svc);
                let first_look = first;
                let _ = tokio::task::spawn_blocking(move || {
                    for c in list {
                        let id = &c.record.id;
                        if first_look || svc2.events.reported(id).is_none() {
                            svc2.events.seed(id, c.status);
                        } else if c.status == Status::Exited {
                            svc2.events.publish(
                                &svc2.pods,
                                id,
                                c.record.config.pod_id.as_deref(),
                                Kind::Stopped,
                            );
                        }
                    }
                })
                .await;
                first = false;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "container events: list containers"),
            Err(e) => tracing::warn!(error = %e, "container events: list task"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_reported_once_whoever_sees_it() {
        let ev = Events::default();
        assert!(ev.transition("c1", Kind::Created));
        assert!(ev.transition("c1", Kind::Started));
        assert!(ev.transition("c1", Kind::Stopped));
        assert!(
            !ev.transition("c1", Kind::Stopped),
            "second STOPPED is no news"
        );
        assert!(ev.transition("c1", Kind::Deleted));
        assert_eq!(ev.reported("c1"), None);
        ev.seed("c2", Status::Exited);
        assert!(!ev.transition("c2", Kind::Stopped));
        ev.seed("c2", Status::Running);
        assert_eq!(
            ev.reported("c2"),
            Some(Status::Exited),
            "seed never overwrites"
        );
    }

    #[test]
    fn kinds_map_to_cri_event_types() {
        assert_eq!(
            Kind::Created.cri(),
            api::ContainerEventType::ContainerCreatedEvent
        );
        assert_eq!(
            Kind::Deleted.cri(),
            api::ContainerEventType::ContainerDeletedEvent
        );
    }
}
