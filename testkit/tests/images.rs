//! Checks the harness's own registry, test images and throttle proxy against independent tools:
//! Debian's `docker-registry` serves what we push, and Debian's `skopeo` accepts it (registry,
//! OCI layout, OCI archive, docker archive). Only loopback is used.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_testkit::image_builder::{self, BuiltImage, MediaTypes, Variant};
use keel_testkit::registry::{Registry, RegistryOptions};
use keel_testkit::throttle::ThrottleProxy;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Runs skopeo (never consulting the host's signature policy) and returns stdout, or the error.
fn skopeo(args: &[&str]) -> Result<String, String> {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .map_err(|e| format!("spawn skopeo (apt-get install skopeo): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "skopeo {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON {e}: {s}"))
}

/// Digest of the manifest `skopeo copy ... dir:DIR` stored (it keeps the manifest bytes as is,
/// unlike `oci:` which converts Docker manifests).
fn dir_manifest_digest(dir: &std::path::Path) -> String {
    image_builder::sha256_digest(&std::fs::read(dir.join("manifest.json")).unwrap())
}

fn check_pushed(reg: &Registry, img: &BuiltImage, repo: &str, tag: &str) {
    let r = format!("docker://{}/{repo}:{tag}", reg.host());
    let raw = skopeo(&["inspect", "--tls-verify=false", "--raw", &r]).unwrap();
    assert_eq!(
        raw.as_bytes(),
        img.manifest_json.as_slice(),
        "{r}: manifest bytes"
    );
    let info = json(&skopeo(&["inspect", "--tls-verify=false", &r]).unwrap());
    assert_eq!(info["Digest"], img.manifest_digest.as_str(), "{r}");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    let layers: Vec<&str> = info["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let want: Vec<&str> = img.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, want, "{r}: layers");
    for l in &img.layers {
        assert!(
            reg.blob_data_path(&l.digest).is_file(),
            "{} on disk",
            l.digest
        );
    }

    // A full copy makes skopeo fetch and verify every blob against its digest.
    let out = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:{tag}", out.path().display());
    skopeo(&["copy", "--quiet", "--src-tls-verify=false", &r, &dest]).unwrap();
}

#[test]
fn registry_serves_pushed_images() {
    if !keel_testkit::privileged("registry_serves_pushed_images") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    assert_eq!(reg.v2_status().unwrap(), 200);
    let single = image_builder::build(Variant::Single).unwrap();
    let multi = image_builder::build(Variant::Multi).unwrap();
    let docker = image_builder::build_with(Variant::Multi, MediaTypes::Docker).unwrap();
    block_on(async {
        single
            .push(&reg.host(), "busybox", "single", None)
            .await
            .unwrap();
        multi
            .push(&reg.host(), "busybox", "multi", None)
            .await
            .unwrap();
        docker
            .push(&reg.host(), "lib/busybox", "docker", None)
            .await
            .unwrap();
        // Pushing again is a no-op that keeps the digest.
        single
            .push(&reg.host(), "busybox", "single", None)
            .await
            .unwrap();
    });
    check_pushed(&reg, &single, "busybox", "single");
    check_pushed(&reg, &multi, "busybox", "multi");
    check_pushed(&reg, &docker, "lib/busybox", "docker");
    let info = json(
        &skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--config",
            &format!("docker://{}/busybox:multi", reg.host()),
        ])
        .unwrap(),
    );
    assert_eq!(info["config"]["User"], "keel");
    assert_eq!(info["config"]["WorkingDir"], "/home/keel");

    // blob_data_path really is where the registry keeps the bytes: corrupting them breaks a pull.
    let layer = &single.layers[0].digest;
    std::fs::write(reg.blob_data_path(layer), b"corrupt").unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/busybox:single", reg.host()),
        &format!("oci:{}:x", out.path().display()),
    ])
    .unwrap_err();
    let err = err.to_lowercase();
    assert!(err.contains("digest") || err.contains("size"), "{err}");

    // Drop stops the registry and removes its storage.
    let (addr, storage) = (reg.addr(), reg.storage_dir());
    drop(reg);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "registry still listening"
    );
    assert!(!storage.exists(), "registry storage left behind");
}

#[test]
fn registry_serves_index_with_platforms() {
    if !keel_testkit::privileged("registry_serves_index_with_platforms") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    for media in [MediaTypes::Oci, MediaTypes::Docker] {
        let img = image_builder::build_with(Variant::Single, media).unwrap();
        let tag = format!("{media:?}").to_lowercase();
        let index = block_on(img.push_index(&reg.host(), "multiarch", &tag, None)).unwrap();
        let r = format!("docker://{}/multiarch:{tag}", reg.host());
        let raw = skopeo(&["inspect", "--tls-verify=false", "--raw", &r]).unwrap();
        assert_eq!(raw.as_bytes(), index.json.as_slice());
        assert_eq!(json(&raw)["mediaType"], index.media_type.as_str());
        for (arch, want) in [
            ("amd64", &img.manifest_digest),
            ("arm64", &index.arm64.manifest_digest),
        ] {
            let out = tempfile::tempdir().unwrap();
            skopeo(&[
                "copy",
                "--quiet",
                "--override-os",
                "linux",
                "--override-arch",
                arch,
                "--src-tls-verify=false",
                &r,
                &format!("dir:{}", out.path().display()),
            ])
            .unwrap();
            let got = dir_manifest_digest(out.path());
            assert_eq!(&got, want, "{media:?} {arch}");
        }
    }
}

#[test]
fn htpasswd_registry_requires_credentials() {
    if !keel_testkit::privileged("htpasswd_registry_requires_credentials") {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("keel".into(), "s3cret".into())),
    })
    .unwrap();
    assert_eq!(reg.credentials(), Some(("keel", "s3cret")));
    assert_eq!(reg.v2_status().unwrap(), 401);
    assert_eq!(
        reg.get_status("/v2/", Some(("keel", "s3cret"))).unwrap(),
        200
    );
    assert_eq!(
        reg.get_status("/v2/", Some(("keel", "wrong"))).unwrap(),
        401
    );

    let img = image_builder::build(Variant::Single).unwrap();
    let anon = block_on(img.push(&reg.host(), "private", "v1", None));
    assert!(anon.is_err(), "anonymous push must fail");
    block_on(img.push(&reg.host(), "private", "v1", Some(("keel", "s3cret")))).unwrap();

    let r = format!("docker://{}/private:v1", reg.host());
    assert!(skopeo(&["inspect", "--tls-verify=false", "--no-creds", &r]).is_err());
    let info = json(
        &skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "keel:s3cret",
            &r,
        ])
        .unwrap(),
    );
    assert_eq!(info["Digest"], img.manifest_digest.as_str());
}

#[test]
fn archives_are_readable_by_skopeo() {
    if !keel_testkit::privileged("archives_are_readable_by_skopeo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for variant in [Variant::Single, Variant::Multi] {
        let img = image_builder::build(variant).unwrap();
        let name = variant.name();

        let layout = dir.path().join(format!("{name}-layout"));
        img.write_oci_layout(&layout, "latest").unwrap();
        let info =
            json(&skopeo(&["inspect", &format!("oci:{}:latest", layout.display())]).unwrap());
        assert_eq!(
            info["Digest"],
            img.manifest_digest.as_str(),
            "{name} oci layout"
        );

        let oci_archive = dir.path().join(format!("{name}-oci.tar"));
        img.write_oci_archive(&oci_archive, "latest").unwrap();
        let info =
            json(&skopeo(&["inspect", &format!("oci-archive:{}", oci_archive.display())]).unwrap());
        assert_eq!(
            info["Digest"],
            img.manifest_digest.as_str(),
            "{name} oci archive"
        );

        let docker_archive = dir.path().join(format!("{name}-docker.tar"));
        img.write_docker_archive(&docker_archive, "keel/busybox:test")
            .unwrap();
        // Naming the tag makes skopeo look it up in manifest.json's RepoTags.
        let src = format!(
            "docker-archive:{}:keel/busybox:test",
            docker_archive.display()
        );
        let wrong = format!(
            "docker-archive:{}:keel/busybox:other",
            docker_archive.display()
        );
        assert!(
            skopeo(&["inspect", "--raw", &wrong]).is_err(),
            "unknown tag accepted"
        );
        let raw = json(&skopeo(&["inspect", "--raw", &src]).unwrap());
        assert_eq!(
            raw["config"]["digest"],
            img.config_digest.as_str(),
            "{name} docker archive"
        );
        // skopeo hashes the uncompressed layer.tar files it reads: they must be our diff_ids.
        let diff_ids: Vec<&str> = img.layers.iter().map(|l| l.diff_id.as_str()).collect();
        let got: Vec<&str> = raw["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        assert_eq!(got, diff_ids, "{name} docker archive layers");
        // And a full copy out of it verifies every layer.
        let out = dir.path().join(format!("{name}-copy"));
        skopeo(&["copy", "--quiet", &src, &format!("oci:{}:x", out.display())]).unwrap();
    }
}

#[test]
fn throttle_limits_server_to_client_rate() {
    const SIZE: usize = 1024 * 1024;
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    let serve = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        let mut req = [0u8; 4];
        conn.read_exact(&mut req).unwrap();
        assert_eq!(&req, b"ping");
        conn.write_all(&vec![7u8; SIZE]).unwrap();
    });
    let proxy = ThrottleProxy::start(target, 2 * 1024 * 1024).unwrap();
    assert_eq!(proxy.target(), target);
    let start = Instant::now();
    let mut client = std::net::TcpStream::connect(proxy.addr()).unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    let elapsed = start.elapsed();
    serve.join().unwrap();
    assert_eq!(got.len(), SIZE);
    assert!(got.iter().all(|b| *b == 7));
    assert!(
        elapsed >= Duration::from_millis(400),
        "1 MiB at 2 MiB/s took {elapsed:?}"
    );
    assert_eq!(proxy.bytes_to_client(), SIZE as u64);
    assert_eq!(proxy.connections(), 1);
}

#[test]
fn throttle_pause_and_drop_cut_a_transfer() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    let serve = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        // The peer going away mid-write is the point of this test.
        let _ = conn.write_all(&vec![1u8; 4 * 1024 * 1024]);
    });
    let proxy = ThrottleProxy::start(target, 1024 * 1024).unwrap();
    let mut client = std::net::TcpStream::connect(proxy.addr()).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    client.read_exact(&mut buf).unwrap();
    proxy.set_rate(0);
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = proxy.bytes_to_client();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        proxy.bytes_to_client(),
        paused_at,
        "paused proxy still forwards"
    );
    drop(proxy);
    // After the proxy is gone the client sees EOF or a reset, never the rest of the data.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(buf.len() + rest.len() < 4 * 1024 * 1024);
    drop(client);
    serve.join().unwrap();
}
