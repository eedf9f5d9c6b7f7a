//! Reads the CNI conf dir the way containerd (go-cni + libcni) does, to report the NetworkReady
//! condition: files ending in `.conf`, `.conflist` or `.json`, sorted by name; the first one is
//! the node's network and must be valid, else the network is not ready (containerd does not skip
//! a broken first file either, so a typo shows up in `kubectl describe node`).
//!
//! Valid means what libcni checks when loading: a `.conflist` is an object with a `name` and a
//! non-empty `plugins` array whose entries each have a `type`; a `.conf`/`.json` is one plugin
//! object with a `type`. It only reads files; it never runs a plugin.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why the conf dir does not give a network.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CniConfigError {
    #[error("no network config found in {dir} (*.conf, *.conflist, *.json)")]
    NoConfig { dir: PathBuf },
    #[error("read CNI conf dir {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CNI config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The network the conf dir configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniNetwork {
    pub file: PathBuf,
    pub name: String,
    /// Plugin types in chain order (each is a binary in the CNI bin dir).
    pub plugins: Vec<String>,
    /// The network as a conflist (a `.conf` becomes a list of its one plugin), what
    /// [`crate::cni_exec`] runs.
    pub list: Value,
}

/// Loads the first config file of `dir` (blocking: call it off the async workers).
pub(crate) fn load(dir: &Path) -> Result<CniNetwork, CniConfigError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CniConfigError::NoConfig {
                dir: dir.to_owned(),
            });
        }
        Err(source) => {
            return Err(CniConfigError::ReadDir {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    let Some(file) = files.into_iter().next() else {
        return Err(CniConfigError::NoConfig {
            dir: dir.to_owned(),
        });
    };
    let data = std::fs::read(&file).map_err(|source| CniConfigError::Read {
        path: file.clone(),
        source,
    })?;
    let is_list = file.extension().and_then(|x| x.to_str()) == Some("conflist");
    let (name, plugins) = parse(&data, is_list).map_err(|reason| CniConfigError::Invalid {
        path: file.clone(),
        reason,
    })?;
    // parse() accepted it, so it is a JSON object.
    let v: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
    let list = as_list(v, is_list);
    Ok(CniNetwork {
        file,
        name,
        plugins,
        list,
    })
}

/// A config file's JSON as a conflist: a single plugin config becomes the one plugin of a
/// list with its name and cniVersion (what libcni's `ConfListFromConf` does).
pub(crate) fn as_list(v: Value, is_list: bool) -> Value {
    if is_list {
        return v;
    }
    serde_json::json!({
        "cniVersion": v.get("cniVersion").cloned().unwrap_or(Value::String("1.0.0".into())),
        "name": v.get("name").cloned().unwrap_or(Value::String(String::new())),
        "plugins": [v],
    })
}

/// The network name and plugin types of one config file's bytes.
fn parse(data: &[u8], is_list: bool) -> Result<(String, Vec<String>), String> {
    let v: Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".to_owned());
    }
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    if !is_list {
        return Ok((name.to_owned(), vec![plugin_type(&v, "")?]));
    }
    if name.is_empty() {
        return Err("no \"name\"".to_owned());
    }
    let plugins = v
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or("no \"plugins\" array")?;
    if plugins.is_empty() {
        return Err("\"plugins\" is empty".to_owned());
    }
    let types = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| plugin_type(p, &format!("plugins[{i}]: ")))
        .collect::<Result<_, _>>()?;
    Ok((name.to_owned(), types))
}

fn plugin_type(plugin: &Value, at: &str) -> Result<String, String> {
    match plugin.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Ok(t.to_owned()),
        _ => Err(format!("{at}missing \"type\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflist_needs_a_name_and_typed_plugins() {
        let ok = br#"{"cniVersion":"1.1.0","name":"keel","plugins":[{"type":"keel-cni"},{"type":"portmap"}]}"#;
        assert_eq!(
            parse(ok, true).unwrap(),
            (
                "keel".to_owned(),
                vec!["keel-cni".to_owned(), "portmap".to_owned()]
            )
        );
        assert!(
            parse(br#"{"plugins":[{"type":"x"}]}"#, true)
                .unwrap_err()
                .contains("name")
        );
        assert!(
            parse(br#"{"name":"n","plugins":[]}"#, true)
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            parse(br#"{"name":"n","plugins":[{}]}"#, true)
                .unwrap_err()
                .contains("plugins[0]")
        );
        assert!(parse(b"{", true).unwrap_err().contains("JSON"));
        assert!(parse(b"[]", false).is_err());
    }

    #[test]
    fn a_conf_is_one_typed_plugin() {
        assert_eq!(
            parse(br#"{"name":"br","type":"bridge"}"#, false).unwrap(),
            ("br".to_owned(), vec!["bridge".to_owned()])
        );
        assert!(parse(br#"{"name":"br"}"#, false).is_err());
        let list = as_list(
            serde_json::json!({"cniVersion":"0.4.0","name":"br","type":"bridge"}),
            false,
        );
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "br");
    }

    #[test]
    fn the_first_file_by_name_decides() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&dir.path().join("missing")),
            Err(CniConfigError::NoConfig { .. })
        ));
        assert!(matches!(
            load(dir.path()),
            Err(CniConfigError::NoConfig { .. })
        ));
        std::fs::write(dir.path().join("README.md"), "not a config").unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(CniConfigError::NoConfig { .. })
        ));
        std::fs::write(
            dir.path().join("20-keel.conflist"),
            r#"{"name":"keel","plugins":[{"type":"keel-cni"}]}"#,
        )
        .unwrap();
        assert_eq!(load(dir.path()).unwrap().name, "keel");
        std::fs::write(dir.path().join("10-broken.conf"), "{}").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("10-broken.conf") && e.contains("type"), "{e}");
    }
}
