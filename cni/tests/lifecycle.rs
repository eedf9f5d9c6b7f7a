//! Privileged: nothing leaks. 500 ADD/DEL cycles end with zero allocations, veths or pod
//! addresses; a plugin killed with SIGKILL at any point of ADD leaves only what GC reclaims.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{BIN, Node};
use keel_testkit::{NetnsGuard, privileged};

#[test]
fn five_hundred_add_del_cycles_leave_nothing() -> anyhow::Result<()> {
    if !privileged("five_hundred_add_del_cycles_leave_nothing") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.101.0.0/24", Some("fd00:101::/64"));
    let pod = NetnsGuard::new()?;
    // As a runtime drives it: the next ADD follows DEL's answer, not the background deletion.
    for i in 0..500 {
        let cid = format!("cycle-{i}");
        node.add(&cid, &pod, &conf)?;
        node.del_nowait(&cid, Some(&pod), &conf)?;
    }
    node.settle()?;
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.veths()?.is_empty());
    let addrs = pod.exec("ip", &["-o", "addr", "show", "scope", "global"])?;
    assert!(
        addrs.trim().is_empty(),
        "addresses left in the pod: {addrs}"
    );
    let links = pod.exec("ip", &["-o", "link", "show"])?;
    assert_eq!(links.lines().count(), 1, "only lo should remain: {links}");
    Ok(())
}

fn spawn_add(
    node: &Node,
    cid: &str,
    pod: &NetnsGuard,
    conf: &serde_json::Value,
    stall: Option<&str>,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = node.host.command(BIN);
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(s) = stall {
        cmd.env("KEEL_CNI_STALL_AT", s);
    }
    let mut child = cmd.spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(conf.to_string().as_bytes())?;
    Ok(child)
}

/// `ip netns exec` forks the plugin: kill the whole process group is not ours to do, so find
/// the plugin (the exec'd child keeps the pid: `ip netns exec` execs in place) and SIGKILL it.
fn kill9(child: &mut std::process::Child) -> anyhow::Result<()> {
    keel_testkit::run("kill", &["-9", &child.id().to_string()])?;
    let _ = child.wait();
    Ok(())
}

#[test]
fn sigkill_during_add_then_gc_leaves_nothing() -> anyhow::Result<()> {
    if !privileged("sigkill_during_add_then_gc_leaves_nothing") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.102.0.0/24", Some("fd00:102::/64"));
    let mut pods = Vec::new();
    // Deterministic: stalled right after allocation, and right after the veth exists.
    for (i, stall) in ["allocated", "veth"].into_iter().enumerate() {
        let pod = NetnsGuard::new()?;
        let mut child = spawn_add(&node, &format!("stall-{i}"), &pod, &conf, Some(stall))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let reached = |node: &Node| match stall {
            "allocated" => {
                node.allocations()
                    .iter()
                    .filter(|a| !a.starts_with(".tmp"))
                    .count()
                    >= 2 * (i + 1)
            }
            _ => node.veths().map(|v| !v.is_empty()).unwrap_or(false),
        };
        while !reached(&node) {
            anyhow::ensure!(Instant::now() < deadline, "plugin never reached {stall}");
            std::thread::sleep(Duration::from_millis(5));
        }
        kill9(&mut child)?;
        pods.push(pod);
    }
    // Random points: kill after 0..8 ms.
    for i in 0..20u64 {
        let pod = NetnsGuard::new()?;
        let mut child = spawn_add(&node, &format!("rand-{i}"), &pod, &conf, None)?;
        std::thread::sleep(Duration::from_micros(i * 400));
        kill9(&mut child)?;
        pods.push(pod);
    }
    assert!(
        !node.allocations().is_empty(),
        "the stalled ADDs left allocations for GC to find"
    );
    let r = node.gc(&conf, &[])?;
    assert!(r.ok, "{}", r.raw);
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.veths()?.is_empty(), "{:?}", node.veths()?);
    for pod in &pods {
        let links = pod.exec("ip", &["-o", "link", "show"])?;
        assert_eq!(
            links.lines().count(),
            1,
            "pod {} kept an interface: {links}",
            pod.name()
        );
    }
    // And the network still works afterwards.
    let fresh = NetnsGuard::new()?;
    node.add("after", &fresh, &conf)?;
    node.del("after", Some(&fresh), &conf)?;
    Ok(())
}
