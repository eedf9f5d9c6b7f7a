//! ListContainers: every container made through CRI (those with a pod), filtered by id
//! prefix, state, pod id (prefix) and labels.

use keel_runtime::container::{ContainerInfo, ListFilter, Status};

use crate::service::{CriService, blocking};
use crate::{CriError, api, container_convert};

/// The runtime filter for a CRI container filter's id, state and labels.
pub(crate) fn list_filter(
    id: &str,
    state: Option<i32>,
    labels: &std::collections::HashMap<String, String>,
) -> ListFilter {
    ListFilter {
        id_prefix: (!id.is_empty()).then(|| id.to_owned()),
        status: state.map(|s| match api::ContainerState::try_from(s) {
            Ok(api::ContainerState::ContainerCreated) => Status::Created,
            Ok(api::ContainerState::ContainerRunning) => Status::Running,
            Ok(api::ContainerState::ContainerExited) => Status::Exited,
            _ => Status::Unknown,
        }),
        pod_id: None,
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Whether a container is a CRI container of a pod whose id starts with `pod_prefix`.
pub(crate) fn in_pod(c: &ContainerInfo, pod_prefix: &str) -> bool {
    container_convert::meta(&c.record.config).is_some()
        && c.record
            .config
            .pod_id
            .as_deref()
            .is_some_and(|p| p.starts_with(pod_prefix))
}

pub(crate) async fn list_containers(
    svc: &CriService,
    req: api::ListContainersRequest,
) -> Result<api::ListContainersResponse, CriError> {
    let containers = svc.containers().clone();
    blocking(move || {
        let f = req.filter.unwrap_or_default();
        let filter = list_filter(&f.id, f.state.map(|s| s.state), &f.label_selector);
        let containers = containers
            .list(&filter)?
            .iter()
            .filter(|c| in_pod(c, &f.pod_sandbox_id))
            .map(container_convert::container)
            .collect();
        Ok(api::ListContainersResponse { containers })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_filters_translate() {
        let labels = std::collections::HashMap::from([("app".to_owned(), "web".to_owned())]);
        let f = list_filter(
            "ab",
            Some(api::ContainerState::ContainerRunning as i32),
            &labels,
        );
        assert_eq!(f.id_prefix.as_deref(), Some("ab"));
        assert_eq!(f.status, Some(Status::Running));
        assert_eq!(f.labels["app"], "web");
        let all = list_filter("", None, &Default::default());
        assert!(all.id_prefix.is_none() && all.status.is_none());
    }
}
