//! Privileged tests of the image store against a real registry (Debian's docker-registry on
//! 127.0.0.1, started per test) with the busybox test images.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use keel_runtime::image::{
    Credentials, ImageError, ImageStore, PullRequest, RegistryOptions, RemoveMode,
};
use keel_testkit::image_builder::{self, MediaTypes, Variant, multi_expect, single_expect};
use keel_testkit::registry::{self, Registry};
use keel_testkit::{StateRoot, privileged};

fn store(root: &StateRoot, reg: &Registry) -> ImageStore {
    let opts = RegistryOptions {
        insecure: vec![reg.host()],
        ..Default::default()
    };
    ImageStore::open(root.path(), opts).unwrap()
}

async fn push(reg: &Registry, v: Variant, mt: MediaTypes, repo: &str) -> String {
    let img = image_builder::build_cached(v, mt).unwrap();
    img.push(&reg.host(), repo, "v1", reg.credentials())
        .await
        .unwrap();
    format!("{}/{repo}:v1", reg.host())
}

/// Mounts the image's snapshots read-only as one overlay under `root` (unmounted by the
/// StateRoot guard) and returns the merged view.
fn merged_view(root: &StateRoot, dirs: &[PathBuf]) -> PathBuf {
    let target = root.subdir("merged").unwrap();
    let mut lower: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if lower.len() == 1 {
        // overlayfs needs two lowerdirs without an upperdir
        lower.push(root.subdir("empty").unwrap().display().to_string());
    }
    let opts = format!("lowerdir={}", lower.join(":"));
    keel_testkit::run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            target.to_str().unwrap(),
        ],
    )
    .unwrap();
    target
}

fn rel(p: &str) -> &str {
    p.trim_start_matches('/')
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_single_and_multi_layer_images_and_applies_whiteouts() {
    if !privileged("pulls_single_and_multi_layer_images_and_applies_whiteouts") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);

    let single = push(&reg, Variant::Single, MediaTypes::Oci, "test/single").await;
    let rep = s.pull(PullRequest::new(&single)).await.unwrap();
    let built = image_builder::build_cached(Variant::Single, MediaTypes::Oci).unwrap();
    assert_eq!(rep.image.id, built.config_digest);
    assert_eq!(rep.image.manifest_digest, built.manifest_digest);
    assert_eq!(rep.image.repo_tags, vec![single.clone()]);
    assert_eq!(rep.downloaded_layers, 1);
    let dirs = s.snapshot_dirs(&rep.image).unwrap();
    let view = merged_view(&root, &dirs);
    let busybox = view.join(rel(single_expect::BUSYBOX));
    assert!(std::fs::metadata(&busybox).unwrap().mode() & 0o111 != 0);
    assert_eq!(
        std::fs::read_to_string(view.join("etc/passwd")).unwrap(),
        single_expect::PASSWD
    );
    keel_testkit::run("umount", &[view.to_str().unwrap()]).unwrap();
    std::fs::remove_dir(&view).unwrap();

    let multi = push(&reg, Variant::Multi, MediaTypes::Oci, "test/multi").await;
    let rep = s.pull(PullRequest::new(&multi)).await.unwrap();
    assert_eq!(rep.image.layers.len(), 3);
    // the base layer is shared with the single image: unpacked once
    assert_eq!(rep.reused_layers, 1, "base layer must be reused");
    let view = merged_view(&root, &s.snapshot_dirs(&rep.image).unwrap());
    assert!(
        !view.join(rel(multi_expect::DELETED)).exists(),
        "whiteout not applied"
    );
    for old in single_expect::OLD_FILES {
        assert!(!view.join(rel(old)).exists(), "opaque dir kept {old}");
    }
    let new = view.join(rel(multi_expect::NEW_FILE));
    assert_eq!(
        std::fs::read_to_string(&new).unwrap(),
        multi_expect::NEW_CONTENT
    );
    let link = view.join(rel(multi_expect::HARDLINK));
    assert_eq!(
        std::fs::metadata(&link).unwrap().ino(),
        std::fs::metadata(&new).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(view.join(rel(multi_expect::SYMLINK))).unwrap(),
        Path::new(multi_expect::SYMLINK_TARGET)
    );
    let owned = std::fs::metadata(view.join(rel(multi_expect::OWNED_FILE))).unwrap();
    assert_eq!(owned.mode() & 0o7777, multi_expect::OWNED_MODE);
    assert_eq!(
        (owned.uid(), owned.gid()),
        (multi_expect::OWNED_UID, multi_expect::OWNED_GID)
    );
    let stamp = std::fs::symlink_metadata(view.join(rel(multi_expect::MTIME_FILE))).unwrap();
    assert_eq!(stamp.mtime() as u64, multi_expect::MTIME);
    assert!(
        view.join(rel(multi_expect::ZSTD_FILE)).exists(),
        "zstd layer missing"
    );

    let cfg = s.config(&rep.image).await.unwrap();
    let c = cfg.config().as_ref().unwrap();
    assert_eq!(c.user().as_deref(), Some("keel"));
    assert_eq!(c.working_dir().as_deref(), Some("/home/keel"));

    let listed: Vec<String> = s
        .list()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|r| r.repo_tags)
        .collect();
    assert!(
        listed.contains(&single) && listed.contains(&multi),
        "{listed:?}"
    );
    assert!(s.fs_usage().await.unwrap().bytes > 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn repull_downloads_nothing_and_concurrent_pulls_work_once() {
    if !privileged("repull_downloads_nothing_and_concurrent_pulls_work_once") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    let r = push(&reg, Variant::Multi, MediaTypes::Oci, "test/conc").await;

    let pulls = (0..4).map(|_| {
        let s = s.clone();
        let r = r.clone();
        tokio::spawn(async move { s.pull(PullRequest::new(r)).await })
    });
    let reports: Vec<_> = futures::future::join_all(pulls)
        .await
        .into_iter()
        .map(|j| j.unwrap().unwrap())
        .collect();
    let downloaded: usize = reports.iter().map(|r| r.downloaded_layers).sum();
    assert_eq!(
        downloaded, 3,
        "each of the 3 layers must be downloaded exactly once"
    );
    assert!(reports.iter().all(|x| x.image.id == reports[0].image.id));

    let blob = root.path().join(format!(
        "images/snapshots/{}",
        reports[0].image.layers[2]
            .diff_id
            .trim_start_matches("sha256:")
    ));
    let before = std::fs::metadata(&blob).unwrap();
    let again = s.pull(PullRequest::new(&r)).await.unwrap();
    assert_eq!(again.downloaded_layers, 0);
    assert_eq!(again.downloaded_bytes, 0);
    let after = std::fs::metadata(&blob).unwrap();
    assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));
    assert_eq!(s.list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn index_and_docker_manifest_list_pick_linux_amd64() {
    if !privileged("index_and_docker_manifest_list_pick_linux_amd64") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    for (mt, repo) in [
        (MediaTypes::Oci, "test/oci-index"),
        (MediaTypes::Docker, "test/docker-list"),
    ] {
        let img = image_builder::build_cached(Variant::Single, mt).unwrap();
        let idx = img
            .push_index(&reg.host(), repo, "multiarch", None)
            .await
            .unwrap();
        let reference = format!("{}/{repo}:multiarch", reg.host());
        let rep = s.pull(PullRequest::new(&reference)).await.unwrap();
        assert_eq!(rep.image.manifest_digest, idx.amd64_digest, "{repo}");
        assert_eq!(rep.image.index_digest.as_deref(), Some(idx.digest.as_str()));
        // both variants share one config, hence one image id carrying both repo digests
        let name = format!("{}/{repo}@{}", reg.host(), idx.digest);
        assert!(
            rep.image.repo_digests.contains(&name),
            "{:?}",
            rep.image.repo_digests
        );
        // pull by the index digest gives the same image
        let by_digest = format!("{}/{repo}@{}", reg.host(), idx.digest);
        let rep2 = s.pull(PullRequest::new(by_digest)).await.unwrap();
        assert_eq!(rep2.image.id, rep.image.id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_untags_then_deletes_and_prune_collects_everything() {
    if !privileged("remove_untags_then_deletes_and_prune_collects_everything") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    let a = push(&reg, Variant::Single, MediaTypes::Oci, "test/a").await;
    let b = push(&reg, Variant::Single, MediaTypes::Oci, "test/b").await;
    let m = push(&reg, Variant::Multi, MediaTypes::Oci, "test/m").await;
    for r in [&a, &b, &m] {
        s.pull(PullRequest::new(r)).await.unwrap();
    }
    let none = HashSet::new();
    // a and b name one image: removing a only untags
    let rep = s.remove(&a, RemoveMode::Untag, &none).await.unwrap();
    assert_eq!(rep.untagged, vec![a.clone()]);
    assert!(rep.deleted.is_empty());
    let rep = s.remove(&b, RemoveMode::Untag, &none).await.unwrap();
    assert_eq!(rep.deleted.len(), 1);
    // the base layer is still used by m
    assert_eq!(rep.snapshots_removed, 0);
    assert!(s.get(&b).await.unwrap().is_none());
    let e = s.remove(&b, RemoveMode::Untag, &none).await.unwrap_err();
    assert!(matches!(e, ImageError::ImageNotFound { .. }), "{e}");

    let img = s.get(&m).await.unwrap().unwrap();
    let refuse: HashSet<String> = [img.id.clone()].into();
    let e = s.remove(&m, RemoveMode::Whole, &refuse).await.unwrap_err();
    assert!(matches!(e, ImageError::InUse { .. }), "{e}");

    let rep = s.prune(true, &HashSet::new()).await.unwrap();
    assert_eq!(rep.deleted, vec![img.id]);
    assert_eq!(rep.snapshots_removed, 3);
    let images = root.path().join("images");
    assert_eq!(
        std::fs::read_dir(images.join("snapshots")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(images.join("content/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert!(s.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn digest_mismatched_blob_is_rejected_and_leaves_nothing() {
    if !privileged("digest_mismatched_blob_is_rejected_and_leaves_nothing") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    let r = push(&reg, Variant::Single, MediaTypes::Oci, "test/corrupt").await;
    let built = image_builder::build_cached(Variant::Single, MediaTypes::Oci).unwrap();
    let layer = &built.layers[0];
    let data = reg.blob_data_path(&layer.digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff; // same size, one bit pattern changed
    std::fs::write(&data, &bytes).unwrap();

    let e = s.pull(PullRequest::new(&r)).await.unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&layer.digest), "{e}");
    assert!(s.list().await.unwrap().is_empty());
    let images = root.path().join("images");
    assert_eq!(
        std::fs::read_dir(images.join("snapshots")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(images.join("content/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(images.join("content/ingest"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_registry_needs_the_right_credentials() {
    if !privileged("auth_registry_needs_the_right_credentials") {
        return;
    }
    let reg = Registry::start(registry::RegistryOptions {
        htpasswd: Some(("keel".into(), "s3cret".into())),
    })
    .unwrap();
    let root = StateRoot::new().unwrap();
    let r = push(&reg, Variant::Single, MediaTypes::Oci, "test/private").await;

    let anon = store(&root, &reg);
    let e = anon.pull(PullRequest::new(&r)).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains(&reg.host()), "{e}");

    let mut wrong = PullRequest::new(&r);
    wrong.credentials = Some(Credentials::Basic {
        username: "keel".into(),
        password: "nope".into(),
    });
    let e = anon.pull(wrong).await.unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");

    let mut opts = RegistryOptions {
        insecure: vec![reg.host()],
        ..Default::default()
    };
    opts.auths.insert(
        reg.host(),
        Credentials::Basic {
            username: "keel".into(),
            password: "s3cret".into(),
        },
    );
    let authed = ImageStore::open(root.path(), opts).unwrap();
    let rep = authed.pull(PullRequest::new(&r)).await.unwrap();
    assert_eq!(rep.downloaded_layers, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_schema2_images_pull() {
    if !privileged("docker_schema2_images_pull") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    let r = push(&reg, Variant::Single, MediaTypes::Docker, "test/docker").await;
    let rep = s.pull(PullRequest::new(&r)).await.unwrap();
    assert_eq!(
        rep.image.manifest_media_type,
        image_builder::DOCKER_MANIFEST
    );
    assert!(
        s.snapshot_dirs(&rep.image).unwrap()[0]
            .join("bin/busybox")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_image_and_the_cause() {
    if !privileged("errors_name_the_image_and_the_cause") {
        return;
    }
    let reg = Registry::start_anonymous().unwrap();
    let root = StateRoot::new().unwrap();
    let s = store(&root, &reg);
    push(&reg, Variant::Single, MediaTypes::Oci, "test/exists").await;

    let missing_tag = format!("{}/test/exists:nope", reg.host());
    let e = s.pull(PullRequest::new(&missing_tag)).await.unwrap_err();
    assert!(matches!(e, ImageError::NotFoundInRegistry { .. }), "{e}");
    assert!(e.to_string().contains(&missing_tag), "{e}");

    let missing_repo = format!("{}/test/never:v1", reg.host());
    let e = s.pull(PullRequest::new(&missing_repo)).await.unwrap_err();
    assert!(matches!(e, ImageError::NotFoundInRegistry { .. }), "{e}");

    // a port nothing listens on (bound then released) on loopback
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("127.0.0.1:{port}");
    let s2 = ImageStore::open(
        root.path(),
        RegistryOptions {
            insecure: vec![dead.clone()],
            ..Default::default()
        },
    )
    .unwrap();
    let e = s2
        .pull(PullRequest::new(format!("{dead}/x/y:1")))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unreachable { .. }), "{e}");

    let e = s
        .pull(PullRequest::new("Not A Reference"))
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::InvalidReference { .. }), "{e}");
    assert!(s.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_oci_archives_and_docker_archives() {
    if !privileged("imports_oci_archives_and_docker_archives") {
        return;
    }
    let root = StateRoot::new().unwrap();
    let s = ImageStore::open(root.path(), RegistryOptions::default()).unwrap();
    let work = root.subdir("work").unwrap();

    let multi = image_builder::build_cached(Variant::Multi, MediaTypes::Oci).unwrap();
    let oci = work.join("multi.oci.tar");
    multi
        .write_oci_archive(&oci, "example.com/keel/multi:v1")
        .unwrap();
    let recs = s.import(&oci).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].id, multi.config_digest);
    assert_eq!(recs[0].repo_tags, vec!["example.com/keel/multi:v1"]);
    assert_eq!(s.snapshot_dirs(&recs[0]).unwrap().len(), 3);

    let single = image_builder::build_cached(Variant::Single, MediaTypes::Oci).unwrap();
    let docker = work.join("single.docker.tar");
    single
        .write_docker_archive(&docker, "busybox:keel")
        .unwrap();
    let recs = s.import(&docker).await.unwrap();
    assert_eq!(recs[0].id, single.config_digest);
    assert_eq!(recs[0].repo_tags, vec!["docker.io/library/busybox:keel"]);
    let top = &s.snapshot_dirs(&recs[0]).unwrap()[0];
    assert!(top.join("bin/busybox").exists());
    assert!(s.get("busybox:keel").await.unwrap().is_some());

    // garbage and truncated archives are refused by name and leave no work files behind
    let junk = work.join("junk.tar");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let e = s.import(&junk).await.unwrap_err().to_string();
    assert!(e.contains("junk.tar"), "{e}");
    let bytes = std::fs::read(&oci).unwrap();
    let cut = work.join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(s.import(&cut).await.is_err());
    let ingest = root.path().join("images/content/ingest");
    assert_eq!(std::fs::read_dir(ingest).unwrap().count(), 0);
    assert_eq!(s.list().await.unwrap().len(), 2);
}
