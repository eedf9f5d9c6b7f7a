//! Pure: what the CRI says about a pod's sandbox and containers -> the Pod's status, and when
//! an exited container is restarted. No I/O.

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keel_cri::api;

/// The longest restart back-off (kubelet's MaxContainerBackOff).
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);

/// The back-off before restart number `restarts + 1`: `base` doubling per restart, at most
/// five minutes.
pub fn restart_delay(base: Duration, restarts: u32) -> Duration {
    let factor = 1u32.checked_shl(restarts.min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_RESTART_BACKOFF)
}

/// Whether a container that exited with `exit_code` is started again under `policy`.
pub(crate) fn restarts(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// One container as the CRI last saw it: its newest instance and its restart count (the
/// instance's attempt).
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub status: api::ContainerStatus,
    pub restart_count: u32,
    /// Waiting for the restart back-off to pass.
    pub backing_off: bool,
    /// What the container's probes concluded; None: it has none.
    pub probes: Option<crate::probes::Verdict>,
}

/// The sandbox as the CRI last saw it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SandboxView {
    pub ips: Vec<String>,
}

fn time_ns(ns: i64) -> Option<Time> {
    if ns <= 0 {
        return None;
    }
    Timestamp::from_nanosecond(i128::from(ns)).ok().map(Time)
}

fn container_status(name: &str, image: &str, o: Option<&Observed>) -> ContainerStatus {
    let Some(o) = o else {
        return ContainerStatus {
            name: name.into(),
            image: image.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
    };
    let s = &o.status;
    let running = s.state == api::ContainerState::ContainerRunning as i32;
    let exited = s.state == api::ContainerState::ContainerExited as i32;
    let terminated = || ContainerStateTerminated {
        exit_code: s.exit_code,
        reason: (!s.reason.is_empty()).then(|| s.reason.clone()),
        message: (!s.message.is_empty()).then(|| s.message.clone()),
        started_at: time_ns(s.started_at),
        finished_at: time_ns(s.finished_at),
        container_id: Some(format!("keel://{}", s.id)),
        ..Default::default()
    };
    let (state, last) = if running {
        (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: time_ns(s.started_at),
                }),
                ..Default::default()
            },
            None,
        )
    } else if exited && o.backing_off {
        (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: Some(format!("back-off restarting failed container {name}")),
                }),
                ..Default::default()
            },
            Some(ContainerState {
                terminated: Some(terminated()),
                ..Default::default()
            }),
        )
    } else if exited {
        (
            ContainerState {
                terminated: Some(terminated()),
                ..Default::default()
            },
            None,
        )
    } else {
        (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            None,
        )
    };
    ContainerStatus {
        name: name.into(),
        image: image.into(),
        image_id: s.image_ref.clone(),
        container_id: Some(format!("keel://{}", s.id)),
        state: Some(state),
        last_state: last,
        restart_count: o.restart_count as i32,
        ready: running && o.probes.is_none_or(|v| v.started && v.ready),
        started: Some(running && o.probes.is_none_or(|v| v.started)),
        ..Default::default()
    }
}

/// The exit code of a container that exited (and is not waiting to restart).
fn exited_with(s: &ContainerStatus) -> Option<i32> {
    s.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
}

fn condition(type_: &str, ok: bool, since: &Time) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(since.clone()),
        ..Default::default()
    }
}

/// The pod's status. `observed(name)` gives each container's view; `sandbox` is None before
/// the sandbox runs. Conditions keep their previous transition time when unchanged.
pub(crate) fn pod_status(
    pod: &Pod,
    sandbox: Option<&SandboxView>,
    observed: &dyn Fn(&str) -> Option<Observed>,
    host_ip: &str,
    now: Timestamp,
) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let status_of = |c: &k8s_openapi::api::core::v1::Container| {
        container_status(
            &c.name,
            c.image.as_deref().unwrap_or_default(),
            observed(&c.name).as_ref(),
        )
    };
    let init: Vec<ContainerStatus> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let mut st = status_of(c);
            st.ready = exited_with(&st) == Some(0);
            st
        })
        .collect();
    let initialized = init.iter().all(|s| exited_with(s) == Some(0));
    // An init container that failed for good (restartPolicy Never) fails the pod.
    let init_failed =
        policy == "Never" && init.iter().any(|s| exited_with(s).is_some_and(|c| c != 0));
    let mut statuses: Vec<ContainerStatus> = spec.containers.iter().map(status_of).collect();
    if !initialized {
        for st in &mut statuses {
            if let Some(w) = st.state.as_mut().and_then(|s| s.waiting.as_mut()) {
                w.reason = Some("PodInitializing".into());
            }
        }
    }
    let running = statuses
        .iter()
        .filter(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
        .count();
    let terminated: Vec<i32> = statuses
        .iter()
        .filter_map(|s| s.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
        .collect();
    let all_done = !statuses.is_empty() && terminated.len() == statuses.len();
    let phase = if init_failed {
        "Failed"
    } else if !initialized {
        "Pending"
    } else if all_done && terminated.iter().all(|&c| c == 0) && policy != "Always" {
        "Succeeded"
    } else if all_done && policy == "Never" {
        "Failed"
    } else if running > 0 || (all_done && policy == "OnFailure") || !terminated.is_empty() {
        "Running"
    } else if statuses.iter().any(|s| s.restart_count > 0) {
        // Exited and waiting for the back-off: the pod still runs.
        "Running"
    } else {
        "Pending"
    };
    let ready = !statuses.is_empty() && statuses.iter().all(|s| s.ready);
    let old = pod.status.clone().unwrap_or_default();
    let old_conditions = old.conditions.unwrap_or_default();
    let now_t = Time(now);
    let cond = |t: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        match old_conditions.iter().find(|c| c.type_ == t) {
            Some(c) if c.status == status && c.last_transition_time.is_some() => {
                condition(t, ok, c.last_transition_time.as_ref().unwrap_or(&now_t))
            }
            _ => condition(t, ok, &now_t),
        }
    };
    let ips: Vec<String> = sandbox.map(|s| s.ips.clone()).unwrap_or_default();
    PodStatus {
        phase: Some(phase.into()),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP {
            ip: host_ip.into(),
        }]),
        pod_ip: ips.first().cloned(),
        pod_ips: (!ips.is_empty()).then(|| ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        start_time: old.start_time.or(Some(now_t.clone())),
        conditions: Some(vec![
            cond("PodScheduled", true),
            cond("Initialized", initialized),
            cond("ContainersReady", ready),
            cond("Ready", ready),
        ]),
        container_statuses: Some(statuses),
        init_container_statuses: (!init.is_empty()).then_some(init),
        qos_class: old.qos_class,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(policy: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    }

    fn seen(state: api::ContainerState, exit: i32, restarts: u32, backing_off: bool) -> Observed {
        Observed {
            status: api::ContainerStatus {
                id: "abc".into(),
                state: state as i32,
                exit_code: exit,
                started_at: 1_700_000_000_000_000_000,
                finished_at: if state == api::ContainerState::ContainerExited {
                    1_700_000_001_000_000_000
                } else {
                    0
                },
                image_ref: "sha256:1".into(),
                reason: if exit == 0 { "Completed" } else { "Error" }.into(),
                ..Default::default()
            },
            restart_count: restarts,
            backing_off,
            probes: None,
        }
    }

    fn phase(s: &PodStatus) -> &str {
        s.phase.as_deref().unwrap()
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a str {
        &s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .status
    }

    #[test]
    fn pending_until_the_container_runs() {
        let s = pod_status(
            &pod("Always"),
            None,
            &|_| None,
            "10.0.0.1",
            Timestamp::now(),
        );
        assert_eq!(phase(&s), "Pending");
        assert_eq!(cond(&s, "Ready"), "False");
        assert_eq!(cond(&s, "PodScheduled"), "True");
        let cs = &s.container_statuses.unwrap()[0];
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("ContainerCreating")
        );
    }

    #[test]
    fn running_is_ready_with_ips() {
        let sb = SandboxView {
            ips: vec!["10.88.0.5".into()],
        };
        let o = seen(api::ContainerState::ContainerRunning, 0, 0, false);
        let s = pod_status(
            &pod("Always"),
            Some(&sb),
            &|_| Some(o.clone()),
            "10.0.0.1",
            Timestamp::now(),
        );
        assert_eq!(phase(&s), "Running");
        assert_eq!(s.pod_ip.as_deref(), Some("10.88.0.5"));
        assert_eq!(s.host_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(cond(&s, "Ready"), "True");
        assert_eq!(cond(&s, "ContainersReady"), "True");
        let cs = &s.container_statuses.unwrap()[0];
        assert!(cs.ready);
        assert_eq!(cs.container_id.as_deref(), Some("keel://abc"));
        assert_eq!(cs.image_id, "sha256:1");

        // With probes, running is not enough: started and ready must be concluded.
        for (started, ready, want) in [
            (false, false, "False"),
            (true, false, "False"),
            (true, true, "True"),
        ] {
            let mut probed = o.clone();
            probed.probes = Some(crate::probes::Verdict {
                started,
                ready,
                failed: None,
            });
            let s = pod_status(
                &pod("Always"),
                Some(&sb),
                &|_| Some(probed.clone()),
                "10.0.0.1",
                Timestamp::now(),
            );
            assert_eq!(cond(&s, "Ready"), want, "started {started} ready {ready}");
            assert_eq!(s.container_statuses.unwrap()[0].started, Some(started));
        }
    }

    #[test]
    fn terminal_phases_by_restart_policy() {
        let failed = seen(api::ContainerState::ContainerExited, 3, 0, false);
        let ok = seen(api::ContainerState::ContainerExited, 0, 0, false);
        let run = |policy: &str, o: &Observed| {
            let o = o.clone();
            pod_status(
                &pod(policy),
                None,
                &move |_| Some(o.clone()),
                "h",
                Timestamp::now(),
            )
        };
        let s = run("Never", &failed);
        assert_eq!(phase(&s), "Failed");
        let t = s.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
        assert_eq!(phase(&run("Never", &ok)), "Succeeded");
        assert_eq!(phase(&run("OnFailure", &ok)), "Succeeded");
        assert_eq!(phase(&run("OnFailure", &failed)), "Running");
        assert_eq!(phase(&run("Always", &ok)), "Running");
    }

    #[test]
    fn crash_loop_back_off_keeps_the_last_state() {
        let o = seen(api::ContainerState::ContainerExited, 1, 2, true);
        let s = pod_status(
            &pod("Always"),
            None,
            &|_| Some(o.clone()),
            "h",
            Timestamp::now(),
        );
        assert_eq!(phase(&s), "Running");
        let cs = &s.container_statuses.unwrap()[0];
        assert_eq!(cs.restart_count, 2);
        let st = cs.state.as_ref().unwrap();
        assert_eq!(
            st.waiting.as_ref().unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        assert_eq!(
            cs.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
    }

    #[test]
    fn init_containers_gate_the_pod() {
        let pod = |policy: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "default", "uid": "u"},
                "spec": {"restartPolicy": policy,
                         "initContainers": [{"name": "i", "image": "busybox"}],
                         "containers": [{"name": "c", "image": "busybox"}]}
            }))
            .unwrap()
        };
        let now = Timestamp::now();
        let sb = SandboxView { ips: vec![] };
        let init_running =
            |n: &str| (n == "i").then(|| seen(api::ContainerState::ContainerRunning, 0, 0, false));
        let s = pod_status(&pod("Always"), Some(&sb), &init_running, "10.0.0.1", now);
        assert_eq!(phase(&s), "Pending");
        assert_eq!(cond(&s, "Initialized"), "False");
        let main = &s.container_statuses.as_ref().unwrap()[0];
        let waiting = main.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("PodInitializing"));

        let done = |n: &str| {
            Some(if n == "i" {
                seen(api::ContainerState::ContainerExited, 0, 0, false)
            } else {
                seen(api::ContainerState::ContainerRunning, 0, 0, false)
            })
        };
        let s = pod_status(&pod("Always"), Some(&sb), &done, "10.0.0.1", now);
        assert_eq!(phase(&s), "Running");
        assert_eq!(cond(&s, "Initialized"), "True");
        assert!(s.init_container_statuses.as_ref().unwrap()[0].ready);

        let failed =
            |n: &str| (n == "i").then(|| seen(api::ContainerState::ContainerExited, 1, 0, false));
        let s = pod_status(&pod("Never"), Some(&sb), &failed, "10.0.0.1", now);
        assert_eq!(phase(&s), "Failed");
        let s = pod_status(&pod("OnFailure"), Some(&sb), &failed, "10.0.0.1", now);
        assert_eq!(phase(&s), "Pending", "retried under OnFailure");
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let b = Duration::from_secs(10);
        assert_eq!(restart_delay(b, 0), Duration::from_secs(10));
        assert_eq!(restart_delay(b, 1), Duration::from_secs(20));
        assert_eq!(restart_delay(b, 4), Duration::from_secs(160));
        assert_eq!(restart_delay(b, 5), MAX_RESTART_BACKOFF);
        assert_eq!(restart_delay(b, 1000), MAX_RESTART_BACKOFF);
        assert!(restarts("Always", 0));
        assert!(!restarts("OnFailure", 0));
        assert!(restarts("OnFailure", 2));
        assert!(!restarts("Never", 1));
    }
}
