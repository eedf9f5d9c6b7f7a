//! PodSandboxStats: the pod cgroup's CPU, memory and process count, its running containers'
//! stats, and the network counters of the pod's interfaces (read from `/proc/net/dev` by a
//! thread inside the pod's network namespace).

use std::path::Path;

use keel_runtime::container::Status;
use keel_runtime::container::cgroups;
use keel_runtime::pod::{PodError, PodInfo};

use crate::container_stats::stats_of;
use crate::service::{CriService, blocking};
use crate::{CriError, api, pod_convert};

fn u64v(value: u64) -> Option<api::UInt64Value> {
    Some(api::UInt64Value { value })
}

/// Interfaces of a `/proc/net/dev` text: (name, rx bytes, rx errors, tx bytes, tx errors).
pub(crate) fn parse_net_dev(text: &str) -> Vec<(String, u64, u64, u64, u64)> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() >= 11).then(|| (name.trim().to_owned(), f[0], f[2], f[8], f[10]))
        })
        .filter(|(name, ..)| name != "lo")
        .collect()
}

/// `/proc/net/dev` as seen from the network namespace pinned at `netns`.
fn net_dev_in(netns: &Path) -> Option<String> {
    let ns = std::fs::File::open(netns).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // setns changes only this short-lived thread's namespace.
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .ok()?;
            std::fs::read_to_string("/proc/thread-self/net/dev").ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

pub(crate) fn network_usage(info: &PodInfo, ts: i64) -> Option<api::NetworkUsage> {
    let netns = info.record.netns()?;
    let interfaces: Vec<api::NetworkInterfaceUsage> = parse_net_dev(&net_dev_in(netns)?)
        .into_iter()
        .map(|(name, rx, rxe, tx, txe)| api::NetworkInterfaceUsage {
            name,
            rx_bytes: u64v(rx),
            rx_errors: u64v(rxe),
            tx_bytes: u64v(tx),
            tx_errors: u64v(txe),
        })
        .collect();
    let default_interface = interfaces
        .iter()
        .find(|i| i.name == crate::cni_exec::IFNAME)
        .cloned();
    Some(api::NetworkUsage {
        timestamp: ts,
        default_interface,
        interfaces,
    })
}

/// A pod's stats (its containers' included).
pub(crate) async fn pod_stats(
    svc: &CriService,
    info: PodInfo,
) -> Result<api::PodSandboxStats, CriError> {
    let pods = svc.pods.clone();
    let (info, usage, net, running) = blocking(move || {
        let usage = cgroups::stats(Path::new(&format!("/{}", info.record.cgroup_parent)));
        let ts = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let net = network_usage(&info, ts);
        let running: Vec<_> = pods
            .pod_containers(&info.record.id)?
            .into_iter()
            .filter(|c| {
                c.status == Status::Running
                    && crate::container_convert::meta(&c.record.config).is_some()
            })
            .collect();
        Ok((info, usage, net, running))
    })
    .await?;
    let ts = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let key = format!("pod:{}", info.record.id);
    let cores = svc.cpu_sample(&key, ts, usage.cpu_usage_ns);
    let rec = &info.record;
    Ok(api::PodSandboxStats {
        attributes: Some(api::PodSandboxAttributes {
            id: rec.id.clone(),
            metadata: pod_convert::pod_status(&info).metadata,
            labels: pod_convert::visible(&rec.config.labels),
            annotations: pod_convert::visible(&rec.config.annotations),
        }),
        linux: Some(api::LinuxPodSandboxStats {
            cpu: Some(api::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(usage.cpu_usage_ns),
                usage_nano_cores: cores.and_then(u64v),
            }),
            memory: Some(api::MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(usage.memory_working_set_bytes),
                usage_bytes: u64v(usage.memory_usage_bytes),
                ..Default::default()
            }),
            network: net,
            process: Some(api::ProcessUsage {
                timestamp: ts,
                process_count: u64v(usage.pids),
            }),
            containers: stats_of(svc, running).await?,
        }),
        windows: None,
    })
}

pub(crate) async fn pod_sandbox_stats(
    svc: &CriService,
    req: api::PodSandboxStatsRequest,
) -> Result<api::PodSandboxStatsResponse, CriError> {
    let Some(id) = crate::pod_sandbox_stop::resolve_pod(svc, &req.pod_sandbox_id).await? else {
        return Err(CriError::NotFound {
            what: "pod sandbox",
            id: req.pod_sandbox_id,
        });
    };
    let pods = svc.pods.clone();
    let info = blocking(move || match pods.status(&id) {
        Ok(i) => Ok(i),
        Err(PodError::NotFound(id)) => Err(CriError::NotFound {
            what: "pod sandbox",
            id,
        }),
        Err(e) => Err(e.into()),
    })
    .await?;
    Ok(api::PodSandboxStatsResponse {
        stats: Some(pod_stats(svc, info).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counters_skip_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  eth0:    2048      10    1    0    0     0          0         0     4096      20    2    0    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            vec![("eth0".to_owned(), 2048, 1, 4096, 2)]
        );
    }
}
