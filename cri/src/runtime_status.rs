//! Status: the two conditions kubelet requires. RuntimeReady is true once the server runs (the
//! pod and container state is on disk and read on every RPC, nothing to warm up). NetworkReady
//! reflects the CNI conf dir, read again on every call (kubelet asks every few seconds; reading
//! one small file is cheaper than watching the dir), and for a 1.1.0+ network its plugins'
//! STATUS (a plugin that cannot serve ADD, e.g. keel-cni with a full range, makes it false).
//!
//! With `verbose`, `info` holds JSON like containerd's: `config` (keel's CRI settings, never
//! registry credentials), `cniconfig` (dirs, the loaded network, whether each plugin binary is
//! in the bin dir) and `lastCNILoadStatus`.

use std::collections::HashMap;

use serde_json::json;

use crate::cni_config::{self, CniConfigError, CniNetwork};
use crate::cni_exec::{CniError, CniExec};
use crate::service::{CriService, Settings};
use crate::{CriError, api};

pub(crate) const NETWORK_NOT_READY_REASON: &str = "NetworkPluginNotReady";

pub(crate) async fn status(
    svc: &CriService,
    req: api::StatusRequest,
) -> Result<api::StatusResponse, CriError> {
    let settings = svc.settings.clone();
    let pod_cidrs = svc.pod_cidrs();
    let verbose = req.verbose;
    tokio::task::spawn_blocking(move || {
        let network = cni_config::load(&settings.cni_conf_dir);
        let plugins = network.as_ref().ok().map(|n| {
            CniExec {
                bin_dir: settings.cni_bin_dir.clone(),
                list: None,
            }
            .status(&n.list)
        });
        let info = if verbose {
            verbose_info(&settings, &network, &pod_cidrs)
        } else {
            HashMap::new()
        };
        Ok(status_response(&network, plugins, info))
    })
    .await?
}

fn status_response(
    network: &Result<CniNetwork, CniConfigError>,
    plugins: Option<Result<(), CniError>>,
    info: HashMap<String, String>,
) -> api::StatusResponse {
    let runtime = api::RuntimeCondition {
        r#type: "RuntimeReady".to_owned(),
        status: true,
        reason: String::new(),
        message: String::new(),
    };
    let network = match (network, plugins) {
        (Ok(_), Some(Err(e))) => api::RuntimeCondition {
            r#type: "NetworkReady".to_owned(),
            status: false,
            reason: NETWORK_NOT_READY_REASON.to_owned(),
            message: format!("Network plugin returns error: {e}"),
        },
        (Ok(_), _) => api::RuntimeCondition {
            r#type: "NetworkReady".to_owned(),
            status: true,
            reason: String::new(),
            message: String::new(),
        },
        (Err(e), _) => api::RuntimeCondition {
            r#type: "NetworkReady".to_owned(),
            status: false,
            reason: NETWORK_NOT_READY_REASON.to_owned(),
            message: format!("Network plugin returns error: {e}"),
        },
    };
    api::StatusResponse {
        status: Some(api::RuntimeStatus {
            conditions: vec![runtime, network],
        }),
        info,
        runtime_handlers: vec![api::RuntimeHandler {
            name: String::new(),
            features: Some(api::RuntimeHandlerFeatures {
                recursive_read_only_mounts: false,
                user_namespaces: false,
            }),
        }],
        features: Some(api::RuntimeFeatures {
            supplemental_groups_policy: false,
        }),
    }
}

fn verbose_info(
    settings: &Settings,
    network: &Result<CniNetwork, CniConfigError>,
    pod_cidrs: &[String],
) -> HashMap<String, String> {
    let config = json!({
        "root": settings.root,
        "socket": settings.socket,
        "cniConfDir": settings.cni_conf_dir,
        "cniBinDir": settings.cni_bin_dir,
        "metricsAddress": settings.metrics_address.map(|a| a.to_string()),
        "insecureRegistries": settings.registry.insecure,
        "registryMirrors": settings.registry.mirrors,
        "registriesWithCredentials": settings.registry.auths.keys().collect::<Vec<_>>(),
        "podCIDRs": pod_cidrs,
    });
    let network_json = match network {
        Ok(n) => json!({
            "file": n.file,
            "name": n.name,
            "plugins": n.plugins.iter().map(|p| {
                let binary = settings.cni_bin_dir.join(p);
                json!({ "type": p, "binary": binary, "found": binary.is_file() })
            }).collect::<Vec<_>>(),
        }),
        Err(_) => serde_json::Value::Null,
    };
    let cni = json!({
        "pluginConfDir": settings.cni_conf_dir,
        "pluginDirs": [settings.cni_bin_dir],
        "network": network_json,
    });
    let load_status = match network {
        Ok(_) => "OK".to_owned(),
        Err(e) => e.to_string(),
    };
    HashMap::from([
        ("config".to_owned(), config.to_string()),
        ("cniconfig".to_owned(), cni.to_string()),
        (
            "lastCNILoadStatus".to_owned(),
            serde_json::Value::String(load_status).to_string(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use keel_runtime::image::{Credentials, RegistryOptions};

    use super::*;

    fn settings() -> Settings {
        let mut registry = RegistryOptions::default();
        registry.insecure.push("127.0.0.1:5000".into());
        registry.auths.insert(
            "r.example".into(),
            Credentials::Basic {
                username: "u".into(),
                password: "SECRET".into(),
            },
        );
        Settings {
            root: "/var/lib/keel".into(),
            socket: "/run/keel/keel.sock".into(),
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            metrics_address: None,
            registry,
        }
    }

    fn condition<'a>(r: &'a api::StatusResponse, t: &str) -> &'a api::RuntimeCondition {
        r.status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.r#type == t)
            .unwrap()
    }

    #[test]
    fn runtime_is_ready_and_network_follows_the_cni_config() {
        let missing = Err(CniConfigError::NoConfig {
            dir: "/etc/cni/net.d".into(),
        });
        let r = status_response(&missing, None, HashMap::new());
        let rt = condition(&r, "RuntimeReady");
        assert!(rt.status);
        let net = condition(&r, "NetworkReady");
        assert!(!net.status);
        assert_eq!(net.reason, NETWORK_NOT_READY_REASON);
        assert!(net.message.contains("/etc/cni/net.d"), "{}", net.message);

        let ok = Ok(CniNetwork {
            file: PathBuf::from("/etc/cni/net.d/10-keel.conflist"),
            name: "keel".into(),
            plugins: vec!["keel-cni".into()],
            list: serde_json::Value::Null,
        });
        let r = status_response(&ok, Some(Ok(())), HashMap::new());
        assert!(condition(&r, "NetworkReady").status);
        let full = CniError::Plugin {
            plugin: "keel-cni".into(),
            op: "STATUS",
            code: 50,
            msg: "range set 0 is full".into(),
        };
        let r = status_response(&ok, Some(Err(full)), HashMap::new());
        let net = condition(&r, "NetworkReady");
        assert!(
            !net.status && net.message.contains("is full"),
            "{}",
            net.message
        );
    }

    #[test]
    fn verbose_info_is_json_without_credentials() {
        let ok = Ok(CniNetwork {
            file: PathBuf::from("/etc/cni/net.d/10-keel.conflist"),
            name: "keel".into(),
            plugins: vec!["keel-cni".into()],
            list: serde_json::Value::Null,
        });
        let info = verbose_info(&settings(), &ok, &["10.244.0.0/24".to_owned()]);
        let all = format!("{info:?}");
        assert!(!all.contains("SECRET"), "{all}");
        let config: serde_json::Value = serde_json::from_str(&info["config"]).unwrap();
        assert_eq!(config["podCIDRs"][0], "10.244.0.0/24");
        assert_eq!(config["registriesWithCredentials"][0], "r.example");
        let cni: serde_json::Value = serde_json::from_str(&info["cniconfig"]).unwrap();
        assert_eq!(cni["network"]["plugins"][0]["type"], "keel-cni");
        let load: String = serde_json::from_str(&info["lastCNILoadStatus"]).unwrap();
        assert_eq!(load, "OK");
    }
}
