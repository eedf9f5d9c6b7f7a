//! The masquerade rule of the tc NodePort path: flows the tc program marks with
//! `keel_ebpf::MARK_SNAT` (services without externalTrafficPolicy=Local) leave the node with its
//! address as their source, so that a backend on another node replies through this one, where
//! conntrack undoes the masquerade and the egress program the DNAT. One netfilter rule per
//! network namespace (nat POSTROUTING), through the `iptables` binary (Debian's is the nf_tables
//! flavour); added once, idempotently.

use std::path::Path;
use std::process::Command;

/// The rule's match and target, after the chain.
fn rule() -> Vec<String> {
    let mark = format!("{0:#x}/{0:#x}", keel_ebpf::MARK_SNAT);
    [
        "-m",
        "mark",
        "--mark",
        &mark,
        "-m",
        "comment",
        "--comment",
        "keel-proxy: NodePort flows to backends",
        "-j",
        "MASQUERADE",
    ]
    .map(str::to_string)
    .to_vec()
}

fn iptables(netns: Option<&Path>, op: &str) -> Result<(), String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("--");
            c.arg("iptables");
            c
        }
        None => Command::new("iptables"),
    };
    cmd.args(["-w", "-t", "nat", op, "POSTROUTING"])
        .args(rule());
    let out = cmd.output().map_err(|e| format!("run iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Adds the rule in `netns` (default: ours) unless it is there.
pub fn ensure(netns: Option<&Path>) -> Result<(), String> {
    if iptables(netns, "-C").is_ok() {
        return Ok(());
    }
    iptables(netns, "-A")
}

/// Removes the rule from our namespace, if there.
pub fn remove() {
    while iptables(None, "-D").is_ok() {}
}
