//! run (RunPodSandbox): record, cgroup, pinned namespaces (and the PID keeper), /dev/shm,
//! the /etc files, the network hook, sysctls; then the pod is Ready. On any failure
//! everything made so far is undone (the network torn down if it was set up), so a failed
//! run leaves nothing behind.

use std::path::PathBuf;

use super::namespaces::{self, NsKind};
use super::network::PodNetwork;
use super::state::{PodNamespaces, PodRecord, PodState};
use super::{PodConfig, PodError, PodRuntime, cgroup, dns, keeper, sysctl};
use crate::fsutil::{self, FsError};

fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// The node's hostname (what a pod on the host network sees).
fn node_hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl PodRuntime {
    /// Creates a pod sandbox and sets up its network; returns its id once it is Ready.
    pub fn run(&self, config: &PodConfig, network: &dyn PodNetwork) -> Result<String, PodError> {
        // Everything that can be refused is refused before anything is made.
        let sysctls = sysctl::plan(&config.sysctls, &config.host)?;
        if let Some(h) = &config.hostname {
            dns::validate_hostname(h)?;
        }
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let resolv = dns::resolv_conf(config.dns.as_ref(), &host_resolv)?;
        let cgroup_rel = config
            .cgroup_parent
            .as_deref()
            .map(cgroup::validate)
            .transpose()?;
        if !config.name.is_empty() && self.resolve(&config.name).is_ok() {
            return Err(PodError::NameInUse(config.name.clone()));
        }

        let id = new_id();
        let hostname = if config.host.network {
            node_hostname()
        } else {
            config.hostname.clone().unwrap_or_else(|| {
                let n = config.name.as_str();
                if dns::validate_hostname(n).is_ok() {
                    n.to_string()
                } else {
                    id[..12].to_string()
                }
            })
        };
        let cgroup_parent = match cgroup_rel {
            Some(c) => c,
            None => cgroup::validate(&format!("{}/pod-{id}", self.opts.cgroup_parent))?,
        };
        let mut rec = PodRecord {
            id: id.clone(),
            config: config.clone(),
            created_at: chrono::Utc::now(),
            state: PodState::Creating,
            hostname,
            cgroup_parent,
            namespaces: PodNamespaces::default(),
            keeper: None,
            shm: None,
            network: Default::default(),
            network_ready: false,
            stopped_at: None,
        };
        let dir = self.paths.dir(&id);
        std::fs::create_dir(&dir).map_err(|e| FsError::new("create", &dir, e))?;
        match self.run_in(&mut rec, &resolv, &sysctls, network) {
            Ok(()) => Ok(id),
            Err(e) => {
                if rec.network_ready
                    && let Some(netns) = rec.netns()
                    && let Err(te) = network.teardown(&rec, netns)
                {
                    tracing::warn!(%id, error = %te, "network teardown after failed pod run");
                }
                if let Err(cleanup) = self.remove_everything(&id, Some(&rec)) {
                    tracing::warn!(%id, error = %cleanup, "cleanup after failed pod run");
                }
                Err(e)
            }
        }
    }

    fn run_in(
        &self,
        rec: &mut PodRecord,
        resolv: &str,
        sysctls: &[sysctl::Sysctl],
        network: &dyn PodNetwork,
    ) -> Result<(), PodError> {
        let id = rec.id.clone();
        // First on disk: whatever happens next, remove finds the pod and cleans it up.
        self.write_record(rec)?;
        fsutil::mkdir_all(&self.paths.run_dir(&id))?;
        cgroup::create(&rec.cgroup_parent)?;

        let host = &rec.config.host;
        let mut kinds = Vec::new();
        if !host.network {
            kinds.push(NsKind::Net);
            kinds.push(NsKind::Uts);
        }
        if !host.ipc {
            kinds.push(NsKind::Ipc);
        }
        let pin = |k: NsKind| self.paths.pin(&id, k);
        let hostname = (!host.network).then_some(rec.hostname.as_str());
        namespaces::create_pinned(&kinds, hostname, &pin).map_err(|e| PodError::Namespace {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        let pinned = |k: NsKind| kinds.contains(&k).then(|| pin(k));
        rec.namespaces = PodNamespaces {
            network: pinned(NsKind::Net),
            ipc: pinned(NsKind::Ipc),
            uts: pinned(NsKind::Uts),
            pid: None,
        };
        self.write_record(rec)?;

        if rec.config.share_pid && !host.pid {
            let keeper_err = |reason: String| PodError::Keeper {
                id: id.clone(),
                reason,
            };
            let keeper = keeper::spawn(&self.keeper_exe()?).map_err(keeper_err)?;
            rec.keeper = Some(keeper);
            self.write_record(rec)?;
            let source = PathBuf::from(format!("/proc/{}/ns/pid", keeper.pid));
            namespaces::pin(&source, &pin(NsKind::Pid)).map_err(|e| keeper_err(e.to_string()))?;
            rec.namespaces.pid = Some(pin(NsKind::Pid));
            self.write_record(rec)?;
        }

        rec.shm = Some(if host.ipc {
            PathBuf::from("/dev/shm")
        } else {
            let shm = self.paths.shm(&id);
            namespaces::mount_shm(&shm).map_err(|e| PodError::Namespace {
                id: id.clone(),
                reason: e.to_string(),
            })?;
            shm
        });
        self.write_record(rec)?;

        fsutil::atomic_write(&self.paths.resolv_conf(&id), resolv.as_bytes())?;
        fsutil::atomic_write(
            &self.paths.hostname(&id),
            format!("{}\n", rec.hostname).as_bytes(),
        )?;
        self.write_hosts(rec)?;

        if let Some(netns) = rec.netns().map(|p| p.to_owned()) {
            let ips = network.setup(rec, &netns).map_err(|e| PodError::Network {
                id: id.clone(),
                op: "setup",
                reason: e.to_string(),
            })?;
            rec.network = ips;
            rec.network_ready = true;
            self.write_record(rec)?;
            self.write_hosts(rec)?;
        }

        // After the network: interface sysctls (net.ipv4.conf.eth0.*) need the interface.
        namespaces::apply_sysctls(sysctls, &pin).map_err(|e| PodError::Sysctl {
            id: id.clone(),
            reason: e.to_string(),
        })?;

        rec.state = PodState::Ready;
        self.write_record(rec)
    }

    fn write_hosts(&self, rec: &PodRecord) -> Result<(), PodError> {
        let content = if rec.config.host.network {
            std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| dns::hosts(&rec.hostname, &[]))
        } else {
            dns::hosts(&rec.hostname, &rec.network.ips)
        };
        fsutil::atomic_write(&self.paths.hosts(&rec.id), content.as_bytes())?;
        Ok(())
    }
}
