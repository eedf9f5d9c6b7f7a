//! Discovery documents: `/version`, `/api`, `/apis`, `/apis/<group>` and each group/version's
//! APIResourceList, built from the resource table; and a minimal `/openapi/v2`.
//!
//! The OpenAPI document is deliberately empty: kubectl fetches it (as protobuf) for client-side
//! validation and for nothing else here, skips validation of kinds it does not describe, and
//! computes strategic merge patches for built-in kinds from its own compiled-in types. An empty
//! document (zero-length protobuf, `{"swagger": "2.0", ...}` as JSON) therefore lets plain
//! `kubectl apply` work while the server validates every object itself.

use serde_json::{Value, json};

use super::resources::{GROUPS, RESOURCES, Resource, in_group_version};

/// The Kubernetes version the API answers as (kubectl warns on a skew of more than one minor).
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "32";

pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0-keel.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a (keel is written in Rust)",
        "compiler": "rustc",
        "platform": format!("linux/{}", std::env::consts::ARCH),
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn group_list() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": GROUPS.iter().map(|g| group(g)).collect::<Vec<_>>(),
    })
}

/// `/apis/<group>`, or None for a group not served.
pub fn api_group(name: &str) -> Option<Value> {
    GROUPS.contains(&name).then(|| {
        let mut g = group(name);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        g
    })
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn entry(r: &Resource) -> Value {
    let mut e = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        e["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        e["categories"] = json!(r.categories);
    }
    e
}

fn sub_entry(r: &Resource, sub: &str) -> Value {
    match sub {
        "scale" => json!({
            "name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
            "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"],
        }),
        "binding" => json!({
            "name": format!("{}/binding", r.plural), "singularName": "", "namespaced": r.namespaced,
            "kind": "Binding", "verbs": ["create"],
        }),
        "log" => json!({
            "name": format!("{}/log", r.plural), "singularName": "", "namespaced": r.namespaced,
            "kind": r.kind, "verbs": ["get"],
        }),
        _ => json!({
            "name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced,
            "kind": r.kind, "verbs": ["get", "patch", "update"],
        }),
    }
}

/// `/api/v1` or `/apis/<group>/<version>`, or None when not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let served: Vec<&Resource> = in_group_version(group, version).collect();
    if served.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for r in served {
        resources.push(entry(r));
        for sub in r.subresources {
            resources.push(sub_entry(r, sub));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// The JSON form of the empty OpenAPI v2 document.
pub fn openapi_v2_json() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Keel", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0")},
        "paths": {},
        "definitions": {},
    })
}

/// Every served resource's kind, for error messages.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    RESOURCES.iter().map(|r| r.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_lists_include_subresources() {
        let apps = resource_list("apps", "v1").unwrap();
        let names: Vec<&str> = apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"deployments/scale"));
        assert!(names.contains(&"replicasets/status"));
        let core = resource_list("", "v1").unwrap();
        assert_eq!(core["groupVersion"], "v1");
        let pods = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "pods")
            .unwrap();
        assert_eq!(pods["shortNames"], json!(["po"]));
        assert!(resource_list("batch", "v1").is_none());
        assert_eq!(group_list()["groups"].as_array().unwrap().len(), 3);
        assert!(api_group("apps").is_some());
        assert!(kinds().any(|k| k == "Lease"));
    }
}
