//! The three patch types kubectl sends: JSON merge patch (RFC 7386), JSON patch (RFC 6902) —
//! both from the `json-patch` crate — and Kubernetes' strategic merge patch, written here because
//! no maintained Rust crate implements it.
//!
//! Strategic merge patch merges lists of objects by a merge key instead of replacing them, with the
//! merge keys of the Kubernetes types kubectl patches (containers by `name`, container ports by
//! `containerPort`, service ports by `port`, env by `name`, volumeMounts by `mountPath`, ...), and
//! honours the directives kubectl emits: `$patch: replace|delete|merge`, `$retainKeys`,
//! `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` (ordering only; dropped).
//! Pure functions on JSON; no I/O.

use serde_json::{Map, Value};

use super::status::ApiError;

/// A patch body's type, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Result<PatchType, ApiError> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" => Err(ApiError::unsupported_media_type(
                "application/apply-patch+yaml (server-side apply is not supported; use client-side kubectl apply)",
            )),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Applies `patch` (the raw body) of type `ty` to `obj`.
pub fn apply(obj: &mut Value, ty: PatchType, patch: &[u8]) -> Result<(), ApiError> {
    let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid patch: {e}"));
    match ty {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            json_patch::patch(obj, &p).map_err(|e| {
                ApiError::invalid(
                    "",
                    "",
                    "",
                    vec![super::status::Cause::new("", e.to_string())],
                )
            })
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            if !p.is_object() {
                return Err(bad(&"a merge patch must be a JSON object"));
            }
            json_patch::merge(obj, &p);
            Ok(())
        }
        PatchType::Strategic => {
            let p: Value = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            let Value::Object(pm) = &p else {
                return Err(bad(&"a strategic merge patch must be a JSON object"));
            };
            if !obj.is_object() {
                *obj = Value::Object(Map::new());
            }
            if let Value::Object(om) = obj {
                merge_map(om, pm);
            }
            Ok(())
        }
    }
}

/// How a list field merges.
#[derive(Debug, PartialEq, Eq)]
enum ListStrategy {
    Replace,
    Key(&'static str),
    Primitive,
}

fn list_strategy(field: &str, sample: Option<&Value>) -> ListStrategy {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => ListStrategy::Key("name"),
        "volumeMounts" => ListStrategy::Key("mountPath"),
        "volumeDevices" => ListStrategy::Key("devicePath"),
        "ports" => {
            if sample.is_some_and(|s| s.get("containerPort").is_some()) {
                ListStrategy::Key("containerPort")
            } else {
                ListStrategy::Key("port")
            }
        }
        "conditions" | "addresses" => ListStrategy::Key("type"),
        "ownerReferences" => ListStrategy::Key("uid"),
        "hostAliases" => ListStrategy::Key("ip"),
        "taints" => ListStrategy::Key("key"),
        "finalizers" => ListStrategy::Primitive,
        _ => ListStrategy::Replace,
    }
}

fn merge_map(orig: &mut Map<String, Value>, patch: &Map<String, Value>) {
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        *orig = strip(patch);
        return;
    }
    for (k, pv) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (orig.get_mut(field), pv.as_array()) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if pv.is_null() {
            orig.remove(k);
            continue;
        }
        match (orig.get_mut(k), pv) {
            (Some(Value::Object(om)), Value::Object(pm)) => {
                match pm.get("$patch").and_then(Value::as_str) {
                    Some("delete") => {
                        orig.remove(k);
                    }
                    _ => merge_map(om, pm),
                }
            }
            (Some(Value::Array(ol)), Value::Array(pl)) => merge_list(k, ol, pl),
            (_, Value::Object(pm))
                if pm.get("$patch").and_then(Value::as_str) == Some("delete") =>
            {
                orig.remove(k);
            }
            (_, Value::Array(pl)) => {
                let mut list = Vec::new();
                merge_list(k, &mut list, pl);
                orig.insert(k.clone(), Value::Array(list));
            }
            (_, pv) => {
                orig.insert(k.clone(), strip_value(pv));
            }
        }
    }
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) {
        orig.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
}

fn merge_list(field: &str, orig: &mut Vec<Value>, patch: &[Value]) {
    let replace_all = patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace_all {
        *orig = patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(strip_value)
            .collect();
        return;
    }
    match list_strategy(field, patch.first().or(orig.first())) {
        ListStrategy::Replace => *orig = patch.iter().map(strip_value).collect(),
        ListStrategy::Primitive => {
            for pe in patch {
                if !orig.contains(pe) {
                    orig.push(pe.clone());
                }
            }
        }
        ListStrategy::Key(key) => {
            for pe in patch {
                let Value::Object(pm) = pe else {
                    continue;
                };
                let Some(kv) = pm.get(key) else {
                    // No merge key: nothing to match it with; append it.
                    orig.push(strip_value(pe));
                    continue;
                };
                let pos = orig.iter().position(|o| o.get(key) == Some(kv));
                let delete = pm.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        orig.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        if let Value::Object(om) = &mut orig[i] {
                            merge_map(om, pm);
                        }
                    }
                    (None, false) => orig.push(strip_value(pe)),
                }
            }
        }
    }
}

/// A patch value without its directives (a new subtree applied onto nothing).
fn strip_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip(m)),
        Value::Array(a) => Value::Array(a.iter().map(strip_value).collect()),
        other => other.clone(),
    }
}

fn strip(m: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    merge_map(&mut out, &without_replace(m));
    out
}

fn without_replace(m: &Map<String, Value>) -> Map<String, Value> {
    let mut m = m.clone();
    if m.get("$patch").and_then(Value::as_str) == Some("replace") {
        m.remove("$patch");
    }
    m.retain(|_, v| !v.is_null());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(mut obj: Value, patch: Value) -> Value {
        apply(&mut obj, PatchType::Strategic, patch.to_string().as_bytes()).unwrap();
        obj
    }

    fn deployment() -> Value {
        json!({"metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a"]},
               "spec": {"replicas": 1, "template": {"spec": {"containers": [
                   {"name": "app", "image": "nginx:1", "ports": [{"containerPort": 80}],
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                   {"name": "side", "image": "busybox"}]}}}})
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let out = smp(
            deployment(),
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
                "containers": [{"name": "app", "image": "nginx:2",
                                "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                                "ports": [{"containerPort": 443}]}]}}}}),
        );
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["image"], "nginx:2");
        assert_eq!(cs[1]["image"], "busybox");
        assert_eq!(
            cs[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        assert_eq!(
            cs[0]["ports"],
            json!([{"containerPort": 80}, {"containerPort": 443}])
        );
    }

    #[test]
    fn strategic_directives() {
        let out = smp(
            deployment(),
            json!({"metadata": {"labels": {"app": null, "tier": "fe"},
                                "finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]},
                   "spec": {"template": {"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"tier": "fe"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1);
        let out = smp(
            deployment(),
            json!({"spec": {"template": {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "only", "image": "x"}])
        );
        let out = smp(
            json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn service_ports_merge_by_port_and_plain_lists_replace() {
        let out = smp(
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}], "externalIPs": ["1.1.1.1"]}}),
            json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}, {"port": 443}], "externalIPs": ["2.2.2.2"]}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "targetPort": 9090}, {"port": 443}])
        );
        assert_eq!(out["spec"]["externalIPs"], json!(["2.2.2.2"]));
    }

    #[test]
    fn merge_and_json_patch() {
        let mut o = deployment();
        apply(
            &mut o,
            PatchType::Merge,
            br#"{"spec":{"replicas":3},"metadata":{"labels":{"app":null}}}"#,
        )
        .unwrap();
        assert_eq!(o["spec"]["replicas"], 3);
        assert!(o["metadata"]["labels"].as_object().unwrap().is_empty());
        apply(
            &mut o,
            PatchType::Json,
            br#"[{"op":"replace","path":"/spec/replicas","value":5}]"#,
        )
        .unwrap();
        assert_eq!(o["spec"]["replicas"], 5);
        let e = apply(
            &mut o,
            PatchType::Json,
            br#"[{"op":"test","path":"/spec/replicas","value":1}]"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(apply(&mut o, PatchType::Json, b"{").unwrap_err().code, 400);
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml")
                .unwrap_err()
                .code,
            415
        );
    }
}
