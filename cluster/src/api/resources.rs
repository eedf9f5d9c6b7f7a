//! The resources the API server serves: their group, version, names, scope and subresources, the
//! k8s-openapi type each object must deserialize into, and where their objects live in the store.
//!
//! Owns the key layout: `/registry/<group or "core">/<plural>/<namespace>/<name>` for namespaced
//! resources and `/registry/<group or "core">/<plural>/<name>` for cluster-scoped ones. Must not
//! hold per-resource behaviour (defaults, validation, printing): see `defaults.rs`, `table.rs`.

use k8s_openapi::api::{apps, coordination, core, discovery};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// `status`, `scale`, `binding`.
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Whether the object's body must deserialize into its k8s-openapi type.
    check: fn(&Value) -> Result<(), String>,
}

fn check<T: DeserializeOwned>(v: &Value) -> Result<(), String> {
    T::deserialize(v).map(|_| ()).map_err(|e| e.to_string())
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];

/// Every served resource, in discovery order.
pub static RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        subresources: &["status"],
        categories: NONE,
        check: check::<core::v1::Namespace>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        subresources: &["status"],
        categories: NONE,
        check: check::<core::v1::Node>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        subresources: &["status", "binding", "log"],
        categories: ALL,
        check: check::<core::v1::Pod>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        subresources: &["status"],
        categories: ALL,
        check: check::<core::v1::Service>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        subresources: NONE,
        categories: NONE,
        check: check::<core::v1::Endpoints>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        subresources: NONE,
        categories: NONE,
        check: check::<core::v1::Event>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        subresources: NONE,
        categories: NONE,
        check: check::<core::v1::ConfigMap>,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: NONE,
        subresources: NONE,
        categories: NONE,
        check: check::<core::v1::Secret>,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        subresources: &["status", "scale"],
        categories: ALL,
        check: check::<apps::v1::Deployment>,
    },
    Resource {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        subresources: &["status", "scale"],
        categories: ALL,
        check: check::<apps::v1::ReplicaSet>,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: NONE,
        subresources: NONE,
        categories: NONE,
        check: check::<coordination::v1::Lease>,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: NONE,
        subresources: NONE,
        categories: NONE,
        check: check::<discovery::v1::EndpointSlice>,
    },
];

/// The API groups besides core, in discovery order.
pub const GROUPS: &[&str] = &["apps", "coordination.k8s.io", "discovery.k8s.io"];

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }

    /// Checks the object deserializes into its k8s-openapi type; the error names the field.
    pub fn check_type(&self, obj: &Value) -> Result<(), String> {
        (self.check)(obj)
    }

    /// The prefix of every key of this resource, e.g. `/registry/core/pods/`.
    pub fn prefix(&self) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{g}/{}/", self.plural)
    }

    /// The prefix of a list: one namespace's objects, or all of them.
    pub fn list_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    /// The key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.prefix()),
            _ => format!("{}{name}", self.prefix()),
        }
    }

    /// Whether this resource's objects carry a status that only the status subresource writes.
    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }
}

/// The resource served at `group`/`version` under `plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of a `kind` in a group (for ownerReferences and bindings).
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The resources of one group/version.
pub fn in_group_version(group: &str, version: &str) -> impl Iterator<Item = &'static Resource> {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_laid_out_by_group_and_scope() {
        let pods = lookup("", "v1", "pods").unwrap();
        assert_eq!(
            pods.key(Some("default"), "a"),
            "/registry/core/pods/default/a"
        );
        assert_eq!(
            pods.list_prefix(Some("default")),
            "/registry/core/pods/default/"
        );
        assert_eq!(pods.list_prefix(None), "/registry/core/pods/");
        let nodes = lookup("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(Some("x"), "n1"), "/registry/core/nodes/n1");
        let deploy = lookup("apps", "v1", "deployments").unwrap();
        assert_eq!(deploy.prefix(), "/registry/apps/deployments/");
        assert_eq!(deploy.api_version(), "apps/v1");
    }

    #[test]
    fn type_check_rejects_wrong_shapes() {
        let pods = lookup("", "v1", "pods").unwrap();
        assert!(
            pods.check_type(&json!({"metadata": {"name": "a"}, "spec": {"containers": []}}))
                .is_ok()
        );
        let e = pods
            .check_type(&json!({"metadata": {"name": "a"}, "spec": {"containers": "x"}}))
            .unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }
}
