//! A pod's volumes on the node: emptyDir, hostPath, configMap and secret, made under the
//! agent's pod dir (`<pod_dir>/<uid>/volumes/<kind>/<name>`, kubelet's layout) and bind-mounted
//! into the containers that name them (`volumeMounts`: mountPath, readOnly, subPath). ConfigMap
//! and Secret contents are written when a container starts (all keys, or `items`, with
//! `defaultMode`/`mode`); an emptyDir lives as long as the pod. [`remove`] deletes it all once
//! the pod's sandbox is gone.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod};
use keel_cri::api;

/// The ConfigMaps and Secrets the pod's volumes name: (config maps, secrets).
pub(crate) fn referenced(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(cm) = &v.config_map {
            cms.push(cm.name.clone());
        }
        if let Some(s) = &v.secret
            && let Some(n) = &s.secret_name
        {
            secrets.push(n.clone());
        }
    }
    (cms, secrets)
}

/// A relative path that stays inside its directory.
fn safe_relative(p: &str) -> Result<&Path, String> {
    let path = Path::new(p);
    if p.is_empty()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!("path {p:?} must be relative, without '..'"));
    }
    Ok(path)
}

/// Writes `data` (or its `items`) into `dir` with file `mode`s.
fn project(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
    optional: bool,
) -> Result<(), String> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| format!("{p}: {e}")
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files: Vec<(String, &Vec<u8>, u32)> = match items {
        Some(items) => {
            let mut out = Vec::new();
            for it in items {
                match data.get(&it.key) {
                    Some(v) => out.push((
                        it.path.clone(),
                        v,
                        it.mode.map_or(default_mode, |m| m as u32),
                    )),
                    None if optional => {}
                    None => return Err(format!("{what} has no key {:?}", it.key)),
                }
            }
            out
        }
        None => data
            .iter()
            .map(|(k, v)| (k.clone(), v, default_mode))
            .collect(),
    };
    for (rel, bytes, mode) in files {
        let path = dir.join(safe_relative(&rel)?);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = path.with_extension("keel-tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// Makes the pod's volumes under `root/<uid>/volumes`; the host path of each, by volume name.
/// `config_maps` and `secrets` hold the data of the objects that exist.
pub(crate) fn prepare(
    root: &Path,
    pod: &Pod,
    config_maps: &HashMap<String, BTreeMap<String, Vec<u8>>>,
    secrets: &HashMap<String, BTreeMap<String, Vec<u8>>>,
) -> Result<HashMap<String, PathBuf>, String> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    safe_relative(uid).map_err(|e| format!("pod uid: {e}"))?;
    let base = root.join(uid).join("volumes");
    let mut out = HashMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let name = safe_relative(&v.name).map_err(|e| format!("volume name: {e}"))?;
        let path = if v.empty_dir.is_some() {
            let p = base.join("empty-dir").join(name);
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            p
        } else if let Some(h) = &v.host_path {
            let p = PathBuf::from(&h.path);
            let kind = h.type_.as_deref().unwrap_or("");
            let exists = p.exists();
            match kind {
                "" => {}
                "DirectoryOrCreate" => std::fs::create_dir_all(&p)
                    .map_err(|e| format!("hostPath {}: {e}", p.display()))?,
                "FileOrCreate" if !exists => {
                    std::fs::File::create(&p)
                        .map_err(|e| format!("hostPath {}: {e}", p.display()))?;
                }
                "FileOrCreate" => {}
                "Directory" if p.is_dir() => {}
                "File" if p.is_file() => {}
                "Socket" | "CharDevice" | "BlockDevice" if exists => {}
                other => {
                    return Err(format!(
                        "hostPath {} is not a {}",
                        p.display(),
                        if other.is_empty() { "path" } else { other }
                    ));
                }
            }
            p
        } else if let Some(cm) = &v.config_map {
            let p = base.join("configmap").join(name);
            let optional = cm.optional == Some(true);
            match config_maps.get(&cm.name) {
                Some(data) => project(
                    &p,
                    data,
                    cm.items.as_ref(),
                    cm.default_mode.map_or(0o644, |m| m as u32),
                    &format!("configmap {}", cm.name),
                    optional,
                )?,
                None if optional => {
                    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?
                }
                None => return Err(format!("configmap \"{}\" not found", cm.name)),
            }
            p
        } else if let Some(s) = &v.secret {
            let secret = s.secret_name.clone().unwrap_or_default();
            let p = base.join("secret").join(name);
            let optional = s.optional == Some(true);
            match secrets.get(&secret) {
                Some(data) => project(
                    &p,
                    data,
                    s.items.as_ref(),
                    s.default_mode.map_or(0o644, |m| m as u32),
                    &format!("secret {secret}"),
                    optional,
                )?,
                None if optional => {
                    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?
                }
                None => return Err(format!("secret \"{secret}\" not found")),
            }
            p
        } else {
            // Other volume types are not served; a container that mounts one gets an error.
            continue;
        };
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// The CRI mounts of `c`'s volumeMounts.
pub(crate) fn mounts(
    c: &Container,
    vols: &HashMap<String, PathBuf>,
) -> Result<Vec<api::Mount>, String> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(host) = vols.get(&m.name) else {
            return Err(format!(
                "volumeMount {:?}: no such volume, or its type is not supported (emptyDir, \
                 hostPath, configMap, secret)",
                m.name
            ));
        };
        let host_path = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = host.join(safe_relative(sub).map_err(|e| format!("subPath: {e}"))?);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                }
                p
            }
            None => host.clone(),
        };
        out.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host_path.display().to_string(),
            readonly: m.read_only.unwrap_or(false),
            ..Default::default()
        });
    }
    Ok(out)
}

/// Removes what [`prepare`] made for pod `uid` (after its containers are gone).
pub(crate) fn remove(root: &Path, uid: &str) {
    if safe_relative(uid).is_err() {
        return;
    }
    let dir = root.join(uid);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("remove {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volumes_are_made_and_mounted() {
        let root = tempfile::tempdir().unwrap();
        let host = root.path().join("host-dir");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u1"},
            "spec": {
                "volumes": [
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "h", "hostPath": {"path": host, "type": "DirectoryOrCreate"}},
                    {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "a", "path": "sub/a.conf", "mode": 0o600}]}},
                    {"name": "creds", "secret": {"secretName": "s"}},
                    {"name": "opt", "secret": {"secretName": "gone", "optional": true}}
                ],
                "containers": [{"name": "c", "volumeMounts": [
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "cfg", "mountPath": "/etc/app", "readOnly": true},
                    {"name": "h", "mountPath": "/h", "subPath": "x"}
                ]}]
            }
        }))
        .unwrap();
        assert_eq!(
            referenced(&pod),
            (
                vec!["settings".to_string()],
                vec!["s".to_string(), "gone".to_string()]
            )
        );
        let cms = HashMap::from([(
            "settings".to_string(),
            BTreeMap::from([
                ("a".to_string(), b"A".to_vec()),
                ("b".to_string(), b"B".to_vec()),
            ]),
        )]);
        let secrets = HashMap::from([(
            "s".to_string(),
            BTreeMap::from([("password".to_string(), b"pw".to_vec())]),
        )]);
        let vols = prepare(root.path(), &pod, &cms, &secrets).unwrap();
        let cfg = &vols["cfg"];
        assert_eq!(std::fs::read(cfg.join("sub/a.conf")).unwrap(), b"A");
        assert!(!cfg.join("b").exists(), "only the listed items");
        let mode = std::fs::metadata(cfg.join("sub/a.conf"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read(vols["creds"].join("password")).unwrap(),
            b"pw"
        );
        assert!(host.is_dir());
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let m = mounts(c, &vols).unwrap();
        assert_eq!(m.len(), 3);
        assert!(m[1].readonly && m[1].container_path == "/etc/app");
        assert_eq!(m[2].host_path, host.join("x").display().to_string());
        remove(root.path(), "u1");
        assert!(!root.path().join("u1").exists());
    }

    #[test]
    fn bad_volumes_are_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let pod = |v: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p", "uid": "u1"},
                "spec": {"volumes": [v], "containers": []}}))
            .unwrap()
        };
        let none = HashMap::new();
        let e = prepare(
            root.path(),
            &pod(json!({"name": "c", "configMap": {"name": "missing"}})),
            &none,
            &none,
        )
        .unwrap_err();
        assert_eq!(e, "configmap \"missing\" not found");
        let e = prepare(root.path(), &pod(json!({"name": "h", "hostPath": {"path": "/nonexistent-keel", "type": "Directory"}})), &none, &none)
            .unwrap_err();
        assert!(e.contains("is not a Directory"), "{e}");
        let cms = HashMap::from([(
            "x".to_string(),
            BTreeMap::from([("k".to_string(), b"v".to_vec())]),
        )]);
        let e = prepare(
            root.path(),
            &pod(json!({"name": "c", "configMap": {"name": "x", "items": [{"key": "k", "path": "../escape"}]}})),
            &cms,
            &none,
        )
        .unwrap_err();
        assert!(e.contains("without '..'"), "{e}");
        let c: Container = serde_json::from_value(json!({"name": "c",
            "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}))
        .unwrap();
        assert!(
            mounts(&c, &HashMap::new())
                .unwrap_err()
                .contains("\"nope\"")
        );
    }
}
