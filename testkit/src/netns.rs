//! Network namespace and veth guards for privileged tests.
//!
//! Namespaces are named (`ip netns add`), so `ip netns exec NAME ...` works in tests and CNI
//! runtimes can be given `/run/netns/NAME`. Everything is deleted on drop, also when the test
//! panics. Nothing here touches a link or namespace the guard did not create.

use std::path::PathBuf;

use anyhow::Context;

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
