//! The NodePort topology shared by the tc/XDP NodePort and hostPort tests: an "external"
//! namespace (10.88.0.1 on `e0`) wired to a "node" namespace (10.88.0.2 on `n0`, the node's
//! external interface; 10.89.0.1 on `n1`) wired to a "backend" namespace (a pod: 10.89.0.2 on
//! `eth0`, MAC `BACKEND_MAC`, default route via the node). The node forwards and accepts its own
//! address as the source of reverse-NATed replies. A bpffs under a state root and a cgroup v2
//! directory for the proxy's pins and socket hooks. Addresses exist only inside these
//! namespaces; everything is removed on drop, even when the test fails (the proxy's programs
//! and pins first).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use keel_proxy::ProxyConfig;
use keel_proxy::model::NodeContext;
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, VethPair};

pub const EXT_IP: &str = "10.88.0.1";
pub const NODE_IP: &str = "10.88.0.2";
/// The node's address on the backend side (the source of its own connections to the pod).
pub const NODE_POD_SIDE_IP: &str = "10.89.0.1";
pub const BACKEND_IP: &str = "10.89.0.2";
pub const BACKEND_MAC: &str = "02:00:00:00:89:02";

/// Fields drop in order: links, then namespaces, then the cgroup, then the state root (which
/// unmounts the bpffs).
pub struct NodeNet {
    _v2: VethPair,
    _v1: VethPair,
    pub backend: NetnsGuard,
    pub node: NetnsGuard,
    pub ext: NetnsGuard,
    pub cgroup: CgroupGuard,
    pub pins: PathBuf,
    pub root: StateRoot,
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        // The loader's uninstall, not the proxy's: that one also looks for the masquerade rule
        // in the test's own namespace, and these tests touch nothing outside the ones they made.
        let _ = keel_proxy::loader::uninstall(&self.bpffs_dir());
    }
}

impl NodeNet {
    pub fn new() -> Result<NodeNet> {
        let root = StateRoot::new()?;
        let pins = root.subdir("bpffs")?;
        keel_testkit::run(
            "mount",
            &["-t", "bpf", "bpf", pins.to_str().context("path")?],
        )?;
        let cgroup = CgroupGuard::new()?;
        cgroup
            .v2_path()
            .context("no cgroup v2 hierarchy on this host")?;
        let ext = NetnsGuard::new()?;
        let node = NetnsGuard::new()?;
        let backend = NetnsGuard::new()?;
        let v1 = VethPair::between(&ext, "e0", &node, "n0")?;
        let v2 = VethPair::between(&node, "n1", &backend, "eth0")?;
        ext.exec("ip", &["addr", "add", &format!("{EXT_IP}/24"), "dev", "e0"])?;
        ext.exec("ip", &["link", "set", "e0", "up"])?;
        node.exec(
            "ip",
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", "n0"],
        )?;
        node.exec(
            "ip",
            &[
                "addr",
                "add",
                &format!("{NODE_POD_SIDE_IP}/24"),
                "dev",
                "n1",
            ],
        )?;
        node.exec("ip", &["link", "set", "n0", "up"])?;
        node.exec("ip", &["link", "set", "n1", "up"])?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // Reverse-NATed replies carry the node's own address as source when they are routed on.
        for k in [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.n1.rp_filter=0",
            "net.ipv4.conf.n1.accept_local=1",
        ] {
            node.exec("sysctl", &["-qw", k])?;
        }
        backend.exec("ip", &["link", "set", "eth0", "address", BACKEND_MAC])?;
        backend.exec(
            "ip",
            &["addr", "add", &format!("{BACKEND_IP}/24"), "dev", "eth0"],
        )?;
        backend.exec("ip", &["link", "set", "eth0", "up"])?;
        backend.exec("ip", &["route", "add", "default", "via", NODE_POD_SIDE_IP])?;
        Ok(NodeNet {
            _v2: v2,
            _v1: v1,
            backend,
            node,
            ext,
            cgroup,
            pins,
            root,
        })
    }

    pub fn bpffs_dir(&self) -> PathBuf {
        self.pins.join("keel")
    }

    /// The proxy for the file source `manifests`, NodePorts on `NODE_IP`, the tc programs on
    /// `tc_interfaces` of the node namespace, the socket hooks on the test's cgroup.
    pub fn config(&self, manifests: &Path, tc_interfaces: &[&str]) -> Result<ProxyConfig> {
        Ok(ProxyConfig {
            manifests: manifests.to_owned(),
            cgroup: self.cgroup.v2_path().context("cgroup v2")?.to_owned(),
            bpffs_dir: self.bpffs_dir(),
            healthz_addr: "127.0.0.1:0".parse()?,
            metrics_addr: None,
            poll_interval: Duration::from_millis(50),
            node: NodeContext {
                node_name: None,
                node_ips: vec![NODE_IP.parse()?],
            },
            tc_interfaces: tc_interfaces.iter().map(|s| s.to_string()).collect(),
            tc_netns: Some(self.node.path()),
        })
    }
}
