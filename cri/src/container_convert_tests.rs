use std::collections::HashMap;

use keel_runtime::container::{ExitRecord, NamespaceMode};
use keel_runtime::pod::{PodConfig, PodState};

use super::*;

fn pod() -> PodRecord {
    PodRecord {
        id: "pod1".into(),
        config: PodConfig {
            log_directory: Some("/var/log/pods/ns_web_u1".into()),
            ..Default::default()
        },
        created_at: chrono::Utc::now(),
        state: PodState::Ready,
        hostname: "web".into(),
        cgroup_parent: "keel/pod-pod1".into(),
        namespaces: Default::default(),
        keeper: None,
        shm: None,
        network: Default::default(),
        network_ready: false,
        stopped_at: None,
    }
}

fn config() -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: "app".into(),
            attempt: 1,
        }),
        image: Some(api::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        command: vec!["sleep".into()],
        args: vec!["60".into()],
        working_dir: "/tmp".into(),
        envs: vec![api::KeyValue {
            key: "A".into(),
            value: "1".into(),
        }],
        mounts: vec![api::Mount {
            container_path: "/data".into(),
            host_path: "/srv/data".into(),
            readonly: true,
            propagation: api::MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        }],
        labels: HashMap::from([("tier".into(), "web".into())]),
        annotations: HashMap::from([("note".into(), "x".into())]),
        log_path: "app/1.log".into(),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(api::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                oom_score_adj: 500,
                cpuset_cpus: "0".into(),
                ..Default::default()
            }),
            security_context: Some(api::LinuxContainerSecurityContext {
                capabilities: Some(api::Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                run_as_user: Some(api::Int64Value { value: 1000 }),
                run_as_group: Some(api::Int64Value { value: 2000 }),
                supplemental_groups: vec![3000],
                readonly_rootfs: true,
                no_new_privs: true,
                masked_paths: vec!["/proc/kcore".into()],
                seccomp: Some(api::SecurityProfile {
                    profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                apparmor: Some(api::SecurityProfile {
                    profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

#[test]
fn a_container_config_translates_fully() {
    let (c, meta) = container_config(Some(&config()), &pod()).unwrap();
    assert_eq!(c.name, "app_1_pod1");
    assert_eq!(c.command, vec!["sleep"]);
    assert_eq!(c.args, vec!["60"]);
    assert_eq!(c.env, vec!["A=1"]);
    assert_eq!(c.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(c.user.as_deref(), Some("1000:2000"));
    assert_eq!(c.supplementary_groups, vec![3000]);
    assert_eq!(c.mounts[0].source, PathBuf::from("/srv/data"));
    assert!(c.mounts[0].readonly);
    assert_eq!(c.mounts[0].propagation, Propagation::HostToContainer);
    assert_eq!(c.resources.cpu_quota, Some(50_000));
    assert_eq!(c.resources.cpu_period, Some(100_000));
    assert_eq!(c.resources.cpu_shares, Some(512));
    assert_eq!(c.resources.memory_limit, Some(64 << 20));
    assert_eq!(c.resources.cpuset_cpus.as_deref(), Some("0"));
    assert_eq!(c.oom_score_adj, Some(500));
    assert_eq!(c.security.cap_add, vec!["NET_ADMIN"]);
    assert_eq!(c.security.cap_drop, vec!["ALL"]);
    assert!(c.security.readonly_rootfs && c.security.no_new_privs);
    assert_eq!(c.security.seccomp, SeccompProfile::RuntimeDefault);
    assert_eq!(
        c.security.masked_paths.as_deref(),
        Some(&["/proc/kcore".to_owned()][..])
    );
    assert_eq!(c.security.readonly_paths, None, "empty keeps the defaults");
    assert_eq!(
        c.log_path.as_deref(),
        Some(Path::new("/var/log/pods/ns_web_u1/app/1.log"))
    );
    assert_eq!(c.labels["tier"], "web");
    assert_eq!(meta.name, "app");
    assert_eq!(meta.image, "busybox");
    assert_eq!(super::meta(&c), Some(meta));
}

#[test]
fn users_groups_and_seccomp_variants() {
    let mut sc = api::LinuxContainerSecurityContext {
        run_as_username: "nobody".into(),
        ..Default::default()
    };
    assert_eq!(user(&sc).unwrap().as_deref(), Some("nobody"));
    sc.run_as_username.clear();
    assert_eq!(user(&sc).unwrap(), None);
    sc.run_as_group = Some(api::Int64Value { value: 5 });
    let e = user(&sc).unwrap_err();
    assert!(e.to_string().contains("run_as_group"), "{e}");
    sc.run_as_user = Some(api::Int64Value { value: 0 });
    assert_eq!(user(&sc).unwrap().as_deref(), Some("0:5"));

    assert_eq!(seccomp(None, "").unwrap(), SeccompProfile::Unconfined);
    assert_eq!(
        seccomp(None, "runtime/default").unwrap(),
        SeccompProfile::RuntimeDefault
    );
    assert_eq!(
        seccomp(None, "localhost/etc/p.json").unwrap(),
        SeccompProfile::Localhost("etc/p.json".into())
    );
    assert!(seccomp(None, "weird").is_err());
    let local = api::SecurityProfile {
        profile_type: api::security_profile::ProfileType::Localhost as i32,
        localhost_ref: "/etc/keel/p.json".into(),
    };
    assert_eq!(
        seccomp(Some(&local), "").unwrap(),
        SeccompProfile::Localhost("/etc/keel/p.json".into())
    );
    let privileged = api::LinuxContainerSecurityContext {
        privileged: true,
        seccomp: Some(local),
        ..Default::default()
    };
    let s = security(&privileged).unwrap();
    assert!(s.privileged);
    assert_eq!(s.seccomp, SeccompProfile::Unconfined);
}

#[test]
fn malformed_container_configs_name_the_field() {
    let p = pod();
    assert!(
        container_config(None, &p)
            .unwrap_err()
            .to_string()
            .contains("config")
    );
    let mut c = config();
    c.metadata = None;
    assert!(
        container_config(Some(&c), &p)
            .unwrap_err()
            .to_string()
            .contains("config.metadata")
    );
    let mut c = config();
    c.image = None;
    let e = container_config(Some(&c), &p).unwrap_err();
    assert!(e.to_string().contains("config.image.image"), "{e}");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let mut c = config();
    c.mounts[0].host_path.clear();
    assert!(
        container_config(Some(&c), &p)
            .unwrap_err()
            .to_string()
            .contains("host_path")
    );
}

#[test]
fn pid_namespace_modes() {
    let ns = |pid: api::NamespaceMode| api::NamespaceOption {
        pid: pid as i32,
        target_id: "t".into(),
        ..Default::default()
    };
    assert_eq!(pid_mode(None, None).unwrap(), None);
    assert_eq!(
        pid_mode(Some(&ns(api::NamespaceMode::Pod)), None).unwrap(),
        None
    );
    assert_eq!(
        pid_mode(Some(&ns(api::NamespaceMode::Container)), None).unwrap(),
        Some(NamespaceMode::Private)
    );
    assert_eq!(
        pid_mode(Some(&ns(api::NamespaceMode::Node)), None).unwrap(),
        Some(NamespaceMode::Host)
    );
    assert_eq!(
        pid_mode(Some(&ns(api::NamespaceMode::Target)), Some(42)).unwrap(),
        Some(NamespaceMode::Join("/proc/42/ns/pid".into()))
    );
    assert!(pid_mode(Some(&ns(api::NamespaceMode::Target)), None).is_err());
}

fn info(exit: Option<ExitRecord>) -> ContainerInfo {
    let (cfg, _) = container_config(Some(&config()), &pod()).unwrap();
    ContainerInfo {
        record: keel_runtime::container::ContainerRecord {
            id: "c1".into(),
            image_ref: "busybox".into(),
            image_id: "sha256:abc".into(),
            config: ContainerConfig {
                pod_id: Some("pod1".into()),
                ..cfg
            },
            created_at: chrono::Utc::now(),
            log_path: "/var/log/pods/ns_web_u1/app/1.log".into(),
            cgroups_path: "/keel/pod-pod1/c1".into(),
            stop_signal: 15,
        },
        status: if exit.is_some() {
            Status::Exited
        } else {
            Status::Running
        },
        pid: None,
        started_at: Some(chrono::Utc::now()),
        exit,
    }
}

fn exit(code: i32, oom: bool) -> Option<ExitRecord> {
    Some(ExitRecord {
        exit_code: code,
        signal: None,
        oom_killed: oom,
        finished_at: chrono::Utc::now(),
        reason: None,
    })
}

#[test]
fn statuses_carry_reason_times_image_mounts_and_resources() {
    let running = container_status(&info(None));
    assert_eq!(running.state, api::ContainerState::ContainerRunning as i32);
    assert_eq!(running.reason, "");
    assert!(running.started_at > 0 && running.finished_at == 0);
    assert_eq!(running.image.as_ref().unwrap().image, "busybox");
    assert_eq!(running.image_ref, "sha256:abc");
    assert_eq!(running.mounts[0].container_path, "/data");
    assert_eq!(running.log_path, "/var/log/pods/ns_web_u1/app/1.log");
    let r = running.resources.unwrap().linux.unwrap();
    assert_eq!((r.cpu_quota, r.memory_limit_in_bytes), (50_000, 64 << 20));
    assert!(!running.annotations.contains_key(META_KEY));
    assert_eq!(running.annotations["note"], "x");
    assert_eq!(running.metadata.unwrap().name, "app");

    assert_eq!(container_status(&info(exit(0, false))).reason, "Completed");
    let failed = container_status(&info(exit(3, false)));
    assert_eq!((failed.reason.as_str(), failed.exit_code), ("Error", 3));
    assert!(failed.finished_at > 0);
    assert_eq!(container_status(&info(exit(137, true))).reason, "OOMKilled");

    let listed = container(&info(None));
    assert_eq!(listed.pod_sandbox_id, "pod1");
    assert_eq!(listed.labels["tier"], "web");
}

#[test]
fn nano_cores_from_two_samples() {
    assert_eq!(
        nano_cores((0, 0), (1_000_000_000, 500_000_000)),
        Some(500_000_000)
    );
    assert_eq!(nano_cores((5, 0), (5, 10)), None);
    assert_eq!(nano_cores((0, 10), (1, 5)), None);
}

#[test]
fn apparmor_is_ignored_without_apparmor_and_localhost_refused_with_it() {
    let local = api::LinuxContainerSecurityContext {
        apparmor: Some(api::SecurityProfile {
            profile_type: api::security_profile::ProfileType::Localhost as i32,
            localhost_ref: "k8s-nginx".into(),
        }),
        ..Default::default()
    };
    assert!(check_apparmor(&local, false).is_ok());
    let e = check_apparmor(&local, true).unwrap_err();
    assert!(e.to_string().contains("apparmor"), "{e}");
    let default = api::LinuxContainerSecurityContext {
        apparmor: Some(api::SecurityProfile {
            profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    };
    assert!(check_apparmor(&default, true).is_ok());
}
