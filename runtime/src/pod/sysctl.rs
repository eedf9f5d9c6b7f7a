//! Pod sysctls: which namespace each one lives in, and whether the pod may set it. Pure: the
//! plan is applied by [`super::namespaces::apply_sysctls`] inside the pod's namespaces.
//!
//! Only namespaced sysctls are accepted (as the kubelet's safe + unsafe namespaced sets):
//! `net.*` in the network namespace, the SysV IPC and POSIX mqueue ones in the IPC namespace,
//! `kernel.domainname` in the UTS namespace. A sysctl for a namespace the pod shares with the
//! node is refused: it would change the node.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::PodError;
use super::config::HostNamespaces;

/// The namespace a sysctl belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysctlNamespace {
    Net,
    Ipc,
    Uts,
}

/// One sysctl to write: `/proc/sys/<path>` = `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    pub name: String,
    pub namespace: SysctlNamespace,
    /// Relative to /proc/sys.
    pub path: PathBuf,
    pub value: String,
}

const IPC_SYSCTLS: &[&str] = &[
    "kernel.shmmax",
    "kernel.shmall",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
];

/// The path under /proc/sys of a sysctl name. With a `/` in the name, `/` separates and `.`
/// is literal (`net/ipv4/conf/eth0.100/rp_filter`); otherwise `.` separates.
pub fn sysctl_path(name: &str) -> Result<(String, PathBuf), PodError> {
    let bad = |why: &str| PodError::InvalidConfig(format!("sysctl {name:?}: {why}"));
    let parts: Vec<&str> = if name.contains('/') {
        name.split('/').collect()
    } else {
        name.split('.').collect()
    };
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(bad("empty or relative path component"));
    }
    Ok((parts.join("."), parts.iter().collect()))
}

/// Which namespace a (dotted) sysctl name is in, or `None` when it is not namespaced.
pub fn namespace_of(dotted: &str) -> Option<SysctlNamespace> {
    if dotted.starts_with("net.") {
        Some(SysctlNamespace::Net)
    } else if IPC_SYSCTLS.contains(&dotted) || dotted.starts_with("fs.mqueue.") {
        Some(SysctlNamespace::Ipc)
    } else if dotted == "kernel.domainname" {
        Some(SysctlNamespace::Uts)
    } else {
        None
    }
}

/// Checks every sysctl and says where it goes. Values must be one line.
pub fn plan(
    sysctls: &BTreeMap<String, String>,
    host: &HostNamespaces,
) -> Result<Vec<Sysctl>, PodError> {
    let mut out = Vec::new();
    for (name, value) in sysctls {
        let (dotted, path) = sysctl_path(name)?;
        let bad = |why: &str| PodError::InvalidConfig(format!("sysctl {name:?}: {why}"));
        let ns = namespace_of(&dotted).ok_or_else(|| {
            bad("not a namespaced sysctl (net.*, kernel.shm*/msg*/sem, fs.mqueue.*, kernel.domainname)")
        })?;
        match ns {
            SysctlNamespace::Net | SysctlNamespace::Uts if host.network => {
                return Err(bad("the pod uses the host network namespace"));
            }
            SysctlNamespace::Ipc if host.ipc => {
                return Err(bad("the pod uses the host IPC namespace"));
            }
            _ => {}
        }
        if value.contains('\n') {
            return Err(bad("value holds a newline"));
        }
        out.push(Sysctl {
            name: name.clone(),
            namespace: ns,
            path,
            value: value.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: &[(&str, &str)]) -> BTreeMap<String, String> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sysctls_go_to_their_namespace() {
        let p = plan(
            &map(&[
                ("net.ipv4.ip_unprivileged_port_start", "80"),
                ("kernel.shmmni", "2048"),
                ("fs.mqueue.msg_max", "20"),
                ("net/ipv4/conf/eth0.100/rp_filter", "0"),
                ("kernel.domainname", "example"),
            ]),
            &HostNamespaces::default(),
        )
        .unwrap();
        let by_name = |n: &str| p.iter().find(|s| s.name == n).unwrap();
        assert_eq!(
            by_name("net.ipv4.ip_unprivileged_port_start").path,
            PathBuf::from("net/ipv4/ip_unprivileged_port_start")
        );
        assert_eq!(by_name("kernel.shmmni").namespace, SysctlNamespace::Ipc);
        assert_eq!(by_name("fs.mqueue.msg_max").namespace, SysctlNamespace::Ipc);
        assert_eq!(by_name("kernel.domainname").namespace, SysctlNamespace::Uts);
        let vlan = by_name("net/ipv4/conf/eth0.100/rp_filter");
        assert_eq!(vlan.path, PathBuf::from("net/ipv4/conf/eth0.100/rp_filter"));
        assert_eq!(vlan.namespace, SysctlNamespace::Net);
    }

    #[test]
    fn node_wide_and_host_namespace_sysctls_are_refused() {
        let none = HostNamespaces::default();
        for bad in ["vm.swappiness", "kernel.pid_max", "net..x", "net/../../etc"] {
            let e = plan(&map(&[(bad, "1")]), &none).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let host_net = HostNamespaces {
            network: true,
            ..Default::default()
        };
        assert!(plan(&map(&[("net.ipv4.ip_forward", "1")]), &host_net).is_err());
        assert!(plan(&map(&[("kernel.shmmax", "1")]), &host_net).is_ok());
        let host_ipc = HostNamespaces {
            ipc: true,
            ..Default::default()
        };
        assert!(plan(&map(&[("kernel.shmmax", "1")]), &host_ipc).is_err());
        assert!(plan(&map(&[("net.core.somaxconn", "1\n2")]), &none).is_err());
    }
}
