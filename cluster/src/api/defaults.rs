//! Per-resource defaulting and validation, as kube-apiserver's registry strategies do it: the
//! defaults kubectl and controllers expect to read back (pod restartPolicy, container
//! imagePullPolicy, deployment strategy, service type, ...), the status a new object starts with,
//! and the field checks whose failures make a 422 listing every bad field.
//!
//! Pure functions on JSON objects; service IP and port allocation lives in `alloc.rs`.

use serde_json::{Map, Value, json};

use super::resources::Resource;
use super::selectors::LabelSelector;
use super::status::Cause;

/// Fills defaults on a new or updated object.
pub fn apply_defaults(res: &Resource, obj: &mut Value) {
    match res.plural {
        "pods" => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec_defaults(spec);
            }
        }
        "deployments" => {
            let spec = ensure_obj(obj, "spec");
            spec.entry("replicas").or_insert(json!(1));
            spec.entry("revisionHistoryLimit").or_insert(json!(10));
            spec.entry("progressDeadlineSeconds").or_insert(json!(600));
            let strategy = spec
                .entry("strategy")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(s) = strategy {
                s.entry("type").or_insert(json!("RollingUpdate"));
                if s["type"] == "RollingUpdate" {
                    let ru = s.entry("rollingUpdate").or_insert_with(|| json!({}));
                    if let Some(ru) = ru.as_object_mut() {
                        ru.entry("maxUnavailable").or_insert(json!("25%"));
                        ru.entry("maxSurge").or_insert(json!("25%"));
                    }
                }
            }
            template_defaults(obj);
        }
        "replicasets" => {
            ensure_obj(obj, "spec")
                .entry("replicas")
                .or_insert(json!(1));
            template_defaults(obj);
        }
        "services" => {
            let spec = ensure_obj(obj, "spec");
            spec.entry("type").or_insert(json!("ClusterIP"));
            if spec["type"] != "ExternalName" {
                spec.entry("sessionAffinity").or_insert(json!("None"));
                spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
                spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
                spec.entry("internalTrafficPolicy")
                    .or_insert(json!("Cluster"));
            }
            if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
                spec.entry("externalTrafficPolicy")
                    .or_insert(json!("Cluster"));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert(json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        p.entry("targetPort").or_insert(port);
                    }
                }
            }
        }
        "namespaces" => {
            let status = ensure_obj(obj, "status");
            status.entry("phase").or_insert(json!("Active"));
        }
        "secrets" if obj["type"].as_str().unwrap_or("").is_empty() => {
            obj["type"] = json!("Opaque");
        }
        _ => {}
    }
}

/// The status a newly created object starts with (the status subresource owns it afterwards).
pub fn initial_status(res: &Resource, obj: &mut Value) {
    let status = match res.plural {
        "pods" => json!({"phase": "Pending", "qosClass": qos_class(&obj["spec"])}),
        "namespaces" => json!({"phase": "Active"}),
        "deployments" | "replicasets" => json!({}),
        "services" => json!({"loadBalancer": {}}),
        _ => return,
    };
    if let Some(o) = obj.as_object_mut() {
        o.insert("status".into(), status);
    }
}

fn template_defaults(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec_defaults(spec);
    }
}

fn ensure_obj<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let map = obj.as_object_mut().expect("made an object above");
    let v = map.entry(field).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made an object above")
}

fn pod_spec_defaults(spec: &mut Value) {
    let Some(s) = spec.as_object_mut() else {
        return;
    };
    s.entry("restartPolicy").or_insert(json!("Always"));
    s.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    s.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    s.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    s.entry("securityContext").or_insert(json!({}));
    s.entry("enableServiceLinks").or_insert(json!(true));
    for list in ["containers", "initContainers"] {
        for c in s
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            let image = c.get("image").and_then(Value::as_str).unwrap_or("");
            let policy = if image_is_latest(image) {
                "Always"
            } else {
                "IfNotPresent"
            };
            c.entry("imagePullPolicy").or_insert(json!(policy));
            c.entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            c.entry("terminationMessagePolicy").or_insert(json!("File"));
            c.entry("resources").or_insert(json!({}));
            for p in c
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
                .filter_map(Value::as_object_mut)
            {
                p.entry("protocol").or_insert(json!("TCP"));
            }
        }
    }
}

/// An image with no tag, or the `latest` tag, is pulled always (Kubernetes' rule).
fn image_is_latest(image: &str) -> bool {
    if image.contains('@') {
        return false;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => tag == "latest",
        None => true,
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let has_any = containers.iter().any(|c| {
        c.pointer("/resources/requests")
            .is_some_and(|r| r.as_object().is_some_and(|m| !m.is_empty()))
            || c.pointer("/resources/limits")
                .is_some_and(|r| r.as_object().is_some_and(|m| !m.is_empty()))
    });
    if !has_any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = c.pointer(&format!("/resources/limits/{r}"));
            let request = c.pointer(&format!("/resources/requests/{r}")).or(limit);
            limit.is_some() && limit == request
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Every field problem of `obj` (empty when valid).
pub fn validate(res: &Resource, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let dns_label = matches!(res.plural, "namespaces" | "services");
    if name.is_empty() {
        causes.push(Cause::new(
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    } else if let Err(why) = if dns_label {
        check_dns_label(name)
    } else {
        check_dns_subdomain(name)
    } {
        causes.push(Cause::new(
            "metadata.name",
            format!("Invalid value: {name:?}: {why}"),
        ));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let v = v.as_str().unwrap_or("");
            if let Err(why) = check_label_value(v) {
                causes.push(Cause::new(
                    format!("metadata.labels[{k}]"),
                    format!("Invalid value: {v:?}: {why}"),
                ));
            }
        }
    }
    if let Err(e) = res.check_type(obj) {
        causes.push(Cause::new(
            "",
            format!(
                "{} does not match the {} schema: {e}",
                res.kind,
                res.api_version()
            ),
        ));
        return causes;
    }
    match res.plural {
        "pods" => pod_spec_checks(&obj["spec"], "spec", &mut causes),
        "deployments" | "replicasets" => {
            let sel = &obj["spec"]["selector"];
            if !sel.is_object() {
                causes.push(Cause::new("spec.selector", "Required value"));
            } else {
                let s = LabelSelector::from_object(sel);
                if s.is_empty() {
                    causes.push(Cause::new(
                        "spec.selector",
                        "Invalid value: empty selector is invalid",
                    ));
                }
                let tmpl = json!({"metadata": {"labels": obj.pointer("/spec/template/metadata/labels").cloned().unwrap_or(json!({}))}});
                if !s.matches(&tmpl) {
                    causes.push(Cause::new(
                        "spec.template.metadata.labels",
                        "Invalid value: `selector` does not match template `labels`",
                    ));
                }
            }
            if obj["spec"]["replicas"].as_i64().is_some_and(|r| r < 0) {
                causes.push(Cause::new(
                    "spec.replicas",
                    "Invalid value: must be greater than or equal to 0",
                ));
            }
            pod_spec_checks(
                &obj["spec"]["template"]["spec"],
                "spec.template.spec",
                &mut causes,
            );
        }
        "services" => {
            let ty = obj["spec"]["type"].as_str().unwrap_or("ClusterIP");
            if !matches!(
                ty,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                causes.push(Cause::new(
                    "spec.type",
                    format!("Unsupported value: {ty:?}"),
                ));
            }
            let ports = obj["spec"]["ports"].as_array().cloned().unwrap_or_default();
            let headless = obj["spec"]["clusterIP"] == "None";
            if ports.is_empty() && ty != "ExternalName" && !headless {
                causes.push(Cause::new("spec.ports", "Required value"));
            }
            for (i, p) in ports.iter().enumerate() {
                let port = p["port"].as_i64().unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    causes.push(Cause::new(
                        format!("spec.ports[{i}].port"),
                        format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
                    ));
                }
                if ports.len() > 1 && p["name"].as_str().unwrap_or("").is_empty() {
                    causes.push(Cause::new(
                        format!("spec.ports[{i}].name"),
                        "Required value",
                    ));
                }
            }
        }
        _ => {}
    }
    causes
}

fn pod_spec_checks(spec: &Value, at: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    if containers.is_empty() {
        causes.push(Cause::new(format!("{at}.containers"), "Required value"));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c["name"].as_str().unwrap_or("");
        if let Err(why) = check_dns_label(name) {
            causes.push(Cause::new(
                format!("{at}.containers[{i}].name"),
                format!("Invalid value: {name:?}: {why}"),
            ));
        } else if !seen.insert(name.to_string()) {
            causes.push(Cause::new(
                format!("{at}.containers[{i}].name"),
                format!("Duplicate value: {name:?}"),
            ));
        }
        if c["image"].as_str().unwrap_or("").trim().is_empty() {
            causes.push(Cause::new(
                format!("{at}.containers[{i}].image"),
                "Required value",
            ));
        }
    }
    if let Some(p) = spec["restartPolicy"].as_str()
        && !matches!(p, "Always" | "OnFailure" | "Never")
    {
        causes.push(Cause::new(
            format!("{at}.restartPolicy"),
            format!("Unsupported value: {p:?}"),
        ));
    }
}

/// RFC 1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into())
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if s.split('.').all(|l| check_dns_label(l).is_ok()) {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into())
    }
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err("a valid label must be an empty string or at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::lookup;

    #[test]
    fn pod_defaults_and_status() {
        let pods = lookup("", "v1", "pods").unwrap();
        let mut p = json!({"metadata": {"name": "a"}, "spec": {"containers": [
            {"name": "c", "image": "busybox", "ports": [{"containerPort": 80}]},
            {"name": "d", "image": "nginx:1.25"}]}});
        apply_defaults(pods, &mut p);
        initial_status(pods, &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            p["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(
            p["status"],
            json!({"phase": "Pending", "qosClass": "BestEffort"})
        );
        assert!(validate(pods, &p).is_empty());
    }

    #[test]
    fn invalid_pods_list_every_field() {
        let pods = lookup("", "v1", "pods").unwrap();
        let p = json!({"metadata": {"name": "Bad_Name"}, "spec": {"containers": [
            {"name": "c", "image": ""}, {"name": "c", "image": "x"}]}});
        let fields: Vec<String> = validate(pods, &p).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "metadata.name",
                "spec.containers[0].image",
                "spec.containers[1].name"
            ]
        );
        let p = json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": 5}]}});
        assert!(validate(pods, &p)[0].message.contains("does not match"));
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let d = lookup("apps", "v1", "deployments").unwrap();
        let mut o = json!({"metadata": {"name": "web"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
        apply_defaults(d, &mut o);
        assert_eq!(o["spec"]["replicas"], 1);
        assert_eq!(o["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let causes = validate(d, &o);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn qos_classes() {
        assert_eq!(
            qos_class(
                &json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]})
            ),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]})),
            "Burstable"
        );
    }
}
