//! The pods bound to this node: a kube-rs watcher (fieldSelector `spec.nodeName=<node>`) feeds
//! a reflector store; a sync pass (on every watch event, and every `sync_interval` to see
//! container exits) reconciles each pod to the CRI and writes its status, finishes the
//! deletes the API server left to the node, and tears down sandboxes whose pod is gone.
//!
//! Nothing about sandboxes or containers is cached: each pass lists them from the CRI and
//! links them to pods by the pod uid label, so a restarted agent adopts what it finds. The
//! only memory is the last status written per pod (to skip unchanged writes).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerState, ContainerStateWaiting, Pod, PodStatus, Secret,
};
use k8s_openapi::jiff::Timestamp;
use keel_cri::api;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Notify;

use crate::pod_env::{self, EnvSources};
use crate::pod_spec::{self, DnsSettings, LABEL_CONTAINER_NAME, LABEL_POD_UID};
use crate::pod_status::{self, Observed, SandboxView};
use crate::probes::Probers;
use crate::volumes;
use crate::{AgentConfig, AgentError, Cri, api_err, cri_err};

/// Runs the watcher and the sync loop; returns only if the watcher stream ends.
pub(crate) async fn run(
    client: kube::Client,
    cri: Cri,
    config: AgentConfig,
    node_ip: IpAddr,
) -> Result<(), AgentError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let notify = Arc::new(Notify::new());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));
    let stream = watcher(pods, wc).default_backoff().reflect(writer);
    let events = notify.clone();
    let watch = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!("pod watch: {e}");
            }
            events.notify_one();
        }
    });
    // Orphan teardown must not run before the first list: it would see no pods at all.
    let _ = reader.wait_until_ready().await;
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut syncer = Syncer {
        client,
        cri,
        dns: DnsSettings {
            cluster_dns: config.cluster_dns,
            cluster_domain: config.cluster_domain.clone(),
            host: pod_spec::parse_resolv_conf(&host),
        },
        config,
        host_ip: node_ip.to_string(),
        written: HashMap::new(),
        probers: Probers::default(),
        running: HashSet::new(),
        stopping: Arc::default(),
        deleting: Arc::default(),
    };
    loop {
        if watch.is_finished() {
            return Ok(());
        }
        if let Err(e) = syncer.sync_all(&reader).await {
            tracing::warn!("pod sync: {e}");
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(syncer.config.sync_interval) => {}
        }
    }
}

struct Syncer {
    client: kube::Client,
    cri: Cri,
    config: AgentConfig,
    dns: DnsSettings,
    host_ip: String,
    /// The last status written, by pod uid.
    written: HashMap<String, PodStatus>,
    /// The probe tasks of running containers.
    probers: Probers,
    /// Running containers seen in this pass (their probers stay).
    running: HashSet<String>,
    /// Containers being stopped after a failed probe.
    stopping: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Pods (uids) whose delete is being finished.
    deleting: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// What syncing one container found.
enum Synced {
    Observed(Box<Observed>),
    /// Its env or volumes cannot be built yet (a missing ConfigMap, say): shown in its status,
    /// retried at the next pass.
    ConfigError(String),
}

/// A container's preStop hook.
#[derive(Debug, Clone)]
enum PreStop {
    Exec(Vec<String>),
    Sleep(i64),
}

impl PreStop {
    fn of(c: &k8s_openapi::api::core::v1::Container) -> Option<PreStop> {
        let h = c.lifecycle.as_ref()?.pre_stop.as_ref()?;
        if let Some(cmd) = h.exec.as_ref().and_then(|e| e.command.clone()) {
            return Some(PreStop::Exec(cmd));
        }
        if h.http_get.is_some() || h.tcp_socket.is_some() {
            tracing::warn!(container = %c.name, "preStop httpGet/tcpSocket hooks are not run");
        }
        h.sleep.as_ref().map(|s| PreStop::Sleep(s.seconds))
    }

    /// Runs the hook in the container, for at most `budget` seconds.
    async fn run(&self, cri: &Cri, id: &str, budget: i64) {
        let budget = budget.max(1);
        match self {
            PreStop::Exec(cmd) => {
                let req = api::ExecSyncRequest {
                    container_id: id.to_owned(),
                    cmd: cmd.clone(),
                    timeout: budget,
                };
                match cri.runtime.clone().exec_sync(req).await {
                    Ok(r) if r.get_ref().exit_code != 0 => tracing::info!(
                        container = id,
                        code = r.get_ref().exit_code,
                        "preStop hook failed"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::info!(container = id, "preStop hook: {e}"),
                }
            }
            PreStop::Sleep(secs) => {
                let secs = (*secs).clamp(0, budget) as u64;
                tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
            }
        }
    }
}

/// Stops the running containers (each after its preStop hook, all within `grace` seconds),
/// then stops and removes the sandboxes.
async fn teardown(
    cri: &Cri,
    sbs: &[api::PodSandbox],
    ctrs: &[api::Container],
    grace: i64,
    hooks: &HashMap<String, PreStop>,
) -> Result<(), AgentError> {
    let started = std::time::Instant::now();
    let stops = ctrs
        .iter()
        .filter(|c| c.state == api::ContainerState::ContainerRunning as i32)
        .map(|c| {
            let hook = c
                .labels
                .get(LABEL_CONTAINER_NAME)
                .and_then(|n| hooks.get(n));
            let mut rt = cri.runtime.clone();
            let id = c.id.clone();
            async move {
                if let Some(h) = hook {
                    h.run(cri, &id, grace).await;
                }
                // What the hook left of the grace period (Kubernetes gives at least 2 s more).
                let left = grace - started.elapsed().as_secs() as i64;
                let timeout = if hook.is_some() { left.max(2) } else { grace };
                rt.stop_container(api::StopContainerRequest {
                    container_id: id,
                    timeout,
                })
                .await
            }
        });
    for r in futures::future::join_all(stops).await {
        r.map_err(cri_err("StopContainer"))?;
    }
    for s in sbs {
        let mut rt = cri.runtime.clone();
        rt.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        })
        .await
        .map_err(cri_err("StopPodSandbox"))?;
        rt.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        })
        .await
        .map_err(cri_err("RemovePodSandbox"))?;
    }
    Ok(())
}

/// ConfigMap or Secret data by object name, then key.
type ObjectData = HashMap<String, BTreeMap<String, Vec<u8>>>;

fn uid_of(labels: &HashMap<String, String>) -> Option<&str> {
    labels.get(LABEL_POD_UID).map(String::as_str)
}

impl Syncer {
    async fn sync_all(&mut self, store: &Store<Pod>) -> Result<(), AgentError> {
        let pods = store.state();
        let sandboxes = self
            .cri
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(cri_err("ListPodSandbox"))?
            .into_inner()
            .items;
        let containers = self
            .cri
            .runtime
            .list_containers(api::ListContainersRequest { filter: None })
            .await
            .map_err(cri_err("ListContainers"))?
            .into_inner()
            .containers;
        let mut by_uid: HashMap<String, (Vec<api::PodSandbox>, Vec<api::Container>)> =
            HashMap::new();
        for s in sandboxes {
            if let Some(uid) = uid_of(&s.labels) {
                by_uid.entry(uid.to_owned()).or_default().0.push(s);
            }
        }
        for c in containers {
            if let Some(uid) = uid_of(&c.labels) {
                by_uid.entry(uid.to_owned()).or_default().1.push(c);
            }
        }
        let mut known = HashSet::new();
        self.running.clear();
        for pod in pods.iter() {
            let k = pod_spec::key(pod);
            known.insert(k.uid.clone());
            let (sbs, ctrs) = by_uid.remove(&k.uid).unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                self.finish_delete(pod, &sbs, &ctrs);
                continue;
            }
            if let Err(e) = self.sync_pod(pod, &sbs, &ctrs).await {
                tracing::warn!(pod = %format!("{}/{}", k.namespace, k.name), "{e}");
            }
        }
        // Sandboxes of pods the API no longer has.
        for (uid, (sbs, ctrs)) in by_uid {
            tracing::info!(
                uid,
                "tearing down the sandbox of a pod the API no longer has"
            );
            match teardown(&self.cri, &sbs, &ctrs, 0, &HashMap::new()).await {
                Ok(()) => volumes::remove(&self.config.pod_dir, &uid),
                Err(e) => tracing::warn!(uid, "{e}"),
            }
        }
        self.written.retain(|uid, _| known.contains(uid));
        let running = std::mem::take(&mut self.running);
        self.probers.retain(&running);
        Ok(())
    }

    /// The API server marked the pod deleted and left it to the node: in the background (a
    /// long grace period must not hold the other pods' sync), run the containers' preStop
    /// hooks and stop them within the pod's grace period, remove the sandbox and the volumes,
    /// then delete the object for good (grace 0).
    fn finish_delete(&mut self, pod: &Pod, sbs: &[api::PodSandbox], ctrs: &[api::Container]) {
        let k = pod_spec::key(pod);
        if !self
            .deleting
            .lock()
            .expect("deleting lock")
            .insert(k.uid.clone())
        {
            return;
        }
        let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
        let hooks: HashMap<String, PreStop> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .filter_map(|c| Some((c.name.clone(), PreStop::of(c)?)))
            .collect();
        let (cri, client, deleting) =
            (self.cri.clone(), self.client.clone(), self.deleting.clone());
        let (sbs, ctrs, pod_dir) = (sbs.to_vec(), ctrs.to_vec(), self.config.pod_dir.clone());
        tokio::spawn(async move {
            let name = format!("{}/{}", k.namespace, k.name);
            let result = async {
                teardown(&cri, &sbs, &ctrs, grace, &hooks).await?;
                volumes::remove(&pod_dir, &k.uid);
                let pods: Api<Pod> = Api::namespaced(client, &k.namespace);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(k.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match pods.delete(&k.name, &dp).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
                    Err(e) => Err(api_err(format!("delete pod {name}"))(e)),
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(pod = %name, "finishing the delete: {e}");
            }
            // A later pass retries what failed.
            deleting.lock().expect("deleting lock").remove(&k.uid);
        });
    }

    async fn ensure_image(&mut self, image: &str, policy: Option<&str>) -> Result<(), AgentError> {
        let spec = api::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        };
        let tag_latest = {
            let last = image.rsplit('/').next().unwrap_or(image);
            !last.contains(':') && !image.contains('@') || last.ends_with(":latest")
        };
        let policy = policy.unwrap_or(if tag_latest { "Always" } else { "IfNotPresent" });
        if policy != "Always" {
            let present = self
                .cri
                .image
                .image_status(api::ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                })
                .await
                .map_err(cri_err("ImageStatus"))?
                .into_inner()
                .image
                .is_some();
            if present {
                return Ok(());
            }
            if policy == "Never" {
                return Err(AgentError::PodSpec {
                    pod: image.to_owned(),
                    reason: "image not present and imagePullPolicy is Never".into(),
                });
            }
        }
        self.cri
            .image
            .pull_image(api::PullImageRequest {
                image: Some(spec),
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(cri_err("PullImage"))?;
        Ok(())
    }

    async fn container_status(&mut self, id: &str) -> Result<api::ContainerStatus, AgentError> {
        self.cri
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(cri_err("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(AgentError::Cri {
                call: "ContainerStatus",
                status: keel_cri::tonic::Status::internal("no status in the answer"),
            })
    }

    /// Stops a container whose liveness or startup probe failed, within the pod's grace period,
    /// in the background (a long grace period must not hold the other pods' sync); a later pass
    /// restarts it by the restart policy.
    fn kill_unhealthy(
        &mut self,
        pod: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        id: &str,
        why: &str,
    ) {
        if !self
            .stopping
            .lock()
            .expect("stopping lock")
            .insert(id.to_owned())
        {
            return;
        }
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        tracing::info!(
            pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()),
            container = %c.name,
            "{why} probe failed, container will be restarted"
        );
        let mut cri = self.cri.clone();
        let stopping = self.stopping.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let req = api::StopContainerRequest {
                container_id: id.clone(),
                timeout: grace,
            };
            if let Err(e) = cri.runtime.stop_container(req).await {
                tracing::warn!(container = %id, "stop after a failed probe: {e}");
            }
            stopping.lock().expect("stopping lock").remove(&id);
        });
    }

    /// The data of the ConfigMaps and Secrets named (those that exist), by name.
    async fn fetch_sources(
        &self,
        ns: &str,
        cm_names: Vec<String>,
        secret_names: Vec<String>,
    ) -> Result<(ObjectData, ObjectData), AgentError> {
        let mut config_maps = HashMap::new();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        for name in cm_names {
            if config_maps.contains_key(&name) {
                continue;
            }
            if let Some(cm) = cms
                .get_opt(&name)
                .await
                .map_err(api_err(format!("get configmap {ns}/{name}")))?
            {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                config_maps.insert(name, data);
            }
        }
        let mut secret_data = HashMap::new();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        for name in secret_names {
            if secret_data.contains_key(&name) {
                continue;
            }
            if let Some(sec) = secrets
                .get_opt(&name)
                .await
                .map_err(api_err(format!("get secret {ns}/{name}")))?
            {
                let mut data: BTreeMap<String, Vec<u8>> = sec
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in sec.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                secret_data.insert(name, data);
            }
        }
        Ok((config_maps, secret_data))
    }

    /// The environment and mounts of `c`: the ConfigMaps and Secrets its env and the pod's
    /// volumes name are read, the volumes made under the pod dir.
    async fn env_and_mounts(
        &self,
        pod: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        pod_ip: Option<&str>,
    ) -> Result<(Vec<(String, String)>, Vec<api::Mount>), AgentError> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec_err = |reason: String| AgentError::PodSpec {
            pod: format!("{ns}/{}", pod.metadata.name.as_deref().unwrap_or_default()),
            reason: format!("container {}: {reason}", c.name),
        };
        let (mut cm_names, mut secret_names) = pod_env::referenced(c);
        let (vol_cms, vol_secrets) = volumes::referenced(pod);
        cm_names.extend(vol_cms);
        secret_names.extend(vol_secrets);
        let (config_maps, secrets) = self.fetch_sources(&ns, cm_names, secret_names).await?;
        let text = |m: &ObjectData| -> HashMap<String, BTreeMap<String, String>> {
            m.iter()
                .map(|(name, d)| {
                    let d = d
                        .iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    (name.clone(), d)
                })
                .collect()
        };
        let src = EnvSources {
            config_maps: text(&config_maps),
            secrets: text(&secrets),
            pod_ip: pod_ip.map(str::to_string),
            host_ip: self.host_ip.clone(),
        };
        let env = pod_env::container_env(pod, c, &src).map_err(spec_err)?;
        let vols = volumes::prepare(&self.config.pod_dir, pod, &config_maps, &secrets)
            .map_err(spec_err)?;
        let mounts = volumes::mounts(c, &vols).map_err(spec_err)?;
        Ok((env, mounts))
    }

    /// Creates and starts restart number `attempt` of container `c`.
    async fn start_container(
        &mut self,
        pod: &Pod,
        sandbox_id: &str,
        sandbox_config: &api::PodSandboxConfig,
        c: &k8s_openapi::api::core::v1::Container,
        attempt: u32,
        pod_ip: Option<&str>,
    ) -> Result<String, AgentError> {
        self.ensure_image(
            c.image.as_deref().unwrap_or_default(),
            c.image_pull_policy.as_deref(),
        )
        .await?;
        let (env, mounts) = self.env_and_mounts(pod, c, pod_ip).await?;
        let mut config = pod_spec::container_config(pod, c, attempt, env)?;
        config.mounts = mounts;
        let id = self
            .cri
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(cri_err("CreateContainer"))?
            .into_inner()
            .container_id;
        self.cri
            .runtime
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(cri_err("StartContainer"))?;
        Ok(id)
    }

    /// Brings one container of the pod's sandbox `sid` along: created and started if it has
    /// no instance, started if created, restarted by `policy` after its back-off if exited;
    /// with `probe`, its probes run while it runs.
    #[allow(clippy::too_many_arguments)]
    async fn sync_container(
        &mut self,
        pod: &Pod,
        sid: &str,
        sandbox_config: &api::PodSandboxConfig,
        c: &k8s_openapi::api::core::v1::Container,
        ctrs: &[api::Container],
        policy: &str,
        pod_ip: Option<&str>,
        probe: bool,
    ) -> Result<Synced, AgentError> {
        let mut mine: Vec<&api::Container> = ctrs
            .iter()
            .filter(|x| {
                x.pod_sandbox_id == *sid && x.labels.get(LABEL_CONTAINER_NAME) == Some(&c.name)
            })
            .collect();
        mine.sort_by_key(|x| x.metadata.as_ref().map_or(0, |m| m.attempt));
        let o = match mine.last() {
            None => match self
                .start_container(pod, sid, sandbox_config, c, 0, pod_ip)
                .await
            {
                Ok(id) => Observed {
                    status: self.container_status(&id).await?,
                    restart_count: 0,
                    backing_off: false,
                    probes: None,
                },
                Err(AgentError::PodSpec { reason, .. }) => {
                    return Ok(Synced::ConfigError(reason));
                }
                Err(e) => return Err(e),
            },
            Some(newest) => {
                let attempt = newest.metadata.as_ref().map_or(0, |m| m.attempt);
                let mut status = self.container_status(&newest.id).await?;
                let mut backing_off = false;
                let mut restart_count = attempt;
                if status.state == api::ContainerState::ContainerCreated as i32 {
                    self.cri
                        .runtime
                        .start_container(api::StartContainerRequest {
                            container_id: newest.id.clone(),
                        })
                        .await
                        .map_err(cri_err("StartContainer"))?;
                    status = self.container_status(&newest.id).await?;
                } else if status.state == api::ContainerState::ContainerExited as i32
                    && pod_status::restarts(policy, status.exit_code)
                {
                    let delay =
                        pod_status::restart_delay(self.config.restart_backoff_base, attempt);
                    let due = i128::from(status.finished_at)
                        + i128::try_from(delay.as_nanos()).unwrap_or(i128::MAX);
                    if Timestamp::now().as_nanosecond() >= due {
                        let id = self
                            .start_container(pod, sid, sandbox_config, c, attempt + 1, pod_ip)
                            .await?;
                        // Keep the instance just exited (its log), drop older ones.
                        for old in mine.iter().take(mine.len().saturating_sub(1)) {
                            let _ = self
                                .cri
                                .runtime
                                .remove_container(api::RemoveContainerRequest {
                                    container_id: old.id.clone(),
                                })
                                .await;
                        }
                        status = self.container_status(&id).await?;
                        restart_count = attempt + 1;
                    } else {
                        backing_off = true;
                    }
                }
                Observed {
                    status,
                    restart_count,
                    backing_off,
                    probes: None,
                }
            }
        };
        let mut o = o;
        if probe && o.status.state == api::ContainerState::ContainerRunning as i32 {
            let probe_ip = pod_ip.and_then(|ip| ip.parse().ok());
            self.running.insert(o.status.id.clone());
            o.probes = self.probers.verdict(&o.status.id, c, probe_ip, &self.cri);
            if let Some(why) = o.probes.and_then(|v| v.failed) {
                self.kill_unhealthy(pod, c, &o.status.id, why);
            }
        }
        Ok(Synced::Observed(Box::new(o)))
    }

    async fn sync_pod(
        &mut self,
        pod: &Pod,
        sbs: &[api::PodSandbox],
        ctrs: &[api::Container],
    ) -> Result<(), AgentError> {
        let k = pod_spec::key(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let sandbox_config = pod_spec::sandbox_config(pod, &self.config.pod_log_dir, &self.dns);
        let ready = sbs
            .iter()
            .find(|s| s.state == api::PodSandboxState::SandboxReady as i32);
        // Finished pods (by what this agent wrote, or what the API has after a restart) never
        // run again; their stopped sandbox stays until the pod is deleted, their status as is.
        let terminal = self
            .written
            .get(&k.uid)
            .or(pod.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let sandbox_id = match ready {
            Some(s) => Some(s.id.clone()),
            None if terminal => return Ok(()),
            None => {
                // A sandbox that died (or was stopped) is replaced, with all its containers.
                teardown(&self.cri, sbs, ctrs, 0, &HashMap::new()).await?;
                let id = self
                    .cri
                    .runtime
                    .run_pod_sandbox(api::RunPodSandboxRequest {
                        config: Some(sandbox_config.clone()),
                        runtime_handler: String::new(),
                    })
                    .await
                    .map_err(cri_err("RunPodSandbox"))?
                    .into_inner()
                    .pod_sandbox_id;
                tracing::info!(pod = %format!("{}/{}", k.namespace, k.name), sandbox = %id, "sandbox running");
                Some(id)
            }
        };
        let mut sandbox_view = None;
        let mut observed: HashMap<String, Observed> = HashMap::new();
        let mut config_errors: HashMap<String, String> = HashMap::new();
        if let Some(sid) = &sandbox_id {
            let st = self
                .cri
                .runtime
                .pod_sandbox_status(api::PodSandboxStatusRequest {
                    pod_sandbox_id: sid.clone(),
                    verbose: false,
                })
                .await
                .map_err(cri_err("PodSandboxStatus"))?
                .into_inner()
                .status
                .unwrap_or_default();
            let net = st.network.unwrap_or_default();
            let mut ips: Vec<String> = Vec::new();
            if !net.ip.is_empty() {
                ips.push(net.ip);
            }
            ips.extend(net.additional_ips.into_iter().map(|ip| ip.ip));
            let first_ip = ips.first().cloned();
            sandbox_view = Some(SandboxView { ips });
            let pod_ip = first_ip.as_deref();
            // Init containers one at a time, each to a successful exit, before the others.
            let init_policy = if policy == "Never" {
                "Never"
            } else {
                "OnFailure"
            };
            let mut initialized = true;
            for c in spec.init_containers.iter().flatten() {
                let o = self
                    .sync_container(
                        pod,
                        sid,
                        &sandbox_config,
                        c,
                        ctrs,
                        init_policy,
                        pod_ip,
                        false,
                    )
                    .await;
                let done = match o? {
                    Synced::Observed(o) => {
                        let done = o.status.state == api::ContainerState::ContainerExited as i32
                            && o.status.exit_code == 0;
                        observed.insert(c.name.clone(), *o);
                        done
                    }
                    Synced::ConfigError(reason) => {
                        config_errors.insert(c.name.clone(), reason);
                        false
                    }
                };
                if !done {
                    initialized = false;
                    break;
                }
            }
            for c in spec.containers.iter().filter(|_| initialized) {
                match self
                    .sync_container(pod, sid, &sandbox_config, c, ctrs, &policy, pod_ip, true)
                    .await?
                {
                    Synced::Observed(o) => {
                        observed.insert(c.name.clone(), *o);
                    }
                    Synced::ConfigError(reason) => {
                        config_errors.insert(c.name.clone(), reason);
                    }
                }
            }
        }
        let mut base = pod.clone();
        if let Some(last) = self.written.get(&k.uid) {
            base.status = Some(last.clone());
        }
        let mut status = pod_status::pod_status(
            &base,
            sandbox_view.as_ref(),
            &|name| observed.get(name).cloned(),
            &self.host_ip,
            Timestamp::now(),
        );
        for cs in status.container_statuses.iter_mut().flatten() {
            if let Some(message) = config_errors.get(&cs.name) {
                cs.state = Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CreateContainerConfigError".into()),
                        message: Some(message.clone()),
                    }),
                    ..Default::default()
                });
            }
        }
        if self.written.get(&k.uid) == Some(&status) {
            return Ok(());
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &k.namespace);
        pods.patch_status(
            &k.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .map_err(api_err(format!("status of pod {}/{}", k.namespace, k.name)))?;
        let done = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        self.written.insert(k.uid, status);
        if let (true, Some(sid)) = (done, sandbox_id) {
            // As kubelet: a finished pod's sandbox is stopped (its IP freed), kept for its logs.
            self.cri
                .runtime
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: sid,
                })
                .await
                .map_err(cri_err("StopPodSandbox"))?;
        }
        Ok(())
    }
}
