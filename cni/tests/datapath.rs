//! Privileged: the plugin invoked as a CNI runtime invokes it, against namespaces the test makes.
//! Two pods on one bridge talk TCP both ways over IPv4 and IPv6; DEL is idempotent; CHECK sees a
//! deleted interface; STATUS; GC; invalid input leaves no state.

mod common;

use common::{Node, addr_of, tcp_exchange};
use keel_testkit::{NetnsGuard, privileged};
use serde_json::json;

#[test]
fn two_pods_exchange_tcp_v4_and_v6() -> anyhow::Result<()> {
    if !privileged("two_pods_exchange_tcp_v4_and_v6") {
        return Ok(());
    }
    let node = Node::new()?;
    let (a, b) = (NetnsGuard::new()?, NetnsGuard::new()?);
    let conf = node.conf("10.91.0.0/24", Some("fd00:91::/64"));
    let ra = node.add("pod-a", &a, &conf)?;
    let rb = node.add("pod-b", &b, &conf)?;
    // 1.1 result fields.
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][2]["name"], "eth0");
    assert_eq!(ra["interfaces"][2]["mtu"], 1450);
    assert_eq!(
        ra["interfaces"][2]["sandbox"],
        a.path().display().to_string()
    );
    assert_eq!(ra["ips"][0]["gateway"], "10.91.0.1");
    assert_eq!(ra["routes"][1]["dst"], "::/0");
    for v4 in [true, false] {
        tcp_exchange(&a, &b, addr_of(&ra, v4))?;
        tcp_exchange(&b, &a, addr_of(&rb, v4))?;
    }
    // Gateway, hairpin and masquerade are in place on the node.
    let br = node.host.exec("ip", &["addr", "show", "kbr0"])?;
    assert!(
        br.contains("10.91.0.1/24") && br.contains("fd00:91::1/64"),
        "{br}"
    );
    let veth = ra["interfaces"][1]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let detail = node.host.exec("ip", &["-d", "link", "show", &veth])?;
    assert!(detail.contains("hairpin on"), "{detail}");
    let nft = node
        .host
        .exec("nft", &["list", "table", "ip", "keel-cni"])?;
    assert!(
        nft.contains("masquerade") && nft.contains("10.91.0.0/24"),
        "{nft}"
    );
    node.del("pod-a", Some(&a), &conf)?;
    node.del("pod-b", Some(&b), &conf)?;
    assert!(node.allocations().is_empty());
    assert!(node.veths()?.is_empty());
    Ok(())
}

#[test]
fn del_twice_is_fine_and_needs_no_netns() -> anyhow::Result<()> {
    if !privileged("del_twice_is_fine_and_needs_no_netns") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.92.0.0/24", None);
    let pod = NetnsGuard::new()?;
    node.add("c1", &pod, &conf)?;
    node.del("c1", Some(&pod), &conf)?;
    node.del("c1", Some(&pod), &conf)?;
    // Again with the namespace gone, as after a runtime crash.
    let pod2 = NetnsGuard::new()?;
    node.add("c2", &pod2, &conf)?;
    drop(pod2);
    node.del("c2", None, &conf)?;
    node.del("c2", None, &conf)?;
    assert!(node.allocations().is_empty());
    assert!(node.veths()?.is_empty());
    Ok(())
}

#[test]
fn add_is_idempotent_per_attachment() -> anyhow::Result<()> {
    if !privileged("add_is_idempotent_per_attachment") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.93.0.0/24", Some("fd00:93::/64"));
    let pod = NetnsGuard::new()?;
    let r1 = node.add("c1", &pod, &conf)?;
    let r2 = node.add("c1", &pod, &conf)?;
    assert_eq!(r1["ips"], r2["ips"]);
    assert_eq!(node.allocations().len(), 2);
    assert_eq!(node.veths()?.len(), 1);
    node.del("c1", Some(&pod), &conf)?;
    Ok(())
}

#[test]
fn check_reports_a_deleted_interface() -> anyhow::Result<()> {
    if !privileged("check_reports_a_deleted_interface") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.94.0.0/24", Some("fd00:94::/64"));
    let pod = NetnsGuard::new()?;
    let result = node.add("c1", &pod, &conf)?;
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result;
    let ok = node.invoke("CHECK", "c1", Some(&pod.path()), "eth0", &with_prev)?;
    assert!(ok.ok, "CHECK on a healthy attachment: {}", ok.raw);
    pod.exec("ip", &["link", "del", "eth0"])?;
    let bad = node.invoke("CHECK", "c1", Some(&pod.path()), "eth0", &with_prev)?;
    assert!(!bad.ok);
    assert_eq!(bad.code(), 104, "{}", bad.raw);
    // Without prevResult CHECK is a config error.
    let e = node.invoke("CHECK", "c1", Some(&pod.path()), "eth0", &conf)?;
    assert_eq!(e.code(), 7, "{}", e.raw);
    node.del("c1", Some(&pod), &conf)?;
    Ok(())
}

#[test]
fn status_and_exhaustion() -> anyhow::Result<()> {
    if !privileged("status_and_exhaustion") {
        return Ok(());
    }
    let node = Node::new()?;
    // A /30: .1 is the gateway, .2 the only pod address.
    let conf = node.conf("10.95.0.0/30", None);
    let st = node.invoke("STATUS", "", None, "", &conf)?;
    assert!(st.ok, "{}", st.raw);
    let (p1, p2) = (NetnsGuard::new()?, NetnsGuard::new()?);
    node.add("c1", &p1, &conf)?;
    let st = node.invoke("STATUS", "", None, "", &conf)?;
    assert_eq!(st.code(), 50, "{}", st.raw);
    let full = node.invoke("ADD", "c2", Some(&p2.path()), "eth0", &conf)?;
    assert_eq!(full.code(), 100, "{}", full.raw);
    assert_eq!(node.veths()?.len(), 1, "failed ADD left a veth");
    assert!(
        p2.exec("ip", &["link", "show", "eth0"]).is_err(),
        "failed ADD left eth0 in the pod"
    );
    node.del("c1", Some(&p1), &conf)?;
    assert!(node.invoke("STATUS", "", None, "", &conf)?.ok);
    Ok(())
}

#[test]
fn gc_frees_a_leaked_allocation_and_veth() -> anyhow::Result<()> {
    if !privileged("gc_frees_a_leaked_allocation_and_veth") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.96.0.0/24", Some("fd00:96::/64"));
    let (keep, leak) = (NetnsGuard::new()?, NetnsGuard::new()?);
    let rk = node.add("keep", &keep, &conf)?;
    node.add("leak", &leak, &conf)?;
    assert_eq!(node.allocations().len(), 4);
    let r = node.gc(&conf, &["keep"])?;
    assert!(r.ok, "{}", r.raw);
    assert_eq!(node.allocations().len(), 2);
    assert_eq!(node.veths()?.len(), 1);
    assert!(
        leak.exec("ip", &["link", "show", "eth0"]).is_err(),
        "leaked pod side removed with its host end"
    );
    // The kept pod still works: talk to it from the node.
    let gw_side = node.host.exec(
        "ip",
        &[
            "link",
            "show",
            rk["interfaces"][1]["name"].as_str().unwrap_or("-"),
        ],
    )?;
    assert!(gw_side.contains("UP"));
    let r = node.gc(&conf, &[])?;
    assert!(r.ok);
    assert!(node.allocations().is_empty());
    assert!(node.veths()?.is_empty());
    // GC without the list is refused rather than freeing everything.
    assert_eq!(node.invoke("GC", "", None, "", &conf)?.code(), 7);
    Ok(())
}

#[test]
fn invalid_input_gives_codes_and_no_state() -> anyhow::Result<()> {
    if !privileged("invalid_input_gives_codes_and_no_state") {
        return Ok(());
    }
    let node = Node::new()?;
    let pod = NetnsGuard::new()?;
    let good = node.conf("10.97.0.0/24", None);
    let add = |conf: &serde_json::Value| node.invoke("ADD", "c1", Some(&pod.path()), "eth0", conf);
    // Bad JSON.
    let r = common::invoke_bin(
        common::BIN,
        &node.host,
        &common::Env {
            command: "ADD",
            container_id: "c1",
            netns: Some(&pod.path()),
            ifname: "eth0",
            args: None,
        },
        &serde_json::Value::String("{not json".into()),
        &[],
    )?;
    assert_eq!(r.code(), 6, "{}", r.raw);
    let mut unknown = good.clone();
    unknown["type"] = json!("bridge");
    assert_eq!(add(&unknown)?.code(), 7);
    let mut overlap = good.clone();
    overlap["ipam"]["ranges"] = json!([[{"subnet": "10.97.0.0/16"}], [{"subnet": "10.97.5.0/24"}]]);
    let r = add(&overlap)?;
    assert_eq!(r.code(), 7);
    assert!(
        r.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("overlap"),
        "{}",
        r.raw
    );
    let r = node.invoke(
        "ADD",
        "c1",
        Some(std::path::Path::new("/run/netns/keel-no-such-ns")),
        "eth0",
        &good,
    )?;
    assert_eq!(r.code(), 3, "{}", r.raw);
    let r = node.invoke("ADD", "c1", Some(&pod.path()), "eth0/../x", &good)?;
    assert_eq!(r.code(), 4, "{}", r.raw);
    let r = node.invoke("ADD", "c1", Some(&pod.path()), "lo", &good)?;
    assert_eq!(r.code(), 4, "ifname already used in the pod: {}", r.raw);
    let mut v = good.clone();
    v["cniVersion"] = json!("0.2.0");
    assert_eq!(add(&v)?.code(), 1);
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.veths()?.is_empty());
    Ok(())
}

#[test]
fn requested_ip_and_older_result_versions() -> anyhow::Result<()> {
    if !privileged("requested_ip_and_older_result_versions") {
        return Ok(());
    }
    let node = Node::new()?;
    let mut conf = node.conf("10.98.0.0/24", None);
    conf["cniVersion"] = json!("0.4.0");
    conf["runtimeConfig"] = json!({"ips": ["10.98.0.42/24"]});
    let pod = NetnsGuard::new()?;
    let r = node.add("c1", &pod, &conf)?;
    assert_eq!(r["cniVersion"], "0.4.0");
    assert_eq!(r["ips"][0]["address"], "10.98.0.42/24");
    assert_eq!(r["ips"][0]["version"], "4");
    assert!(r["interfaces"][2].get("mtu").is_none());
    node.del("c1", Some(&pod), &conf)?;
    // CNI_ARGS IP= as well.
    let mut plain = node.conf("10.98.0.0/24", None);
    plain["cniVersion"] = json!("1.0.0");
    let env = common::Env {
        command: "ADD",
        container_id: "c2",
        netns: Some(&pod.path()),
        ifname: "eth0",
        args: Some("IgnoreUnknown=1;IP=10.98.0.43"),
    };
    let r = common::invoke_bin(common::BIN, &node.host, &env, &plain, &[])?;
    assert!(r.ok, "{}", r.raw);
    assert_eq!(r.json["ips"][0]["address"], "10.98.0.43/24");
    node.del("c2", Some(&pod), &plain)?;
    Ok(())
}

#[test]
fn del_cuts_the_pod_off_at_once_and_finishes_in_the_background() -> anyhow::Result<()> {
    if !privileged("del_cuts_the_pod_off_at_once_and_finishes_in_the_background") {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf("10.97.0.0/24", None);
    let (a, b) = (NetnsGuard::new()?, NetnsGuard::new()?);
    let ra = node.add("a", &a, &conf)?;
    node.add("b", &b, &conf)?;
    tcp_exchange(&a, &b, addr_of(&ra, true))?;
    let host_if = ra["interfaces"][1]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    node.del_nowait("a", Some(&a), &conf)?;
    // Right after the answer the host end is down or already gone: the pod is cut off.
    let shown = node.host.exec("ip", &["-o", "link", "show"])?;
    if let Some(line) = shown.lines().find(|l| l.contains(&format!(" {host_if}@"))) {
        assert!(!line.contains(",UP"), "host end still up after DEL: {line}");
    }
    // An immediate re-ADD of the same attachment waits for the old deletion, then works.
    let ra = node.add("a", &a, &conf)?;
    tcp_exchange(&a, &b, addr_of(&ra, true))?;
    // A new container in the same namespace under the same ifname, right after DEL.
    node.del_nowait("a", Some(&a), &conf)?;
    let ra2 = node.add("a2", &a, &conf)?;
    tcp_exchange(&a, &b, addr_of(&ra2, true))?;
    node.del_nowait("a2", Some(&a), &conf)?;
    node.del_nowait("b", Some(&b), &conf)?;
    node.settle()?;
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.veths()?.is_empty(), "{:?}", node.veths()?);

    // syncDelete: everything is gone when DEL answers.
    let mut sync = conf.clone();
    sync["syncDelete"] = true.into();
    node.add("s", &a, &sync)?;
    node.del_nowait("s", Some(&a), &sync)?;
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.veths()?.is_empty(), "{:?}", node.veths()?);
    Ok(())
}
