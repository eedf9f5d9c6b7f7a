//! Pod networking through CNI plugins: keel-runtime's [`PodNetwork`] hook, implemented by
//! executing the plugins of the node's network (the first config of `--cni-conf-dir`) from
//! `--cni-bin-dir` as the CNI spec says: the operation in the environment (`CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH`, `CNI_ARGS` with kubelet's
//! `K8S_POD_*` keys), the plugin's config on stdin, the result (or an error object) on stdout.
//!
//! ADD runs the chain in order, each plugin after the first getting the previous result as
//! `prevResult`; a failure DELs the whole chain (best effort) so nothing is left half set up.
//! The result's IPs become the pod's; the conflist and the result are stored as the pod's
//! network `details`, so DEL (every plugin in reverse, with `prevResult`) runs against the
//! config the pod was set up with even if the conf dir changed since. Port mappings go to the
//! plugins that declare the `portMappings` capability as `runtimeConfig.portMappings`.
//!
//! Written by hand: the maintained CNI libraries are Go (libcni); the exec protocol is a
//! process spawn and two JSON documents. Building the per-plugin config and reading the result
//! are pure functions ([`plugin_config`], [`result_ips`], [`cni_args`]).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keel_runtime::pod::{NetworkError, PodIps, PodNetwork, PodRecord, PortMapping, Protocol};
use serde_json::{Value, json};

/// Why a plugin failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CniError {
    #[error("CNI plugin {plugin} ({path}): {op}: {reason}")]
    Exec {
        plugin: String,
        path: PathBuf,
        op: &'static str,
        reason: String,
    },
    #[error("CNI plugin {plugin} {op} failed (code {code}): {msg}")]
    Plugin {
        plugin: String,
        op: &'static str,
        code: u64,
        msg: String,
    },
    #[error("CNI network details of pod {pod}: {reason}")]
    Details { pod: String, reason: String },
}

/// The interface CNI puts in the pod (kubelet's and containerd's default).
pub(crate) const IFNAME: &str = "eth0";

/// How long one plugin execution may take before it is killed: a hung plugin must not hold
/// its pod's lock (and kubelet's RunPodSandbox) forever. kubelet's own RPC timeout is 4 min.
pub(crate) const PLUGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits for `child`, reading its stdout and stderr meanwhile; kills it after `timeout`.
fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: std::time::Duration,
) -> Result<std::process::Output, String> {
    use std::io::Read;
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                // A read error leaves what was read; the exit status tells the rest.
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}s; killed", timeout.as_secs()));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs the plugins of one network. For setup it needs the network (`list`); teardown uses the
/// list stored in the pod's network details.
#[derive(Clone, Debug)]
pub(crate) struct CniExec {
    pub bin_dir: PathBuf,
    /// The conflist to set pods up with; `None` for an instance that only tears down.
    pub list: Option<Value>,
}

/// `CNI_ARGS` as kubelet's CNI runtimes pass it.
pub(crate) fn cni_args(pod: &PodRecord) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.config.namespace,
        crate::pod_convert::cri_name(pod),
        pod.id,
        pod.config.uid
    )
}

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The port mappings as the `portMappings` capability spells them.
pub(crate) fn port_mappings(ports: &[PortMapping]) -> Value {
    Value::Array(
        ports
            .iter()
            .filter(|p| p.host_port != 0)
            .map(|p| {
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": protocol(p.protocol),
                });
                if !p.host_ip.is_empty() {
                    m["hostIP"] = json!(p.host_ip);
                }
                m
            })
            .collect(),
    )
}

/// The config plugin `index` of `list` gets on stdin: the plugin's object with the list's
/// `name` and `cniVersion`, `prevResult` when there is one, and `runtimeConfig` for the
/// capabilities it declares.
pub(crate) fn plugin_config(
    list: &Value,
    index: usize,
    prev_result: Option<&Value>,
    ports: &[PortMapping],
) -> Value {
    let mut conf = list["plugins"][index].clone();
    if !conf.is_object() {
        conf = json!({});
    }
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list
        .get("cniVersion")
        .cloned()
        .unwrap_or_else(|| json!("1.0.0"));
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev.clone();
    }
    let wants_ports = conf["capabilities"]["portMappings"].as_bool() == Some(true);
    let mappings = port_mappings(ports);
    if wants_ports && mappings.as_array().is_some_and(|m| !m.is_empty()) {
        conf["runtimeConfig"] = json!({ "portMappings": mappings });
    }
    conf
}

/// The pod addresses of a CNI result (`ips[].address`, CIDR form), IPv4 first as containerd
/// orders them (the first is the pod's primary IP).
pub(crate) fn result_ips(result: &Value) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next())
        .filter_map(|a| a.parse().ok())
        .collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips
}

fn plugin_type(list: &Value, index: usize) -> String {
    list["plugins"][index]["type"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

impl CniExec {
    /// Runs one plugin; the parsed stdout on success.
    fn invoke(
        &self,
        op: &'static str,
        plugin: &str,
        pod: &PodRecord,
        netns: &Path,
        conf: &Value,
    ) -> Result<Value, CniError> {
        self.run_plugin(op, plugin, Some((pod, netns)), conf)
    }

    /// STATUS (CNI 1.1) of every plugin of `list`, in chain order: the first that says it
    /// cannot serve ADD is the error. A list older than 1.1.0 has no STATUS: ready.
    pub(crate) fn status(&self, list: &Value) -> Result<(), CniError> {
        let version = list["cniVersion"].as_str().unwrap_or("1.0.0");
        if !version_at_least(version, (1, 1)) {
            return Ok(());
        }
        let n = list["plugins"].as_array().map_or(0, Vec::len);
        for i in 0..n {
            let conf = plugin_config(list, i, None, &[]);
            self.run_plugin("STATUS", &plugin_type(list, i), None, &conf)?;
        }
        Ok(())
    }

    /// Runs one plugin for `op`, about `pod` in `netns` when there is one (not for STATUS).
    fn run_plugin(
        &self,
        op: &'static str,
        plugin: &str,
        target: Option<(&PodRecord, &Path)>,
        conf: &Value,
    ) -> Result<Value, CniError> {
        let path = self.bin_dir.join(plugin);
        let fail = |op: &'static str, reason: String| CniError::Exec {
            plugin: plugin.to_owned(),
            path: path.clone(),
            op,
            reason,
        };
        if plugin.is_empty() || plugin.contains('/') {
            return Err(fail("find", format!("invalid plugin type {plugin:?}")));
        }
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", op)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((pod, netns)) = target {
            cmd.env("CNI_CONTAINERID", &pod.id)
                .env("CNI_IFNAME", IFNAME)
                .env("CNI_ARGS", cni_args(pod));
            // DEL of a pod whose pin is gone (after a reboot) must still release the addresses.
            if op == "ADD" || netns.exists() {
                cmd.env("CNI_NETNS", netns);
            }
        }
        let mut child = cmd.spawn().map_err(|e| fail("spawn", e.to_string()))?;
        let input = conf.to_string();
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit without reading stdin; its exit status tells.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = wait_with_timeout(child, PLUGIN_TIMEOUT).map_err(|e| fail("wait", e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        if !out.status.success() {
            let (code, msg) = match &parsed {
                Some(v) => (
                    v["code"].as_u64().unwrap_or(0),
                    format!(
                        "{}{}",
                        v["msg"].as_str().unwrap_or(""),
                        v["details"]
                            .as_str()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    ),
                ),
                None => (
                    0,
                    format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ),
            };
            return Err(CniError::Plugin {
                plugin: plugin.to_owned(),
                op,
                code,
                msg,
            });
        }
        // DEL and STATUS print nothing on success.
        if op == "DEL" || op == "STATUS" {
            return Ok(Value::Null);
        }
        parsed.ok_or_else(|| fail("read result", format!("not JSON: {stdout:?}")))
    }

    /// DEL of every plugin of `list`, last first, each with `prev_result`.
    fn del_all(
        &self,
        list: &Value,
        pod: &PodRecord,
        netns: &Path,
        prev_result: Option<&Value>,
    ) -> Result<(), CniError> {
        let n = list["plugins"].as_array().map_or(0, Vec::len);
        let mut first_err = None;
        for i in (0..n).rev() {
            let conf = plugin_config(list, i, prev_result, &pod.config.port_mappings);
            if let Err(e) = self.invoke("DEL", &plugin_type(list, i), pod, netns, &conf) {
                tracing::warn!(pod = %pod.id, error = %e, "CNI DEL");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl PodNetwork for CniExec {
    fn setup(&self, pod: &PodRecord, netns: &Path) -> Result<PodIps, NetworkError> {
        let list = self.list.as_ref().ok_or_else(|| CniError::Details {
            pod: pod.id.clone(),
            reason: "no CNI network configured".into(),
        })?;
        let n = list["plugins"].as_array().map_or(0, Vec::len);
        let mut prev: Option<Value> = None;
        for i in 0..n {
            let conf = plugin_config(list, i, prev.as_ref(), &pod.config.port_mappings);
            match self.invoke("ADD", &plugin_type(list, i), pod, netns, &conf) {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    if let Err(del) = self.del_all(list, pod, netns, prev.as_ref()) {
                        tracing::warn!(pod = %pod.id, error = %del, "CNI DEL after a failed ADD");
                    }
                    return Err(e.into());
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        tracing::debug!(pod = %pod.id, %result, "CNI ADD");
        Ok(PodIps {
            ips: result_ips(&result),
            details: json!({ "network": list, "result": result }),
        })
    }

    fn teardown(&self, pod: &PodRecord, netns: &Path) -> Result<(), NetworkError> {
        let details = &pod.network.details;
        let list = match (&details["network"], &self.list) {
            (Value::Object(_), _) => &details["network"],
            (_, Some(l)) => l,
            _ => {
                return Err(CniError::Details {
                    pod: pod.id.clone(),
                    reason: "no stored network and no CNI network configured".into(),
                }
                .into());
            }
        };
        let prev = details.get("result").filter(|r| r.is_object());
        Ok(self.del_all(list, pod, netns, prev)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "keel",
            "plugins": [
                {"type": "keel-cni", "bridge": "kbr0"},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        })
    }

    fn ports() -> Vec<PortMapping> {
        vec![
            PortMapping {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 8080,
                host_ip: String::new(),
            },
            // No host port: nothing to publish.
            PortMapping {
                protocol: Protocol::Udp,
                container_port: 53,
                host_port: 0,
                host_ip: String::new(),
            },
        ]
    }

    #[test]
    fn plugins_get_the_list_name_version_and_prev_result() {
        let first = plugin_config(&list(), 0, None, &ports());
        assert_eq!(first["name"], "keel");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["bridge"], "kbr0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none(), "no capability");
        let prev = json!({"ips": [{"address": "10.1.0.2/24"}]});
        let second = plugin_config(&list(), 1, Some(&prev), &ports());
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
        );
        let no_ports = plugin_config(&list(), 1, Some(&prev), &[]);
        assert!(no_ports.get("runtimeConfig").is_none());
    }

    #[test]
    fn cni_args_carry_kubelets_keys() {
        let mut config = keel_runtime::pod::PodConfig {
            name: "web_default_u1_0".into(),
            namespace: "default".into(),
            uid: "u1".into(),
            ..Default::default()
        };
        config
            .annotations
            .insert(crate::pod_convert::POD_NAME_KEY.into(), "web".into());
        let rec = PodRecord {
            id: "abc".into(),
            config,
            created_at: chrono::Utc::now(),
            state: keel_runtime::pod::PodState::Creating,
            hostname: "web".into(),
            cgroup_parent: "keel/pod-abc".into(),
            namespaces: Default::default(),
            keeper: None,
            shm: None,
            network: Default::default(),
            network_ready: false,
            stopped_at: None,
        };
        assert_eq!(
            cni_args(&rec),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1"
        );
    }

    #[test]
    fn a_hung_plugin_is_killed_and_a_quick_one_answers() {
        let quick = Command::new("sh")
            .args(["-c", "echo out; echo err >&2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_timeout(quick, std::time::Duration::from_secs(10)).unwrap();
        assert!(out.status.success());
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        let hung = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let e = wait_with_timeout(hung, std::time::Duration::from_millis(100)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn result_ips_put_ipv4_first() {
        let r = json!({"ips": [
            {"address": "fd00::2/64"},
            {"address": "10.1.0.2/24"},
            {"address": "garbage"},
        ]});
        let ips = result_ips(&r);
        assert_eq!(
            ips,
            vec![
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert!(result_ips(&Value::Null).is_empty());
    }
}

/// Whether CNI version `v` (`MAJOR.MINOR.PATCH`) is at least `min` (major, minor).
fn version_at_least(v: &str, min: (u32, u32)) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= min
}

#[cfg(test)]
mod status_tests {
    #[test]
    fn status_is_for_1_1_and_later() {
        assert!(super::version_at_least("1.1.0", (1, 1)));
        assert!(super::version_at_least("2.0.0", (1, 1)));
        assert!(!super::version_at_least("1.0.0", (1, 1)));
        assert!(!super::version_at_least("0.4.0", (1, 1)));
    }
}
