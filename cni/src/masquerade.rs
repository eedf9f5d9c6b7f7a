//! Masquerade of pod egress leaving the network's pod CIDRs, in the node's namespace.
//!
//! nftables first: one `keel-cni` table per family holding a verdict map from source subnet to a
//! per-network chain (`return` for the pod CIDRs and multicast, else `masquerade`). The script is
//! idempotent (tables/chains declared, chains flushed and refilled in one atomic transaction), so
//! every ADD may run it. iptables (`KEEL-CNI-<id>` chain in `nat`) when `nft` is absent or the
//! config asks for it. The rules are per network, not per pod: DEL has nothing to remove.
//! Applied through the `nft` / `iptables` binaries: no maintained Rust crate speaks nf_tables
//! without libnftnl.

use ipnet::IpNet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::config::Network;

/// Masquerade failures.
#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    /// Neither nft nor iptables is installed.
    #[error("ipMasq needs nft or iptables, found neither in PATH, /usr/sbin or /sbin")]
    NoBackend,
    /// The tool could not be run.
    #[error("running {tool}: {source}")]
    Spawn {
        /// Binary.
        tool: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The tool refused the rules.
    #[error("{tool} failed: {stderr}")]
    Failed {
        /// Binary.
        tool: String,
        /// Its stderr.
        stderr: String,
    },
}

impl MasqueradeError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        crate::protocol::code::MASQUERADE_FAILURE
    }
}

/// Short stable id of a network, usable in chain names.
pub fn network_id(name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The pod subnets of a network, per family (v4, v6).
pub fn subnets(net: &Network) -> (Vec<IpNet>, Vec<IpNet>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for r in net.range_sets.iter().flatten() {
        let list = if r.subnet.addr().is_ipv4() {
            &mut v4
        } else {
            &mut v6
        };
        if !list.contains(&r.subnet) {
            list.push(r.subnet);
        }
    }
    (v4, v6)
}

/// The nft script for one network.
pub fn nft_script(net: &Network) -> String {
    let id = network_id(&net.name);
    let (v4, v6) = subnets(net);
    let mut s = String::new();
    for (family, addr_type, mcast, nets) in [
        ("ip", "ipv4_addr", "224.0.0.0/4", v4),
        ("ip6", "ipv6_addr", "ff00::/8", v6),
    ] {
        if nets.is_empty() {
            continue;
        }
        let saddr = if family == "ip" { "ip" } else { "ip6" };
        s += &format!(
            "table {family} keel-cni {{\n  map masq-nets {{ type {addr_type} : verdict; flags interval; }}\n  \
             chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n  chain net-{id} {{}}\n}}\n"
        );
        s += &format!("flush chain {family} keel-cni postrouting\n");
        s += &format!("add rule {family} keel-cni postrouting {saddr} saddr vmap @masq-nets\n");
        s += &format!("flush chain {family} keel-cni net-{id}\n");
        for n in &nets {
            s += &format!("add rule {family} keel-cni net-{id} {saddr} daddr {n} return\n");
        }
        s += &format!("add rule {family} keel-cni net-{id} {saddr} daddr {mcast} return\n");
        s += &format!("add rule {family} keel-cni net-{id} masquerade\n");
        for n in &nets {
            s += &format!("add element {family} keel-cni masq-nets {{ {n} : jump net-{id} }}\n");
        }
    }
    s
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin"]
                .into_iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(tool: &PathBuf, args: &[&str], stdin: Option<&str>) -> Result<(), MasqueradeError> {
    let name = tool.display().to_string();
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| MasqueradeError::Spawn {
            tool: name.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| MasqueradeError::Spawn {
                tool: name.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| MasqueradeError::Spawn {
            tool: name.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqueradeError::Failed {
            tool: name,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Installs (or refreshes) the network's masquerade rules.
pub fn ensure(net: &Network) -> Result<(), MasqueradeError> {
    let want_iptables = net.ip_masq_backend.as_deref() == Some("iptables");
    if !want_iptables && let Some(nft) = find_tool("nft") {
        return run(&nft, &["-f", "-"], Some(&nft_script(net)));
    }
    let (v4, v6) = subnets(net);
    let chain = format!("KEEL-CNI-{}", network_id(&net.name));
    for (tool, nets, mcast) in [
        ("iptables", v4, "224.0.0.0/4"),
        ("ip6tables", v6, "ff00::/8"),
    ] {
        if nets.is_empty() {
            continue;
        }
        let bin = find_tool(tool).ok_or(MasqueradeError::NoBackend)?;
        // -N fails when the chain exists: fine, it is flushed and refilled next.
        let _ = run(&bin, &["-w", "-t", "nat", "-N", &chain], None);
        run(&bin, &["-w", "-t", "nat", "-F", &chain], None)?;
        for n in &nets {
            run(
                &bin,
                &[
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    &chain,
                    "-d",
                    &n.to_string(),
                    "-j",
                    "RETURN",
                ],
                None,
            )?;
        }
        run(
            &bin,
            &["-w", "-t", "nat", "-A", &chain, "-d", mcast, "-j", "RETURN"],
            None,
        )?;
        run(
            &bin,
            &["-w", "-t", "nat", "-A", &chain, "-j", "MASQUERADE"],
            None,
        )?;
        for n in &nets {
            let rule = ["-s", &n.to_string(), "-j", &chain].map(str::to_string);
            let mut check = vec!["-w", "-t", "nat", "-C", "POSTROUTING"];
            check.extend(rule.iter().map(String::as_str));
            if run(&bin, &check, None).is_err() {
                let mut add = vec!["-w", "-t", "nat", "-A", "POSTROUTING"];
                add.extend(rule.iter().map(String::as_str));
                run(&bin, &add, None)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_covers_both_families() {
        let j = r#"{"cniVersion":"1.1.0","name":"pods","type":"keel-cni","ipMasq":true,
            "ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"fd00::/64"}]]}}"#;
        let n = crate::config::validate(crate::config::parse(j.as_bytes()).unwrap()).unwrap();
        let s = nft_script(&n);
        let id = network_id("pods");
        assert!(s.contains(&format!(
            "add rule ip keel-cni net-{id} ip daddr 10.0.0.0/24 return"
        )));
        assert!(s.contains(&format!(
            "add element ip keel-cni masq-nets {{ 10.0.0.0/24 : jump net-{id} }}"
        )));
        assert!(s.contains(&format!(
            "add rule ip6 keel-cni net-{id} ip6 daddr fd00::/64 return"
        )));
        assert!(s.contains("ip6 saddr vmap @masq-nets"));
        assert_eq!(s.matches("masquerade\n").count(), 2);
    }
}
