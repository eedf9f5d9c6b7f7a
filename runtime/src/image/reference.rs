//! Image references: parsing and the normalized names the store records.
//!
//! `busybox` means `docker.io/library/busybox:latest`, as in every container runtime. The store
//! keys tags by the normalized form, so `busybox`, `library/busybox:latest` and
//! `docker.io/library/busybox:latest` name one image.

use oci_client::Reference;

use super::ImageError;

/// Parses and normalizes an image reference.
pub fn parse(reference: &str) -> Result<Reference, ImageError> {
    let trimmed = reference.trim();
    if trimmed.is_empty() {
        return Err(ImageError::InvalidReference {
            reference: reference.to_owned(),
            reason: "empty reference".to_owned(),
        });
    }
    trimmed
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidReference {
            reference: reference.to_owned(),
            reason: e.to_string(),
        })
}

/// `registry/repository:tag` for a tagged reference (digest-only references have no tag name).
pub fn tag_name(r: &Reference) -> Option<String> {
    if r.digest().is_some() && r.tag().is_none() {
        return None;
    }
    Some(format!(
        "{}/{}:{}",
        r.registry(),
        r.repository(),
        r.tag().unwrap_or("latest")
    ))
}

/// `registry/repository@digest`: the repo digest recorded for a pulled manifest.
pub fn digest_name(r: &Reference, manifest_digest: &str) -> String {
    format!("{}/{}@{}", r.registry(), r.repository(), manifest_digest)
}

/// Normalizes a tag as written in a docker-archive's RepoTags or an OCI layout's ref name.
pub fn normalize_tag(tag: &str) -> Result<String, ImageError> {
    let r = parse(tag)?;
    tag_name(&r).ok_or_else(|| ImageError::InvalidReference {
        reference: tag.to_owned(),
        reason: "expected a tag, found a digest".to_owned(),
    })
}

/// Validates a digest string: `sha256:` and 64 lowercase hex characters.
pub fn check_digest(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    hex.ok_or_else(|| ImageError::InvalidDigest {
        digest: digest.to_owned(),
    })
}

/// The digests named by the entries of a directory whose files are `<64 hex>` (blobs,
/// snapshots); anything else in it (work files, locks) is ignored.
pub fn digests_in(dir: &std::path::Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .map(|hex| format!("sha256:{hex}"))
        .filter(|d| check_digest(d).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_normalize_to_docker_hub() {
        let r = parse("busybox").unwrap();
        assert_eq!(tag_name(&r).unwrap(), "docker.io/library/busybox:latest");
        let r = parse("127.0.0.1:5000/test/busybox:v1").unwrap();
        assert_eq!(tag_name(&r).unwrap(), "127.0.0.1:5000/test/busybox:v1");
        assert_eq!(
            normalize_tag("busybox:1").unwrap(),
            "docker.io/library/busybox:1"
        );
    }

    #[test]
    fn digest_references_have_no_tag() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse(&format!("quay.io/x/y@{d}")).unwrap();
        assert_eq!(tag_name(&r), None);
        assert_eq!(digest_name(&r, &d), format!("quay.io/x/y@{d}"));
    }

    #[test]
    fn bad_references_name_the_input() {
        let e = parse("UPPER/Case:tag").unwrap_err().to_string();
        assert!(e.contains("UPPER/Case:tag"), "{e}");
        assert!(parse("  ").is_err());
        assert!(check_digest("sha256:abc").is_err());
        assert!(check_digest(&format!("sha256:{}", "0".repeat(64))).is_ok());
    }
}
