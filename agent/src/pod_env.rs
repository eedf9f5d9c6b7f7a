//! Pure: a container's environment as kubelet builds it: `envFrom` (ConfigMaps and Secrets,
//! with their prefix) first, then `env` in order (overriding), values with `value`,
//! `valueFrom.fieldRef` (pod metadata, node, IPs), `configMapKeyRef` and `secretKeyRef`
//! (`optional` honoured), and `$(VAR)` references to variables defined before expanded (`$$`
//! escapes). The caller fetches the ConfigMaps and Secrets the container names
//! ([`referenced`]) and passes them in.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};

/// The objects and facts the environment is made from.
#[derive(Debug, Default)]
pub(crate) struct EnvSources {
    /// ConfigMap data by name (absent: the ConfigMap does not exist).
    pub config_maps: HashMap<String, BTreeMap<String, String>>,
    /// Secret data by name, decoded.
    pub secrets: HashMap<String, BTreeMap<String, String>>,
    pub pod_ip: Option<String>,
    pub host_ip: String,
}

/// The ConfigMaps and Secrets `c` reads: (config maps, secrets).
pub(crate) fn referenced(c: &Container) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for f in c.env_from.iter().flatten() {
        if let Some(r) = &f.config_map_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &f.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for e in c.env.iter().flatten() {
        let Some(v) = &e.value_from else { continue };
        if let Some(r) = &v.config_map_key_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &v.secret_key_ref {
            secrets.push(r.name.clone());
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// The value of a `fieldRef` path.
fn field(pod: &Pod, path: &str, src: &EnvSources) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    if let Some(v) = keyed("metadata.labels", &meta.labels) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations", &meta.annotations) {
        return Ok(v);
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => src.host_ip.clone(),
        "status.podIP" | "status.podIPs" => src.pod_ip.clone().unwrap_or_default(),
        other => return Err(format!("fieldRef {other:?} is not supported")),
    })
}

/// Expands `$(NAME)` from `vars` (unknown references stay as written; `$$` is a `$`).
pub(crate) fn expand(s: &str, vars: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The environment of `c`, in order; the error names what is missing or unsupported.
pub(crate) fn container_env(
    pod: &Pod,
    c: &Container,
    src: &EnvSources,
) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>, k: String, v: String| match out
        .iter_mut()
        .find(|(name, _)| *name == k)
    {
        Some(e) => e.1 = v,
        None => out.push((k, v)),
    };
    for f in c.env_from.iter().flatten() {
        let prefix = f.prefix.clone().unwrap_or_default();
        let (data, what, name, optional) = if let Some(r) = &f.config_map_ref {
            (
                src.config_maps.get(&r.name),
                "configmap",
                &r.name,
                r.optional,
            )
        } else if let Some(r) = &f.secret_ref {
            (src.secrets.get(&r.name), "secret", &r.name, r.optional)
        } else {
            continue;
        };
        match data {
            Some(d) => {
                for (k, v) in d {
                    set(&mut out, format!("{prefix}{k}"), v.clone());
                }
            }
            None if optional == Some(true) => {}
            None => return Err(format!("{what} \"{name}\" not found")),
        }
    }
    for e in c.env.iter().flatten() {
        let value = match &e.value_from {
            None => {
                let known = out.clone();
                let lookup = |n: &str| known.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                expand(e.value.as_deref().unwrap_or_default(), &lookup)
            }
            Some(v) => {
                if let Some(f) = &v.field_ref {
                    field(pod, &f.field_path, src)?
                } else if let Some(r) = &v.config_map_key_ref {
                    match src.config_maps.get(&r.name).and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in configmap {}/{} (env {})",
                                r.key,
                                pod.metadata.namespace.as_deref().unwrap_or_default(),
                                r.name,
                                e.name
                            ));
                        }
                    }
                } else if let Some(r) = &v.secret_key_ref {
                    match src.secrets.get(&r.name).and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in secret {}/{} (env {})",
                                r.key,
                                pod.metadata.namespace.as_deref().unwrap_or_default(),
                                r.name,
                                e.name
                            ));
                        }
                    }
                } else {
                    return Err(format!(
                        "env {}: resourceFieldRef is not supported yet",
                        e.name
                    ));
                }
            }
        };
        set(&mut out, e.name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "prod", "uid": "u1",
                         "labels": {"app": "web"}, "annotations": {"team": "core"}},
            "spec": {"nodeName": "n1", "containers": [{
                "name": "c", "image": "busybox",
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                            {"secretRef": {"name": "gone", "optional": true}}],
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "B", "value": "$(A)-$(NOPE)-$$(A)"},
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['team']"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                    {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "x", "optional": true}}},
                    {"name": "CFG_mode", "value": "overridden"}
                ]
            }]}
        }))
        .unwrap()
    }

    fn sources() -> EnvSources {
        EnvSources {
            config_maps: HashMap::from([(
                "cfg".to_string(),
                BTreeMap::from([("mode".to_string(), "fast".to_string())]),
            )]),
            secrets: HashMap::from([(
                "creds".to_string(),
                BTreeMap::from([("password".to_string(), "s3cret".to_string())]),
            )]),
            pod_ip: Some("10.42.0.7".into()),
            host_ip: "10.0.0.1".into(),
        }
    }

    #[test]
    fn env_is_built_like_kubelets() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            referenced(c),
            (
                vec!["cfg".to_string()],
                vec!["creds".to_string(), "gone".to_string()]
            )
        );
        let env = container_env(&p, c, &sources()).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(env[0], ("CFG_mode".to_string(), "overridden".to_string()));
        assert_eq!(get("B"), Some("1-$(NOPE)-$(A)"));
        assert_eq!(get("NAME"), Some("web"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("TEAM"), Some("core"));
        assert_eq!(get("IP"), Some("10.42.0.7"));
        assert_eq!(get("NODE"), Some("n1"));
        assert_eq!(get("MODE"), Some("fast"));
        assert_eq!(get("PW"), Some("s3cret"));
        assert_eq!(get("OPT"), None);
    }

    #[test]
    fn missing_sources_are_named() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let mut src = sources();
        src.secrets.clear();
        let e = container_env(&p, c, &src).unwrap_err();
        assert!(e.contains("secret prod/creds") && e.contains("PW"), "{e}");
        src.config_maps.clear();
        let e = container_env(&p, c, &src).unwrap_err();
        assert_eq!(e, "configmap \"cfg\" not found");
    }
}
