//! CreateContainer: translates the container config ([`container_convert::container_config`]),
//! refuses a (pod, name, attempt) already taken with AlreadyExists naming the holder, joins the
//! pod (its namespaces, cgroup, /etc files; the PID namespace per the container's own
//! namespace options, TARGET included) and creates the container through keel-runtime.
//! The pod must exist (NotFound) and be ready (FailedPrecondition).

use keel_runtime::container::{ContainerError, ImageInfo};
use keel_runtime::pod::PodError;

use crate::container_events::Kind;
use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert};

pub(crate) async fn create_container(
    svc: &CriService,
    req: api::CreateContainerRequest,
) -> Result<api::CreateContainerResponse, CriError> {
    let (_, _, image) = container_convert::required(req.config.as_ref())?;
    let image = image.to_owned();
    if req.pod_sandbox_id.is_empty() {
        return Err(CriError::invalid("pod_sandbox_id", "empty"));
    }
    let Some(pod_id) = crate::pod_sandbox_stop::resolve_pod(svc, &req.pod_sandbox_id).await? else {
        return Err(CriError::NotFound {
            what: "pod sandbox",
            id: req.pod_sandbox_id,
        });
    };
    let _lock = svc.lock_pod(&pod_id).await;
    let image = ImageInfo::resolve(&svc.images, &image).await?;
    let pods = svc.pods.clone();
    let events = svc.events.clone();
    let id = blocking(move || {
        let pod = match pods.record(&pod_id) {
            Ok(p) => p,
            Err(PodError::NotFound(_)) => {
                return Err(CriError::NotFound {
                    what: "pod sandbox",
                    id: pod_id,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let config = req.config.as_ref();
        let (cfg, meta) = container_convert::container_config(config, &pod)?;
        let containers = pods.containers();
        if let Ok(holder) = containers.resolve(&cfg.name) {
            return Err(CriError::AlreadyExists {
                what: "container",
                name: format!("{} (attempt {}) in pod {pod_id}", meta.name, meta.attempt),
                id: holder,
            });
        }
        let mut joined = pods.container_config(&pod_id, &cfg)?;
        let ns = config
            .and_then(|c| c.linux.as_ref())
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        let target_pid = match ns.filter(|n| n.pid == api::NamespaceMode::Target as i32) {
            Some(n) => containers
                .resolve(&n.target_id)
                .and_then(|t| containers.status(&t))
                .ok()
                .and_then(|t| t.pid),
            None => None,
        };
        if let Some(mode) = container_convert::pid_mode(ns, target_pid)? {
            joined.namespaces.pid = mode;
        }
        let id = match containers.create(&joined, &image) {
            Ok(id) => id,
            Err(ContainerError::NameInUse(n)) => {
                let holder = containers.resolve(&n).unwrap_or_default();
                return Err(CriError::AlreadyExists {
                    what: "container",
                    name: n,
                    id: holder,
                });
            }
            Err(e) => return Err(e.into()),
        };
        events.publish(&pods, &id, Some(&pod_id), Kind::Created);
        Ok(id)
    })
    .await?;
    tracing::info!(container = %id, "container created");
    Ok(api::CreateContainerResponse { container_id: id })
}
