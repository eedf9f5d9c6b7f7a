//! Unit tests of the spec translation.

use super::*;
use crate::container::config::{MountConfig, Namespaces};
use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

fn image(entry: &[&str], cmd: &[&str], user: &str) -> ImageConfiguration {
    let c = ConfigBuilder::default()
        .entrypoint(entry.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .cmd(cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string(), "A=image".to_string()])
        .user(user.to_string())
        .working_dir("/srv".to_string())
        .build()
        .unwrap();
    ImageConfigurationBuilder::default()
        .config(c)
        .build()
        .unwrap()
}

fn ctx() -> SpecContext {
    SpecContext {
        id: "0123456789abcdef".into(),
        rootfs: "/state/c/rootfs".into(),
        cgroups_path: "/keel/0123456789abcdef".into(),
        passwd: Some("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n".into()),
        group: Some("root:x:0:\nwheel:x:10:app\n".into()),
        current_oom_score_adj: -500,
        hugepage_sizes: vec!["2MB".into()],
        ..Default::default()
    }
}

#[test]
fn command_rules_follow_cri() {
    let img = image(&["/entry"], &["a", "b"], "");
    let mut cfg = ContainerConfig::default();
    assert_eq!(process_args(&img, &cfg).unwrap(), ["/entry", "a", "b"]);
    cfg.args = vec!["x".into()];
    assert_eq!(process_args(&img, &cfg).unwrap(), ["/entry", "x"]);
    cfg.command = vec!["/bin/sh".into()];
    cfg.args.clear();
    assert_eq!(process_args(&img, &cfg).unwrap(), ["/bin/sh"]);
    let empty = image(&[], &[], "");
    assert!(matches!(
        process_args(&empty, &ContainerConfig::default()),
        Err(SpecError::NoCommand)
    ));
}

#[test]
fn user_env_and_cwd() {
    let img = image(&["/entry"], &[], "app");
    let cfg = ContainerConfig {
        env: vec!["A=cfg".into(), "B=2".into()],
        supplementary_groups: vec![77],
        ..Default::default()
    };
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    let p = spec.process().as_ref().unwrap();
    assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
    assert_eq!(p.user().additional_gids().as_ref().unwrap(), &vec![10, 77]);
    let env = p.env().as_ref().unwrap();
    assert!(env.contains(&"A=cfg".to_string()));
    assert!(!env.contains(&"A=image".to_string()));
    assert!(env.contains(&"HOME=/home/app".to_string()));
    assert!(env.contains(&"HOSTNAME=0123456789ab".to_string()));
    assert_eq!(p.cwd(), &PathBuf::from("/srv"));
    assert_eq!(spec.hostname().as_deref(), Some("0123456789ab"));
    assert!(matches!(
        build_spec(
            &image(&["/e"], &[], "ghost"),
            &ContainerConfig::default(),
            &ctx()
        ),
        Err(SpecError::User(_))
    ));
}

#[test]
fn capabilities_add_and_drop() {
    let mut cfg = ContainerConfig::default();
    let caps = capabilities(&cfg).unwrap();
    assert_eq!(caps.len(), DEFAULT_CAPABILITIES.len());
    cfg.security.cap_drop = vec!["CAP_NET_RAW".into()];
    cfg.security.cap_add = vec!["sys_admin".into()];
    let caps = capabilities(&cfg).unwrap();
    assert!(!caps.contains(&Capability::NetRaw));
    assert!(caps.contains(&Capability::SysAdmin));
    cfg.security.cap_drop = vec!["ALL".into()];
    cfg.security.cap_add = vec!["NET_BIND_SERVICE".into()];
    assert_eq!(
        capabilities(&cfg).unwrap(),
        [Capability::NetBindService].into_iter().collect()
    );
    cfg.security.cap_add = vec!["BOGUS".into()];
    assert!(capabilities(&cfg).is_err());
    cfg.security.privileged = true;
    assert_eq!(capabilities(&cfg).unwrap().len(), ALL_CAPABILITIES.len());
}

#[test]
fn security_defaults_and_privileged() {
    let img = image(&["/e"], &[], "");
    let spec = build_spec(&img, &ContainerConfig::default(), &ctx()).unwrap();
    let linux = spec.linux().as_ref().unwrap();
    assert!(linux.seccomp().is_some());
    assert!(
        linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string())
    );
    assert!(
        linux
            .readonly_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/sys".to_string())
    );
    let sys = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination().to_str() == Some("/sys"))
        .unwrap();
    assert!(sys.options().as_ref().unwrap().contains(&"ro".to_string()));

    let mut cfg = ContainerConfig::default();
    cfg.security.privileged = true;
    cfg.security.readonly_rootfs = true;
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    let linux = spec.linux().as_ref().unwrap();
    assert!(linux.seccomp().is_none());
    assert!(linux.masked_paths().as_ref().unwrap().is_empty());
    assert!(spec.root().as_ref().unwrap().readonly().unwrap());

    cfg.security.privileged = false;
    cfg.security.seccomp = SeccompProfile::Localhost("/p.json".into());
    assert!(matches!(
        build_spec(&img, &cfg, &ctx()),
        Err(SpecError::MissingLocalhostProfile)
    ));
    cfg.security.seccomp = SeccompProfile::Unconfined;
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
}

#[test]
fn resources_and_oom_clamp() {
    let img = image(&["/e"], &[], "");
    let mut cfg = ContainerConfig::default();
    cfg.resources.memory_limit = Some(16 << 20);
    cfg.resources.cpu_shares = Some(512);
    cfg.resources.cpu_quota = Some(50_000);
    cfg.resources.pids_limit = Some(64);
    cfg.resources.hugepage_limits.insert("2MB".into(), 4 << 20);
    cfg.resources.hugepage_limits.insert("1GB".into(), 1 << 30);
    cfg.oom_score_adj = Some(-999);
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    let r = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
    assert_eq!(r.memory().as_ref().unwrap().limit(), Some(16 << 20));
    assert_eq!(r.cpu().as_ref().unwrap().shares(), Some(512));
    assert_eq!(r.pids().as_ref().unwrap().limit(), 64);
    assert_eq!(r.hugepage_limits().as_ref().unwrap().len(), 1);
    assert_eq!(spec.process().as_ref().unwrap().oom_score_adj(), Some(-500));
    cfg.oom_score_adj = Some(300);
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    assert_eq!(spec.process().as_ref().unwrap().oom_score_adj(), Some(300));
}

#[test]
fn mounts_namespaces_and_propagation() {
    let img = image(&["/e"], &[], "");
    let cfg = ContainerConfig {
        mounts: vec![
            MountConfig {
                kind: MountKind::Bind,
                source: "/host/data".into(),
                destination: "/data".into(),
                readonly: true,
                propagation: Propagation::HostToContainer,
                options: vec![],
            },
            MountConfig {
                kind: MountKind::Tmpfs,
                destination: "/dev/shm".into(),
                options: vec!["size=1m".into()],
                ..Default::default()
            },
        ],
        namespaces: Namespaces {
            network: NamespaceMode::Join("/run/netns/p".into()),
            ipc: NamespaceMode::Host,
            ..Default::default()
        },
        ..Default::default()
    };
    let spec = build_spec(&img, &cfg, &ctx()).unwrap();
    let mounts = spec.mounts().as_ref().unwrap();
    let shm: Vec<_> = mounts
        .iter()
        .filter(|m| m.destination().to_str() == Some("/dev/shm"))
        .collect();
    assert_eq!(shm.len(), 1);
    assert_eq!(shm[0].typ().as_deref(), Some("tmpfs"));
    let data = mounts
        .iter()
        .find(|m| m.destination().to_str() == Some("/data"))
        .unwrap();
    let opts = data.options().as_ref().unwrap();
    assert!(opts.contains(&"rslave".to_string()) && opts.contains(&"ro".to_string()));
    let linux = spec.linux().as_ref().unwrap();
    assert_eq!(linux.rootfs_propagation().as_deref(), Some("slave"));
    let ns = linux.namespaces().as_ref().unwrap();
    let net = ns
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .unwrap();
    assert_eq!(
        net.path().as_deref(),
        Some(std::path::Path::new("/run/netns/p"))
    );
    assert!(!ns.iter().any(|n| n.typ() == LinuxNamespaceType::Ipc));
    let bad = ContainerConfig {
        mounts: vec![MountConfig {
            source: "rel".into(),
            destination: "/x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(matches!(
        build_spec(&img, &bad, &ctx()),
        Err(SpecError::InvalidMount { .. })
    ));
}
