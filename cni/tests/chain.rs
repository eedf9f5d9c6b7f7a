//! Privileged: keel-cni first in a conflist chain with Debian's reference `portmap` and
//! `bandwidth` after it (containernetworking-plugins in /usr/lib/cni), driven the way a runtime
//! drives a chain: each plugin gets the previous result as `prevResult`; DEL runs in reverse.

mod common;

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::{Env, Node, Reply, invoke_bin};
use keel_testkit::{NetnsGuard, privileged};
use serde_json::{Value, json};

const REF_DIR: &str = "/usr/lib/cni";

/// Debian leaves iptables' alternatives unconfigured on some images: give the reference plugins
/// `iptables` names pointing at the nft-backed multi-call binary, in a directory of our own.
fn iptables_path(node: &Node) -> anyhow::Result<String> {
    let dir = node.state.subdir("bin")?;
    let multi = Path::new("/usr/sbin/xtables-nft-multi");
    for name in [
        "iptables",
        "ip6tables",
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(multi, &link)
                .with_context(|| format!("symlink {}", link.display()))?;
        }
    }
    Ok(format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.display()))
}

struct Chain<'a> {
    node: &'a Node,
    list: Value,
    path: String,
}

impl Chain<'_> {
    fn plugin_bin(&self, ty: &str) -> PathBuf {
        if ty == "keel-cni" {
            PathBuf::from(common::BIN)
        } else {
            Path::new(REF_DIR).join(ty)
        }
    }

    fn conf_for(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = self.list["name"].clone();
        c["cniVersion"] = self.list["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn run(
        &self,
        command: &str,
        plugin: &Value,
        pod: &NetnsGuard,
        prev: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let bin = self.plugin_bin(ty);
        let env = Env {
            command,
            container_id: "chained",
            netns: Some(&pod.path()),
            ifname: "eth0",
            args: None,
        };
        invoke_bin(
            bin.to_str().unwrap_or_default(),
            &self.node.host,
            &env,
            &self.conf_for(plugin, prev),
            &[("PATH", &self.path)],
        )
    }

    fn add(&self, pod: &NetnsGuard) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for p in self.list["plugins"].as_array().into_iter().flatten() {
            let r = self.run("ADD", p, pod, prev.as_ref())?;
            anyhow::ensure!(r.ok, "ADD {}: {}", p["type"], r.raw);
            prev = Some(r.json);
        }
        prev.context("empty chain")
    }

    fn del(&self, pod: &NetnsGuard, result: &Value) -> anyhow::Result<()> {
        for p in self.list["plugins"].as_array().into_iter().flatten().rev() {
            let r = self.run("DEL", p, pod, Some(result))?;
            anyhow::ensure!(r.ok, "DEL {}: {}", p["type"], r.raw);
        }
        Ok(())
    }
}

#[test]
fn chained_with_reference_portmap_and_bandwidth() -> anyhow::Result<()> {
    if !privileged("chained_with_reference_portmap_and_bandwidth") {
        return Ok(());
    }
    for bin in ["portmap", "bandwidth"] {
        anyhow::ensure!(
            Path::new(REF_DIR).join(bin).exists(),
            "{REF_DIR}/{bin} missing: install containernetworking-plugins"
        );
    }
    let node = Node::new()?;
    let mut keel = node.conf("10.103.0.0/24", None);
    keel.as_object_mut().map(|o| {
        o.remove("cniVersion");
        o.remove("name")
    });
    let list = json!({
        "cniVersion": "1.0.0",
        "name": node.name,
        "plugins": [
            keel,
            {"type": "portmap", "capabilities": {"portMappings": true},
             "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true},
             "runtimeConfig": {"bandwidth": {"ingressRate": 100000000, "ingressBurst": 10000000}}}
        ]
    });
    let chain = Chain {
        node: &node,
        path: iptables_path(&node)?,
        list,
    };
    let pod = NetnsGuard::new()?;
    let result = chain.add(&pod)?;
    // Our interfaces and address survived the chain.
    assert_eq!(result["interfaces"][2]["name"], "eth0");
    let pod_ip = common::addr_of(&result, true);
    // The hostPort on the node's gateway address reaches the pod's port.
    let sns = keel_cni::netns::open(&pod.path())?;
    use std::os::fd::AsFd;
    let listener =
        keel_cni::netns::run_in(sns.as_fd(), || std::net::TcpListener::bind((pod_ip, 8080)))??;
    let srv = std::thread::spawn(move || -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let (mut s, peer) = listener.accept()?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        s.write_all(b"pong")?;
        Ok(peer.to_string())
    });
    let client = node.host.exec(
        "bash",
        &[
            "-c",
            "exec 3<>/dev/tcp/10.103.0.1/18080; printf ping >&3; head -c4 <&3",
        ],
    )?;
    assert_eq!(client, "pong");
    srv.join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    // bandwidth put a qdisc on our host veth.
    let host_veth = result["interfaces"][1]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let tc = node
        .host
        .exec("tc", &["qdisc", "show", "dev", &host_veth])?;
    assert!(tc.contains("tbf"), "{tc}");
    chain.del(&pod, &result)?;
    chain.del(&pod, &result)?;
    assert!(node.allocations().is_empty());
    assert!(node.veths()?.is_empty());
    let nat = node.host.exec("nft", &["list", "ruleset"])?;
    assert!(!nat.contains("dport 18080"), "portmap rules left: {nat}");
    Ok(())
}
