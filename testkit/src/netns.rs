//! Network namespace and veth guards for privileged tests.
//!
//! Namespaces are named (`ip netns add`), so `ip netns exec NAME ...` works in tests and CNI
//! runtimes can be given `/run/netns/NAME`. Everything is deleted on drop, also when the test
//! panics. Nothing here touches a link or namespace the guard did not create.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::{run, unique_name};

/// A fresh named network namespace with loopback up; deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// Creates `keel<pid>-<n>` and brings its loopback up.
    pub fn new() -> anyhow::Result<Self> {
        Self::named(&unique_name(""))
    }

    /// Creates a namespace with a caller-chosen (still unique) name.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name]).with_context(|| format!("create netns {name}"))?;
        let guard = NetnsGuard {
            name: name.to_owned(),
        };
        guard.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (what CNI calls `CNI_NETNS`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A `std::process::Command` that runs `cmd` inside the namespace.
    pub fn command(&self, cmd: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Processes left inside would keep the namespace alive: kill them first.
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
        }
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("testkit: could not delete netns {}: {e}", self.name);
        }
    }
}

/// A veth pair created in the current network namespace (or moved by the test); on drop the
/// first end is deleted wherever it can be found, which removes the peer too.
#[derive(Debug)]
pub struct VethPair {
    a: String,
    b: String,
    a_netns: Option<String>,
}

impl VethPair {
    /// Creates `a <-> b` in the current namespace, both ends down.
    pub fn new(a: &str, b: &str) -> anyhow::Result<Self> {
        run("ip", &["link", "add", a, "type", "veth", "peer", "name", b])
            .with_context(|| format!("create veth {a}<->{b}"))?;
        Ok(VethPair {
            a: a.to_owned(),
            b: b.to_owned(),
            a_netns: None,
        })
    }

    /// Creates the pair directly inside `ns_a` (end a) and `ns_b` (end b), never in the host
    /// namespace.
    pub fn between(ns_a: &NetnsGuard, a: &str, ns_b: &NetnsGuard, b: &str) -> anyhow::Result<Self> {
        ns_a.exec(
            "ip",
            &[
                "link",
                "add",
                a,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                ns_b.name(),
            ],
        )
        .with_context(|| {
            format!(
                "create veth {a}<->{b} between {} and {}",
                ns_a.name(),
                ns_b.name()
            )
        })?;
        Ok(VethPair {
            a: a.to_owned(),
            b: b.to_owned(),
            a_netns: Some(ns_a.name().to_owned()),
        })
    }

    pub fn a(&self) -> &str {
        &self.a
    }

    pub fn b(&self) -> &str {
        &self.b
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both; if the namespace is already gone the pair went with it.
        let _ = match &self.a_netns {
            Some(ns) => run("ip", &["-n", ns, "link", "del", &self.a]),
            None => run("ip", &["link", "del", &self.a]),
        };
    }
}

/// Runs `f` on a thread that entered the network namespace at `ns` (a `/run/netns/NAME` path)
/// and returns its result; the calling thread stays where it is.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// ethtool commands (linux/ethtool.h): the legacy rx/tx checksumming and GRO switches.
pub const ETHTOOL_SRXCSUM: u32 = 0x15;
pub const ETHTOOL_STXCSUM: u32 = 0x17;
pub const ETHTOOL_SGRO: u32 = 0x2c;

/// Switches one offload (`cmd`, an `ETHTOOL_S*` command) of `dev` in the calling thread's
/// namespace, as `ethtool -K` does (ethtool itself is not installed on these machines).
pub fn set_offload(dev: &str, cmd: u32, on: bool) -> anyhow::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut val = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr
        .ifr_name
        .iter_mut()
        .zip(dev.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut val).cast();
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live for the
    // call; the socket fd is open.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if rc != 0 {
        bail!(
            "SIOCETHTOOL {cmd:#x} on {dev}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
