//! Image references: parsing and the normalized names the store records.
//!
//! `busybox` means `docker.io/library/busybox:latest`, as in every container runtime. The store
//! keys tags by the normalized form, so `busybox`, `library/busybox:latest` and
//! `docker.io/library/busybox:latest` name one image.

use oci_client::Reference;

use super::ImageError;

/// Parses and normalizes an image reference.
///
/// The grammar is distribution's (`[domain[:port]/]path[:tag][@digest]`, path components in
/// lowercase), checked by hand: oci-spec's parser compiles one large regex on first use, which
/// cost a `keel image pull` ~15 ms of its start-up. The tests check this parser against it.
pub fn parse(reference: &str) -> Result<Reference, ImageError> {
    let trimmed = reference.trim();
    parse_trimmed(trimmed).map_err(|reason| ImageError::InvalidReference {
        reference: reference.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Longest repository name (after normalization) distribution accepts.
const NAME_MAX: usize = 255;

fn parse_trimmed(s: &str) -> Result<Reference, &'static str> {
    if s.is_empty() {
        return Err("empty reference");
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(parse_digest(digest)?)),
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag
        && !valid_tag(tag)
    {
        return Err("invalid tag: 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'");
    }
    let (registry, repository) = split_name(name)?;
    if repository.len() > NAME_MAX {
        return Err("repository name must not be more than 255 characters");
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.into(), d),
        (Some(t), None) => Reference::with_tag(registry, repository, t.into()),
        (None, Some(d)) => Reference::with_digest(registry, repository, d),
        (None, None) => Reference::with_tag(registry, repository, "latest".into()),
    })
}

/// Splits `[domain/]path` the way docker normalizes it: the first component is a registry
/// if it has a '.' or ':' or is `localhost`; Docker Hub's one-component names get `library/`.
fn split_name(name: &str) -> Result<(String, String), &'static str> {
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    let path_ok = |p: &str| p.split('/').all(valid_path_component);
    let Some(rest) = rest else {
        if !valid_path_component(first) {
            return Err(
                "invalid repository name: lowercase letters, digits and separators (. _ __ -)",
            );
        }
        return Ok(("docker.io".into(), format!("library/{first}")));
    };
    if !path_ok(rest) || !(valid_path_component(first) || valid_domain(first)) {
        return Err("invalid repository name: lowercase letters, digits and separators (. _ __ -)");
    }
    let is_domain = first.contains('.') || first.contains(':') || first == "localhost";
    let (mut registry, mut repository) = if is_domain {
        (first.to_owned(), rest.to_owned())
    } else {
        ("docker.io".to_owned(), name.to_owned())
    };
    if registry == "index.docker.io" {
        registry = "docker.io".into();
    }
    if registry == "docker.io" && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    Ok((registry, repository))
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// Host name labels (`[A-Za-z0-9]`, inner `-`) joined by dots, then an optional `:port`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|x| word(*x) || *x == b'.' || *x == b'-')
}

/// `algorithm:hex`, with the hex length the algorithm implies.
fn parse_digest(d: &str) -> Result<String, &'static str> {
    let Some((alg, hex)) = d.split_once(':') else {
        return Err("invalid digest: expected ALGORITHM:HEX");
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    if !alg_ok || hex.len() < 32 || !hex.bytes().all(|x| x.is_ascii_hexdigit()) {
        return Err("invalid digest: expected ALGORITHM:HEX");
    }
    let want = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid digest length");
    }
    Ok(d.to_owned())
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

    /// The hand-written parser agrees with oci-spec's regex, on what it accepts and on the
    /// normalized parts.
    #[test]
    fn parser_agrees_with_the_distribution_regex() {
        let d256 = format!("sha256:{}", "ab".repeat(32));
        let d512 = format!("sha512:{}", "0".repeat(128));
        let cases = [
            "busybox".to_owned(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/busybox".into(),
            "index.docker.io/busybox:latest".into(),
            "index.docker.io/x/y".into(),
            "localhost/foo".into(),
            "localhost:5000/foo/bar:v1".into(),
            "127.0.0.1:5000/test/busybox:v1".into(),
            "registry.k8s.io/pause:3.9".into(),
            "Registry.Example.COM/a/b".into(),
            "my-registry.io:443/a__b/c.d/e---f:T_a-g.1".into(),
            "foo/bar".into(),
            "Foo/bar".into(),
            "foo".into(),
            format!("quay.io/x/y@{d256}"),
            format!("quay.io/x/y:tag@{d256}"),
            format!("y@{d512}"),
            format!("quay.io/x/y@md5:{}", "a".repeat(32)),
            format!("quay.io/x/y@sha256:{}", "a".repeat(63)),
            format!("quay.io/x/y@sha256:{}", "g".repeat(64)),
            "quay.io/x/y@".into(),
            "UPPER/Case:tag".into(),
            "a:b/c".into(),
            "host:5000".into(),
            "host:port/x".into(),
            "-lead/x".into(),
            "x/-lead".into(),
            "x/trail-".into(),
            "x/a._b".into(),
            "x/a___b".into(),
            "x/a..b".into(),
            "x//y".into(),
            "/x".into(),
            "x/".into(),
            "x:".into(),
            "x:.tag".into(),
            "x:-tag".into(),
            format!("x:{}", "t".repeat(128)),
            format!("x:{}", "t".repeat(129)),
            format!("x/{}", "a".repeat(250)),
            format!("x/{}", "a".repeat(260)),
            "ex-.com/x".into(),
            "ex.-com/x".into(),
            "a.b:/x".into(),
            "x y".into(),
        ];
        for case in &cases {
            let ours = parse_trimmed(case);
            let theirs = case.parse::<Reference>();
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(
                    (a.registry(), a.repository(), a.tag(), a.digest()),
                    (b.registry(), b.repository(), b.tag(), b.digest()),
                    "{case}"
                ),
                (Err(_), Err(_)) => {}
                _ => panic!("{case}: ours {ours:?}, oci-spec {theirs:?}"),
            }
        }
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
