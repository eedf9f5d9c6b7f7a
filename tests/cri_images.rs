//! End-to-end tests of `keel cri`: the daemon is the built binary on a unix socket, the client is
//! k8s-cri's generated CRI client (what crictl and kubelet speak), the registry is Debian's
//! docker-registry on 127.0.0.1 with the busybox test images.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keel_cri::api;
use keel_cri::api::image_service_client::ImageServiceClient;
use keel_cri::api::runtime_service_client::RuntimeServiceClient;
use keel_cri::tonic::Code;
use keel_cri::tonic::transport::Channel;
use keel_testkit::image_builder::{self, BuiltImage, MediaTypes, Variant};
use keel_testkit::registry::{self, Registry};
use keel_testkit::{StateRoot, privileged};

/// A `keel cri` child process; killed (and its socket left to the StateRoot) if the test fails.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `keel --root <root> cri` with the socket, CNI conf dir and log under `root`.
    fn start(root: &StateRoot, registries: &[String], metrics: Option<SocketAddr>) -> Daemon {
        // A directory that does not exist yet: the daemon creates it.
        let socket = root.path().join("run/keel/keel.sock");
        let log = root.path().join("keel-cri.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.env_remove("KEEL_CONFIG")
            .arg("--root")
            .arg(root.path())
            .args(["--log", "keel_cri=debug,info", "cri", "--socket"])
            .arg(&socket)
            .arg("--cni-conf-dir")
            .arg(root.path().join("cni/net.d"))
            .arg("--cni-bin-dir")
            .arg(root.path().join("cni/bin"))
            .arg("--metrics-address")
            .arg(metrics.map(|m| m.to_string()).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for r in registries {
            cmd.args(["--insecure-registry", r]);
        }
        let child = cmd.spawn().unwrap();
        Daemon {
            child: Some(child),
            socket,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects once the socket answers (at most 30 s), failing early if the daemon exited.
    async fn connect(&mut self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = keel_cri::client::connect(&self.socket).await {
                return keel_cri::client::clients(channel);
            }
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keel cri exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keel cri did not listen on {} within 30 s:\n{}",
                self.socket.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits (at most 20 s) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        keel_testkit::run("kill", &["-TERM", &child.id().to_string()]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keel cri ignored SIGTERM for 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("keel cri log:\n{}", self.log());
            }
        }
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn spec(image: &str) -> Option<api::ImageSpec> {
    Some(api::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

async fn push(reg: &Registry, v: Variant, repo: &str) -> (String, std::sync::Arc<BuiltImage>) {
    let img = image_builder::build_cached(v, MediaTypes::Oci).unwrap();
    img.push(&reg.host(), repo, "v1", reg.credentials())
        .await
        .unwrap();
    (format!("{}/{repo}:v1", reg.host()), img)
}

fn condition<'a>(r: &'a api::StatusResponse, t: &str) -> &'a api::RuntimeCondition {
    let conditions = &r.status.as_ref().unwrap().conditions;
    conditions.iter().find(|c| c.r#type == t).unwrap()
}

async fn pull(
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<api::AuthConfig>,
) -> Result<String, keel_cri::tonic::Status> {
    images
        .pull_image(api::PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status_of(
    images: &mut ImageServiceClient<Channel>,
    image: &str,
    verbose: bool,
) -> api::ImageStatusResponse {
    images
        .image_status(api::ImageStatusRequest {
            image: spec(image),
            verbose,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_serves_runtime_info_and_images() {
    if !privileged("cri_serves_runtime_info_and_images") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let (busybox, busybox_img) = push(&reg, Variant::Single, "test/busybox").await;
    let (multi, multi_img) = push(&reg, Variant::Multi, "test/multi").await;
    let root = StateRoot::new().unwrap();
    let cni_dir = root.subdir("cni/net.d").unwrap();
    let metrics = free_port();
    let mut daemon = Daemon::start(&root, &[reg.host()], Some(metrics));
    let (mut runtime, mut images) = daemon.connect().await;

    // The socket: 0660 in a directory the daemon made.
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");

    // Version, RuntimeConfig.
    let v = runtime
        .version(api::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "keel");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.version, "0.1.0");
    assert!(!v.runtime_version.is_empty());
    let rc = runtime
        .runtime_config(api::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rc.linux.unwrap().cgroup_driver(),
        api::CgroupDriver::Cgroupfs
    );

    // Status: runtime ready; network ready once a conflist appears.
    let st = runtime
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(condition(&st, "RuntimeReady").status);
    let net = condition(&st, "NetworkReady");
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    assert!(
        net.message.contains(&cni_dir.display().to_string()),
        "{net:?}"
    );
    assert!(st.info.is_empty(), "info only when verbose");
    // A 1.1.0 network is asked its plugins' STATUS: a plugin binary that is not there is not
    // ready.
    std::fs::write(
        cni_dir.join("10-keel.conflist"),
        r#"{"cniVersion":"1.1.0","name":"keel","plugins":[{"type":"keel-cni"}]}"#,
    )
    .unwrap();
    let st = runtime
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let net = condition(&st, "NetworkReady");
    assert!(!net.status && net.message.contains("keel-cni"), "{net:?}");
    // A 1.0.0 network has no STATUS: ready once its config loads.
    std::fs::write(
        cni_dir.join("10-keel.conflist"),
        r#"{"cniVersion":"1.0.0","name":"keel","plugins":[{"type":"keel-cni"}]}"#,
    )
    .unwrap();
    runtime
        .update_runtime_config(api::UpdateRuntimeConfigRequest {
            runtime_config: Some(api::RuntimeConfig {
                network_config: Some(api::NetworkConfig {
                    pod_cidr: "10.244.7.0/24".into(),
                }),
            }),
        })
        .await
        .unwrap();
    let st = runtime
        .status(api::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert!(condition(&st, "NetworkReady").status, "{st:?}");
    assert!(condition(&st, "RuntimeReady").status);
    let config: serde_json::Value = serde_json::from_str(&st.info["config"]).unwrap();
    assert_eq!(config["podCIDRs"][0], "10.244.7.0/24");
    let cni: serde_json::Value = serde_json::from_str(&st.info["cniconfig"]).unwrap();
    assert_eq!(cni["network"]["name"], "keel");
    let bad_cidr = runtime
        .update_runtime_config(api::UpdateRuntimeConfigRequest {
            runtime_config: Some(api::RuntimeConfig {
                network_config: Some(api::NetworkConfig {
                    pod_cidr: "10.244.7.0/99".into(),
                }),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_cidr.code(), Code::InvalidArgument);

    // Before the pull the image is unknown: an empty status, not an error.
    assert!(
        status_of(&mut images, &busybox, false)
            .await
            .image
            .is_none()
    );

    // PullImage answers the image id (the config digest).
    let id = pull(&mut images, &busybox, None).await.unwrap();
    assert_eq!(id, busybox_img.config_digest);
    let multi_id = pull(&mut images, &multi, None).await.unwrap();
    assert_eq!(multi_id, multi_img.config_digest);

    // ListImages, with and without a filter.
    let all = images
        .list_images(api::ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(all.len(), 2, "{all:?}");
    let filtered = images
        .list_images(api::ListImagesRequest {
            filter: Some(api::ImageFilter {
                image: spec(&busybox),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].id, id);
    let none = images
        .list_images(api::ListImagesRequest {
            filter: Some(api::ImageFilter {
                image: spec(&format!("{}/test/absent:v1", reg.host())),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(none.is_empty());

    // ImageStatus: by tag, by id prefix, verbose; the user as uid or username.
    let st = status_of(&mut images, &busybox, false).await;
    let img = st.image.unwrap();
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec![busybox.clone()]);
    assert_eq!(
        img.repo_digests,
        vec![format!(
            "{}/test/busybox@{}",
            reg.host(),
            busybox_img.manifest_digest
        )]
    );
    assert!(img.size > 0);
    assert_eq!((img.uid, img.username.as_str()), (None, ""));
    assert!(st.info.is_empty());
    let hex = id.strip_prefix("sha256:").unwrap();
    let by_prefix = status_of(&mut images, &hex[..12], false).await;
    assert_eq!(by_prefix.image.unwrap().id, id);
    let multi_status = status_of(&mut images, &multi, true).await;
    assert_eq!(multi_status.image.unwrap().username, "keel");
    let info: serde_json::Value = serde_json::from_str(&multi_status.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["config"]["User"], "keel");
    assert_eq!(info["manifestDigest"], multi_img.manifest_digest);

    // ImageFsInfo: the store's directory and what it uses.
    let fs = images
        .image_fs_info(api::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let image_fs = &fs.image_filesystems[0];
    assert!(image_fs.timestamp > 0);
    assert_eq!(
        image_fs.fs_id.as_ref().unwrap().mountpoint,
        root.path().join("images").display().to_string()
    );
    assert!(image_fs.used_bytes.as_ref().unwrap().value > img.size / 2);
    assert!(image_fs.inodes_used.as_ref().unwrap().value > 0);

    // RemoveImage is idempotent.
    for _ in 0..2 {
        images
            .remove_image(api::RemoveImageRequest {
                image: spec(&busybox),
            })
            .await
            .unwrap();
    }
    assert!(
        status_of(&mut images, &busybox, false)
            .await
            .image
            .is_none()
    );
    assert!(status_of(&mut images, &multi, false).await.image.is_some());

    // Failures carry the right codes and say what they are about.
    let missing = format!("{}/test/busybox:nope", reg.host());
    let e = pull(&mut images, &missing, None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&reg.host()), "{e:?}");
    let e = pull(&mut images, "", None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("image.image"), "{e:?}");
    let e = images
        .pull_image(api::PullImageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = images
        .image_status(api::ImageStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = pull(&mut images, "Not/A:Valid:Ref", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = runtime
        .run_pod_sandbox(api::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "invalid request: config: missing");
    let e = runtime.exec(api::ExecRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cmd"), "{e:?}");
    let e = runtime
        .checkpoint_container(api::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().starts_with("CheckpointContainer: "), "{e:?}");

    // The metrics endpoint has a histogram series per RPC and code seen.
    let text = http_get(metrics, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for series in [
        r#"rpc="Version",code="OK""#,
        r#"rpc="Status",code="OK""#,
        r#"rpc="PullImage",code="OK""#,
        r#"rpc="PullImage",code="NotFound""#,
        r#"rpc="PullImage",code="InvalidArgument""#,
        r#"rpc="ImageStatus",code="OK""#,
        r#"rpc="RemoveImage",code="OK""#,
        r#"rpc="RunPodSandbox",code="InvalidArgument""#,
    ] {
        let line = format!("keel_cri_rpc_duration_seconds_count{{{series}}}");
        assert!(text.contains(&line), "no {line} in:\n{text}");
    }
    assert!(
        text.contains("keel_cri_rpc_duration_seconds_bucket{"),
        "{text}"
    );

    // SIGTERM: a clean exit that removes the socket.
    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.log());
    assert!(!daemon.socket.exists(), "socket left behind");
    assert!(TcpStream::connect(metrics).is_err(), "metrics still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pulls_with_the_request_credentials() {
    if !privileged("cri_pulls_with_the_request_credentials") {
        return;
    }
    let reg = Registry::start(registry::RegistryOptions {
        htpasswd: Some(("keel".into(), "s3cret".into())),
    })
    .unwrap();
    let (image, built) = push(&reg, Variant::Single, "test/private").await;
    let root = StateRoot::new().unwrap();
    let mut daemon = Daemon::start(&root, &[reg.host()], None);
    let (_, mut images) = daemon.connect().await;
    let basic = |user: &str, password: &str| api::AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    };

    // Anonymous and wrong passwords are refused, naming the registry; the failures must not
    // stick to the registry for later pulls with the right credentials.
    let e = pull(&mut images, &image, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains(&reg.host()), "{e:?}");
    let e = pull(&mut images, &image, Some(basic("keel", "wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains(&reg.host()), "{e:?}");

    let id = pull(&mut images, &image, Some(basic("keel", "s3cret")))
        .await
        .unwrap();
    assert_eq!(id, built.config_digest);

    // And the right credentials do not stick either: a later anonymous pull is refused.
    images
        .remove_image(api::RemoveImageRequest { image: spec(&id) })
        .await
        .unwrap();
    let e = pull(&mut images, &image, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // `auth` (base64 of user:password) scoped to this registry by server_address.
    let encoded = "a2VlbDpzM2NyZXQ=".to_owned(); // base64 of keel:s3cret
    let auth = api::AuthConfig {
        auth: encoded.clone(),
        server_address: reg.host(),
        ..Default::default()
    };
    assert_eq!(pull(&mut images, &image, Some(auth)).await.unwrap(), id);
    images
        .remove_image(api::RemoveImageRequest { image: spec(&id) })
        .await
        .unwrap();
    // An auth config for another registry is not sent.
    let elsewhere = api::AuthConfig {
        auth: encoded,
        server_address: "registry.example:5000".into(),
        ..Default::default()
    };
    let e = pull(&mut images, &image, Some(elsewhere))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.log());
    assert!(!daemon.socket.exists());
    assert_eq!(
        std::fs::read_dir(root.path().join("run/keel"))
            .unwrap()
            .count(),
        0
    );
}
