//! Kernel checks, loading, attaching and pinning of the socket programs, and uninstall.
//!
//! Layout under the bpffs dir: the maps pinned by name (`keel_svc`, ...) and `links/<hook>`, one
//! pinned bpf_link per cgroup hook. Pinned links keep the programs attached while no proxy runs
//! (restart, crash), and pinned maps keep their contents, so established and new connections
//! keep working. A starting proxy attaches its fresh programs first and only then replaces the
//! old link's pin, so no instant passes without a program on each hook (cgroup links run in
//! multi mode; the old and new programs never both translate: the second one sees a backend
//! address, not a service).
//!
//! The XDP NodePort program is pinned as `links/xdpdrv-<iface>` (native mode) or
//! `links/xdpgeneric-<iface>` (generic mode, when the driver refuses native XDP). An interface
//! holds one XDP link at a time, so a starting proxy takes over by replacing the program inside
//! the pinned link (bpf_link_update: atomic, the mode stays).

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::programs::links::FdLink;
use aya::programs::links::PinnedLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use aya::util::KernelVersion;
use keel_ebpf::{
    SOCK_OBJECT, SOCK_PROGRAMS, TC_EGRESS_PROGRAM, TC_OBJECT, TC_PROGRAM, XDP_OBJECT, XDP_PROGRAM,
    map_names,
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// bpf_link for cgroups (5.7), bpf_get_netns_cookie in sock_addr (5.7), bpf_set_retval reachable
/// from sock_addr programs (6.1).
pub const MIN_KERNEL: (u32, u32) = (6, 1);
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/keel";
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "kernel has no BTF (/sys/kernel/btf/vmlinux missing): keel proxy needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error("kernel {0} is too old: keel proxy needs Linux >= {major}.{minor} (bpf_link on cgroups, bpf_set_retval in sock_addr programs)", major = MIN_KERNEL.0, minor = MIN_KERNEL.1)]
    OldKernel(String),
    #[error("cannot read the kernel version: {0}")]
    KernelVersion(String),
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mounts): keel proxy attaches to a cgroup v2 directory; mount one or pass --cgroup"
    )]
    NoCgroup2,
    #[error("{0} is not a cgroup v2 directory (the socket hooks attach only to cgroup v2)")]
    NotCgroup2(PathBuf),
    #[error(
        "{0} is not on a bpf filesystem (mount -t bpf bpf {0}, or choose a --bpffs-dir under a bpffs mount)"
    )]
    NotBpffs(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "program {name}: no bpf_link ({reason}); keel proxy needs bpf_link support for cgroups"
    )]
    Link { name: &'static str, reason: String },
    #[error("attach the tc program to {iface}: {reason}")]
    Tc { iface: String, reason: String },
    #[error("attach the XDP program to {iface}: {reason}")]
    Xdp { iface: String, reason: String },
    #[error("the netlink thread for {0} panicked")]
    Thread(&'static str),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error(
        "pinned map {} holds key {}/value {} bytes, {} entries; this keel's programs want key {}/value {}, {} entries: another keel version made it. Run `keel proxy --bpffs-dir {} uninstall` (drops conntrack and affinity state) and start again",
        path.display(), pinned.0, pinned.1, pinned.2, wanted.0, wanted.1, wanted.2,
        path.parent().unwrap_or(path).display()
    )]
    PinnedMapMismatch {
        path: PathBuf,
        /// (key size, value size, max entries) of the pinned map and of the object's definition.
        pinned: (u32, u32, u32),
        wanted: (u32, u32, u32),
    },
    #[error("read the pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pin link {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError {
    let path = path.to_owned();
    move |source| LoaderError::Io { what, path, source }
}

fn fs_type(path: &Path) -> Result<i64, std::io::Error> {
    let st = rustix::fs::statfs(path)?;
    Ok(st.f_type as i64)
}

/// The v2 hierarchy's root: /sys/fs/cgroup when pure v2, /sys/fs/cgroup/unified on hybrid
/// hosts, else the first cgroup2 mount.
pub fn default_cgroup() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| v2.contains(p))
        .or_else(|| v2.into_iter().next())
}

/// Refuses, naming it, whatever the kernel or the host lacks.
pub fn preflight(cgroup: &Path, bpffs_dir: &Path) -> Result<(), LoaderError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LoaderError::NoBtf);
    }
    let v = KernelVersion::current().map_err(|e| LoaderError::KernelVersion(e.to_string()))?;
    if v < KernelVersion::new(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8, 0) {
        return Err(LoaderError::OldKernel(format!("{v:?}")));
    }
    match fs_type(cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => return Err(LoaderError::NotCgroup2(cgroup.to_owned())),
        Err(e) => return Err(io("open cgroup", cgroup)(e)),
    }
    ensure_bpffs(bpffs_dir)
}

/// Makes sure `dir` exists on a bpffs, mounting one at /sys/fs/bpf if that is where it belongs
/// and nothing is mounted there yet (as systemd does on most distributions).
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoaderError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && root.is_dir() && fs_type(root).ok() != Some(BPF_FS_MAGIC) {
        rustix::mount::mount(
            "bpf",
            root,
            "bpf",
            rustix::mount::MountFlags::empty(),
            c"mode=0700",
        )
        .map_err(|e| io("mount bpffs at", root)(e.into()))?;
        tracing::info!("mounted a bpf filesystem at {BPFFS_ROOT}");
    }
    std::fs::create_dir_all(dir.join("links")).map_err(io("create pin dir", dir))?;
    if fs_type(dir).map_err(io("stat", dir))? != BPF_FS_MAGIC {
        return Err(LoaderError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

/// Loads `object` with its maps pinned by name under `bpffs_dir`, re-using the pins already
/// there. aya re-uses a pin whatever its layout, so a pin an older keel made with another key or
/// value size would surface as a verifier or map-type error far from its cause: each one is
/// compared with the object's definition first, and a mismatch named, with the way out.
fn load_pinned(object: &[u8], bpffs_dir: &Path) -> Result<aya::Ebpf, LoaderError> {
    let parsed = aya_obj::Object::parse(object)
        .map_err(|e| LoaderError::Load(Box::new(aya::EbpfError::ParseError(e))))?;
    for (name, def) in &parsed.maps {
        if def.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        let path = bpffs_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| LoaderError::PinnedMap {
            path: path.clone(),
            source: Box::new(e),
        })?;
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let wanted = (def.key_size(), def.value_size(), def.max_entries());
        if pinned != wanted {
            return Err(LoaderError::PinnedMapMismatch {
                path,
                pinned,
                wanted,
            });
        }
    }
    EbpfLoader::new()
        .default_map_pin_directory(bpffs_dir)
        .load(object)
        .map_err(|e| LoaderError::Load(Box::new(e)))
}

/// Loads the socket programs (re-using maps already pinned under `bpffs_dir`), attaches them to
/// `cgroup` and pins the links, replacing a previous proxy's links without a gap.
pub fn install(cgroup: &Path, bpffs_dir: &Path) -> Result<(), LoaderError> {
    preflight(cgroup, bpffs_dir)?;
    let mut ebpf = load_pinned(SOCK_OBJECT, bpffs_dir)?;
    let cg = File::open(cgroup).map_err(io("open cgroup", cgroup))?;
    for (name, hook) in SOCK_PROGRAMS {
        let perr = |source: aya::programs::ProgramError| LoaderError::Program {
            name,
            source: Box::new(source),
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram(name))?
            .try_into()
            .map_err(perr)?;
        prog.load().map_err(perr)?;
        let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
        let link: FdLink = prog.take_link(id).map_err(perr)?.try_into().map_err(
            |e: aya::programs::links::LinkError| LoaderError::Link {
                name,
                reason: e.to_string(),
            },
        )?;
        let pin = bpffs_dir.join("links").join(hook);
        // The new link is attached: dropping the old pin detaches the old program only now.
        match std::fs::remove_file(&pin) {
            Ok(()) => tracing::debug!("replacing link {}", pin.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove old link pin", &pin)(e)),
        }
        link.pin(&pin).map_err(|source| LoaderError::Pin {
            path: pin.clone(),
            source: Box::new(source),
        })?;
    }
    // The programs stay loaded through their pinned links and the maps through their pins.
    Ok(())
}

/// Loads the tc NodePort programs (sharing the pinned service maps) and attaches them to each
/// interface (external interfaces and pod veths) as pinned tcx links: DNAT on ingress
/// (`links/tc-<iface>`), reverse NAT on egress (`links/tcegress-<iface>`), with the same
/// gap-free takeover as the socket hooks. `netns`: the network
/// namespace the interfaces live in (default: the proxy's own).
pub fn install_tc(
    bpffs_dir: &Path,
    interfaces: &[String],
    netns: Option<&Path>,
) -> Result<(), LoaderError> {
    if interfaces.is_empty() {
        return Ok(());
    }
    in_netns(netns, TC_PROGRAM, || attach_tc(bpffs_dir, interfaces))
}

/// Runs `f` on a thread that entered the network namespace `netns` (None: the caller's):
/// netlink and ifindex lookups talk to the calling thread's namespace.
fn in_netns<T: Send>(
    netns: Option<&Path>,
    what: &'static str,
    f: impl FnOnce() -> Result<T, LoaderError> + Send,
) -> Result<T, LoaderError> {
    let ns_file = match netns {
        Some(p) => Some(File::open(p).map_err(io("open netns", p))?),
        None => None,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<T, LoaderError> {
                if let Some(f) = &ns_file {
                    rustix::thread::move_into_link_name_space(
                        std::os::fd::AsFd::as_fd(f),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .map_err(|e| io("enter netns", netns.unwrap_or(Path::new("?")))(e.into()))?;
                }
                f()
            })
            .join()
            .unwrap_or(Err(LoaderError::Thread(what)))
    })
}

fn attach_tc(bpffs_dir: &Path, interfaces: &[String]) -> Result<(), LoaderError> {
    let mut ebpf = load_pinned(TC_OBJECT, bpffs_dir)?;
    for (name, attach, pin_prefix) in [
        (TC_PROGRAM, TcAttachType::Ingress, "tc"),
        (TC_EGRESS_PROGRAM, TcAttachType::Egress, "tcegress"),
    ] {
        let perr = |source: aya::programs::ProgramError| LoaderError::Program {
            name,
            source: Box::new(source),
        };
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram(name))?
            .try_into()
            .map_err(perr)?;
        prog.load().map_err(perr)?;
        for iface in interfaces {
            let id = prog.attach(iface, attach).map_err(|e| LoaderError::Tc {
                iface: iface.clone(),
                reason: e.to_string(),
            })?;
            let link: FdLink = prog.take_link(id).map_err(perr)?.try_into().map_err(
                |e: aya::programs::links::LinkError| LoaderError::Tc {
                    iface: iface.clone(),
                    reason: format!("no tcx link ({e}); needs Linux >= 6.6"),
                },
            )?;
            let pin = bpffs_dir
                .join("links")
                .join(format!("{pin_prefix}-{iface}"));
            match std::fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove old link pin", &pin)(e)),
            }
            link.pin(&pin).map_err(|source| LoaderError::Pin {
                path: pin.clone(),
                source: Box::new(source),
            })?;
        }
    }
    Ok(())
}

/// How the XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver, before any skb exists.
    Native,
    /// In the stack (generic XDP, on an skb): the driver refused native mode.
    Generic,
}

impl XdpAttach {
    fn pin_prefix(self) -> &'static str {
        match self {
            XdpAttach::Native => "xdpdrv",
            XdpAttach::Generic => "xdpgeneric",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        }
    }
}

/// Which XDP mode to attach in (`keel proxy --xdp-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native (driver) mode, else generic when the driver refuses it.
    #[default]
    Auto,
    /// Native only: an interface whose driver refuses it is an error.
    Native,
    /// Generic only. On veth-only nodes it is the faster one (native XDP on a veth copies each
    /// frame into a page and rebuilds an skb at the peer) and it keeps a sender's
    /// CHECKSUM_PARTIAL intact.
    Generic,
}

impl std::str::FromStr for XdpModeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpModeChoice::Auto),
            "native" => Ok(XdpModeChoice::Native),
            "generic" => Ok(XdpModeChoice::Generic),
            other => Err(format!(
                "unknown XDP mode {other:?} (auto, native or generic)"
            )),
        }
    }
}

/// Loads the XDP NodePort program (sharing the pinned maps) and attaches it to each interface as
/// a pinned bpf_link in the mode `want` asks for; an interface that already has this proxy's
/// pinned link in a mode `want` allows gets the new program inside it (atomic), one in another
/// mode is detached and attached afresh (the tc program on the interface serves NodePorts
/// meanwhile). `netns`: the network namespace the interfaces live in (default: the proxy's
/// own). Returns the mode of each interface, in order; each is also logged.
pub fn install_xdp(
    bpffs_dir: &Path,
    interfaces: &[String],
    want: XdpModeChoice,
    netns: Option<&Path>,
) -> Result<Vec<(String, XdpAttach)>, LoaderError> {
    if interfaces.is_empty() {
        return Ok(Vec::new());
    }
    ensure_bpffs(bpffs_dir)?;
    in_netns(netns, XDP_PROGRAM, || {
        attach_xdp(bpffs_dir, interfaces, want)
    })
}

fn attach_xdp(
    bpffs_dir: &Path,
    interfaces: &[String],
    want: XdpModeChoice,
) -> Result<Vec<(String, XdpAttach)>, LoaderError> {
    let name = XDP_PROGRAM;
    let perr = |source: aya::programs::ProgramError| LoaderError::Program {
        name,
        source: Box::new(source),
    };
    let mut ebpf = load_pinned(XDP_OBJECT, bpffs_dir)?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(perr)?;
    prog.load().map_err(perr)?;
    let mut modes = Vec::new();
    for iface in interfaces {
        let xerr = |reason: String| LoaderError::Xdp {
            iface: iface.clone(),
            reason,
        };
        let links = bpffs_dir.join("links");
        let pin_of = |m: XdpAttach| links.join(format!("{}-{iface}", m.pin_prefix()));
        let allowed = |m: XdpAttach| match want {
            XdpModeChoice::Auto => true,
            XdpModeChoice::Native => m == XdpAttach::Native,
            XdpModeChoice::Generic => m == XdpAttach::Generic,
        };
        for other in [XdpAttach::Native, XdpAttach::Generic] {
            let pin = pin_of(other);
            if !allowed(other) && pin.exists() {
                // The link (and the program in it) goes with its last reference, the pin.
                std::fs::remove_file(&pin).map_err(io("remove XDP link pin", &pin))?;
                tracing::info!(iface = %iface, from = other.as_str(), "XDP mode changes: old link detached");
            }
        }
        let existing = [XdpAttach::Native, XdpAttach::Generic]
            .into_iter()
            .find(|m| pin_of(*m).exists());
        if let Some(mode) = existing {
            let pin = pin_of(mode);
            let replaced = PinnedLink::from_pin(&pin)
                .map_err(|e| e.to_string())
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match replaced {
                Ok(id) => {
                    // The pin holds the link; only our fd goes.
                    drop(prog.take_link(id).map_err(perr)?);
                    tracing::info!(iface = %iface, mode = mode.as_str(), "XDP NodePort program replaced in the pinned link");
                    modes.push((iface.clone(), mode));
                    continue;
                }
                // A link whose interface went away (and came back) cannot be updated: attach
                // afresh.
                Err(e) => {
                    tracing::warn!(iface = %iface, "stale XDP link {} ({e}): attaching afresh", pin.display());
                    std::fs::remove_file(&pin).map_err(io("remove stale link pin", &pin))?;
                }
            }
        }
        let native = match want {
            XdpModeChoice::Generic => Err(None),
            _ => prog.attach(iface, XdpMode::Driver).map_err(Some),
        };
        let (mode, id) = match native {
            Ok(id) => (XdpAttach::Native, id),
            Err(Some(aya::programs::ProgramError::UnknownInterface { name })) => {
                return Err(xerr(format!("no interface {name}")));
            }
            Err(Some(native)) if want == XdpModeChoice::Native => {
                return Err(xerr(format!(
                    "native XDP refused ({native}); --xdp-mode auto falls back to generic"
                )));
            }
            Err(None) => {
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .map_err(|e| xerr(format!("generic: {e}")))?;
                (XdpAttach::Generic, id)
            }
            Err(Some(native)) => {
                tracing::warn!(iface = %iface, "native XDP refused ({native}); using generic XDP");
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .map_err(|e| xerr(format!("native: {native}; generic: {e}")))?;
                (XdpAttach::Generic, id)
            }
        };
        let link: FdLink = prog.take_link(id).map_err(perr)?.try_into().map_err(
            |e: aya::programs::links::LinkError| {
                xerr(format!("no XDP bpf_link ({e}); needs Linux >= 5.9"))
            },
        )?;
        let pin = pin_of(mode);
        link.pin(&pin).map_err(|source| LoaderError::Pin {
            path: pin.clone(),
            source: Box::new(source),
        })?;
        tracing::info!(iface = %iface, mode = mode.as_str(), "XDP NodePort program attached");
        modes.push((iface.clone(), mode));
    }
    Ok(modes)
}

/// Whether a proxy installation (any pin) exists under `bpffs_dir`.
pub fn installed(bpffs_dir: &Path) -> bool {
    map_names::ALL.iter().any(|m| bpffs_dir.join(m).exists())
}

/// Removes every link (detaching the programs), every map pin and the directory. Returns the
/// pins removed.
pub fn uninstall(bpffs_dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let mut removed = Vec::new();
    let links = bpffs_dir.join("links");
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io("remove link pin", &p))?;
            removed.push(p);
        }
    }
    for m in map_names::ALL.iter().chain(map_names::TC) {
        let p = bpffs_dir.join(m);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove map pin", &p)(e)),
        }
    }
    for d in [&links, &bpffs_dir.to_path_buf()] {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove pin dir", d)(e)),
        }
    }
    Ok(removed)
}
