//! Translation between keel-runtime image records and CRI image messages, shared by the image
//! RPCs: the request's image name, the record -> CRI `Image`, and the image user -> uid/username.
//! Pure functions only; no store access.

use keel_runtime::image::ImageRecord;

use crate::{CriError, api};

/// The image a request names (`ImageSpec.image`: a reference, an id or an id prefix), trimmed,
/// or InvalidArgument naming `field` when it is missing or empty. A runtime handler is refused:
/// keel has only the default one, and CRI says unknown handlers must be rejected.
pub(crate) fn image_name<'a>(
    spec: Option<&'a api::ImageSpec>,
    field: &'static str,
) -> Result<&'a str, CriError> {
    let spec = spec.ok_or_else(|| CriError::invalid(field, "missing image spec"))?;
    if !spec.runtime_handler.is_empty() {
        return Err(CriError::invalid(
            "image.runtime_handler",
            format!(
                "unknown runtime handler {:?}: keel has only the default handler",
                spec.runtime_handler
            ),
        ));
    }
    let name = spec.image.trim();
    if name.is_empty() {
        return Err(CriError::invalid(field, "empty image name"));
    }
    Ok(name)
}

/// The user an image's config names, as CRI wants it (containerd's `getUserFromImage`): the
/// part before `:`; a number is the uid, anything else the username; empty means neither.
pub(crate) fn image_user(user: Option<&str>) -> (Option<api::Int64Value>, String) {
    let user = user.unwrap_or("");
    let name = user.split(':').next().unwrap_or("");
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(api::Int64Value { value: uid }), String::new()),
        Err(_) => (None, name.to_owned()),
    }
}

/// A record as CRI's `Image`. `user` is the config's `User` (not in the record: it comes from
/// the config blob).
pub(crate) fn to_cri_image(rec: &ImageRecord, user: Option<&str>) -> api::Image {
    let (uid, username) = image_user(user);
    api::Image {
        id: rec.id.clone(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid,
        username,
        spec: Some(api::ImageSpec {
            image: rec.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// The `User` field of an image config, if any.
pub(crate) fn config_user(config: &oci_spec::image::ImageConfiguration) -> Option<&str> {
    config.config().as_ref().and_then(|c| c.user().as_deref())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id_char: char, tags: &[&str]) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{}", id_char.to_string().repeat(64)),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![format!(
                "127.0.0.1:5000/test/busybox@sha256:{}",
                "f".repeat(64)
            )],
            manifest_digest: format!("sha256:{}", "f".repeat(64)),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            layers: vec![],
            size: 1234,
            added: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn users_follow_containerd() {
        assert_eq!(image_user(None), (None, String::new()));
        assert_eq!(image_user(Some("")), (None, String::new()));
        assert_eq!(
            image_user(Some("1000")),
            (Some(api::Int64Value { value: 1000 }), String::new())
        );
        assert_eq!(
            image_user(Some("1000:1000")),
            (Some(api::Int64Value { value: 1000 }), String::new())
        );
        assert_eq!(image_user(Some("keel")), (None, "keel".to_owned()));
        assert_eq!(image_user(Some("keel:staff")), (None, "keel".to_owned()));
    }

    #[test]
    fn a_record_becomes_a_cri_image() {
        let rec = record('a', &["127.0.0.1:5000/test/busybox:v1"]);
        let img = to_cri_image(&rec, Some("0"));
        assert_eq!(img.id, rec.id);
        assert_eq!(img.repo_tags, rec.repo_tags);
        assert_eq!(img.repo_digests, rec.repo_digests);
        assert_eq!(img.size, 1234);
        assert_eq!(img.uid, Some(api::Int64Value { value: 0 }));
        assert_eq!(img.spec.unwrap().image, rec.id);
    }

    #[test]
    fn missing_or_empty_names_are_invalid_arguments_naming_the_field() {
        let e = image_name(None, "image").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("image"), "{e}");
        let spec = api::ImageSpec {
            image: "  ".into(),
            ..Default::default()
        };
        let e = image_name(Some(&spec), "image.image").unwrap_err();
        assert!(e.to_string().contains("image.image"), "{e}");
        let spec = api::ImageSpec {
            image: " busybox ".into(),
            ..Default::default()
        };
        assert_eq!(image_name(Some(&spec), "image.image").unwrap(), "busybox");
        let spec = api::ImageSpec {
            image: "busybox".into(),
            runtime_handler: "kata".into(),
            ..Default::default()
        };
        let e = image_name(Some(&spec), "image.image").unwrap_err();
        assert!(e.to_string().contains("kata"), "{e}");
    }
}
