//! create: record, rootfs, OCI bundle, then the monitor that creates the container with
//! libcontainer. On any failure everything made so far is undone, so a failed create leaves
//! nothing behind.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType};

use super::monitor::{MONITOR_ARG, READY};
use super::spec::{SpecContext, build_spec};
use super::state::{ContainerRecord, write_json};
use super::{
    ContainerConfig, ContainerError, ContainerRuntime, SeccompProfile, cgroups, rootfs, seccomp,
    seccomp_bpf, sys, user,
};
use crate::image::ImageStore;

/// What create needs from an image, resolved from the image store.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// The name the caller used.
    pub reference: String,
    pub id: String,
    pub config: ImageConfiguration,
    /// Snapshot directories, top layer first.
    pub layers: Vec<PathBuf>,
}

impl ImageInfo {
    /// Looks an image up by name, id or id prefix.
    pub async fn resolve(store: &ImageStore, name: &str) -> Result<ImageInfo, ContainerError> {
        let rec =
            store
                .get(name)
                .await?
                .ok_or_else(|| crate::image::ImageError::ImageNotFound {
                    name: name.to_string(),
                })?;
        Ok(ImageInfo {
            reference: name.to_string(),
            config: store.config(&rec).await?,
            layers: store.snapshot_dirs(&rec)?,
            id: rec.id,
        })
    }
}

/// Target of the per-phase timing events (debug level) that `create` emits; the runtime
/// benchmark collects them.
pub const PHASE_TARGET: &str = "keel_runtime::phase";

/// Reports that `phase` of container `id`'s create took the time since `since`.
pub(super) fn phase(id: &str, phase: &'static str, since: Instant) {
    let micros = since.elapsed().as_micros() as u64;
    tracing::debug!(target: PHASE_TARGET, id, phase, micros, "phase done");
}

fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

impl ContainerRuntime {
    /// Creates a container (not started). Returns its id.
    pub fn create(
        &self,
        config: &ContainerConfig,
        image: &ImageInfo,
    ) -> Result<String, ContainerError> {
        if !config.name.is_empty() && self.resolve(&config.name).is_ok() {
            return Err(ContainerError::NameInUse(config.name.clone()));
        }
        cgroups::start_grace_period();
        let id = new_id();
        let dir = self.paths.dir(&id);
        std::fs::create_dir(&dir).map_err(|e| crate::fsutil::FsError::new("create", &dir, e))?;
        match self.create_in(&id, config, image) {
            Ok(()) => Ok(id),
            Err(e) => {
                if let Err(cleanup) = self.remove_everything(&id) {
                    tracing::warn!(%id, error = %cleanup, "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    fn create_in(
        &self,
        id: &str,
        config: &ContainerConfig,
        image: &ImageInfo,
    ) -> Result<(), ContainerError> {
        let t = Instant::now();
        let parent = config
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| self.opts.cgroup_parent.clone());
        let cgroups_path = PathBuf::from("/").join(parent.trim_matches('/')).join(id);
        let stop_signal = config
            .stop_signal
            .clone()
            .or_else(|| {
                image
                    .config
                    .config()
                    .as_ref()
                    .and_then(|c| c.stop_signal().clone())
            })
            .and_then(|s| sys::parse_signal(&s))
            .unwrap_or(15);
        let record = ContainerRecord {
            id: id.to_string(),
            image_ref: image.reference.clone(),
            image_id: image.id.clone(),
            config: config.clone(),
            created_at: chrono::Utc::now(),
            log_path: config
                .log_path
                .clone()
                .unwrap_or_else(|| self.paths.default_log(id)),
            cgroups_path: cgroups_path.clone(),
            stop_signal,
        };
        write_json(&self.paths.record(id), &record)?;
        phase(id, "record", t);

        let t = Instant::now();
        let rootfs_dir = self.paths.rootfs(id);
        rootfs::mount(
            &rootfs_dir,
            &image.layers,
            &self.paths.upper(id),
            &self.paths.work(id),
        )?;
        phase(id, "rootfs mount", t);

        let t = Instant::now();
        let localhost_seccomp = match &config.security.seccomp {
            SeccompProfile::Localhost(p) => Some(seccomp::load_profile(p)?),
            _ => None,
        };
        let ctx = SpecContext {
            id: id.to_string(),
            rootfs: rootfs_dir.clone(),
            cgroups_path,
            passwd: user::read_rootfs_file(&rootfs_dir, "etc/passwd")?,
            group: user::read_rootfs_file(&rootfs_dir, "etc/group")?,
            current_oom_score_adj: sys::current_oom_score_adj(),
            hugepage_sizes: sys::hugepage_sizes(),
            cgroup_v2: cgroups::is_v2(),
            host_devices: if config.security.privileged {
                host_devices()
            } else {
                Vec::new()
            },
            localhost_seccomp,
        };
        let mut spec = build_spec(&image.config, config, &ctx)?;
        let bundle = self.paths.bundle(id);
        crate::fsutil::mkdir_all(&bundle)?;
        self.hand_over_seccomp(id, &mut spec, &bundle)?;
        let data = serde_json::to_vec_pretty(&spec).map_err(|e| ContainerError::Monitor {
            id: id.to_string(),
            reason: format!("serialize spec: {e}"),
        })?;
        // Not fsync'd: the bundle serves only the container's processes, which a power loss
        // ends; the record above is what recovery reads.
        crate::fsutil::replace_file(&bundle.join("config.json"), &data)?;
        phase(id, "spec", t);
        let t = Instant::now();
        self.spawn_monitor(id)?;
        phase(id, "monitor until created", t);
        Ok(())
    }

    /// Moves the spec's seccomp profile into the bundle as a compiled program for the init
    /// to load (`seccomp_bpf`); a profile only libcontainer can load stays in the spec,
    /// translated for it.
    fn hand_over_seccomp(
        &self,
        id: &str,
        spec: &mut oci_spec::runtime::Spec,
        bundle: &std::path::Path,
    ) -> Result<(), ContainerError> {
        let no_new_privs = spec
            .process()
            .as_ref()
            .and_then(|p| p.no_new_privileges())
            .unwrap_or(false);
        let Some(profile) = spec.linux().as_ref().and_then(|l| l.seccomp().clone()) else {
            return Ok(());
        };
        let Some(compiled) = self.filters.get(&profile)? else {
            if let Some(linux) = spec.linux_mut() {
                linux.set_seccomp(Some(seccomp::for_libcontainer(profile)));
            }
            return Ok(());
        };
        let mut process = spec.process().clone();
        let mut caps = process.as_ref().and_then(|p| p.capabilities().clone());
        let plan = seccomp_bpf::plan(&compiled, profile, no_new_privs, caps.as_mut());
        if let Some(p) = process.as_mut() {
            p.set_capabilities(caps);
        }
        spec.set_process(process);
        if let Some(linux) = spec.linux_mut() {
            linux.set_seccomp(None);
        }
        seccomp_bpf::write(bundle, &plan).map_err(|reason| ContainerError::Monitor {
            id: id.to_string(),
            reason,
        })
    }

    /// Starts the monitor and waits until it reports the container created (or why not).
    fn spawn_monitor(&self, id: &str) -> Result<(), ContainerError> {
        let exe = self.monitor_exe()?;
        let err = |reason: String| ContainerError::Monitor {
            id: id.to_string(),
            reason,
        };
        let mut child = Command::new(&exe)
            .arg(MONITOR_ARG)
            .arg(&self.paths.containers)
            .arg(&self.paths.run)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("spawn {}: {e}", exe.display())))?;
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            // EOF comes when the detached monitor has created the container (or failed).
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = child.wait();
        let line = out.lines().next().unwrap_or("").trim();
        if line == READY {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.paths.monitor_log(id)).unwrap_or_default();
        Err(err(if line.is_empty() {
            format!("exited without reporting; log: {}", log.trim())
        } else {
            let msg = line.trim_start_matches("error: ").to_string();
            // The monitor's log holds libcontainer's own account of the failure.
            let detail: Vec<&str> = log.lines().filter(|l| !l.contains(&msg)).collect();
            if detail.is_empty() {
                msg
            } else {
                format!("{msg} ({})", detail.join("; "))
            }
        }))
    }
}

/// The host's device nodes directly under /dev, for privileged containers.
fn host_devices() -> Vec<LinuxDevice> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(rd) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        // libcontainer creates these itself in every container.
        let name = e.file_name();
        if [
            "null", "zero", "full", "tty", "random", "urandom", "ptmx", "console",
        ]
        .iter()
        .any(|n| name == *n)
        {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = md.file_type();
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            continue;
        };
        let rdev = md.rdev();
        if let Ok(d) = LinuxDeviceBuilder::default()
            .path(e.path())
            .typ(typ)
            .major(rustix::fs::major(rdev) as i64)
            .minor(rustix::fs::minor(rdev) as i64)
            .file_mode(md.mode() & 0o7777)
            .uid(md.uid())
            .gid(md.gid())
            .build()
        {
            out.push(d);
        }
    }
    out
}
