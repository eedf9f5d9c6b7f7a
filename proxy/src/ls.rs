//! `keel proxy ls`: services, backends and counters read straight from the pinned maps, so it
//! shows what the kernel does, whether or not a proxy is running.

use std::fmt::Write as _;
use std::path::Path;

use keel_ebpf::{BE_F_TERMINATING, proto_name};

use crate::maps::{MapsError, PinnedMaps};

fn fmt_addr(ip: Option<std::net::IpAddr>, port: u16) -> String {
    match ip {
        Some(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Some(v4) => format!("{v4}:{port}"),
        None => format!("?:{port}"),
    }
}

/// The listing as printed.
pub fn list(bpffs_dir: &Path) -> Result<String, MapsError> {
    let maps = PinnedMaps::open(bpffs_dir)?;
    let (applied, _) = maps.dump()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<5} {:>5} {:>8} {:>10} {:>10} {:>8}  AFFINITY",
        "SERVICE", "PROTO", "ID", "BACKENDS", "CONNECTS", "DATAGRAMS", "REFUSED"
    );
    for (key, svc) in &applied.services {
        let st = maps.stats(svc.val.svc_id)?;
        let affinity = if svc.val.affinity_timeout > 0 {
            format!("ClientIP {}s", svc.val.affinity_timeout)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<28} {:<5} {:>5} {:>8} {:>10} {:>10} {:>8}  {affinity}",
            fmt_addr(key.ip(), key.host_port()),
            proto_name(key.proto),
            svc.val.svc_id,
            format!("{}+{}", svc.val.ready, svc.val.terminating),
            st.connects,
            st.datagrams,
            st.refused,
        );
        for id in &svc.slots {
            if let Some(be) = svc.backends.get(id) {
                let state = if be.flags & BE_F_TERMINATING != 0 {
                    "terminating"
                } else {
                    "ready"
                };
                let _ = writeln!(
                    out,
                    "  -> {:<24} {state}",
                    fmt_addr(be.ip(), be.host_port())
                );
            }
        }
    }
    let fill = maps.fill();
    let parts: Vec<String> = fill
        .entries
        .iter()
        .map(|(m, n)| format!("{m}={n}"))
        .collect();
    let _ = writeln!(out, "maps: {}", parts.join(" "));
    Ok(out)
}
