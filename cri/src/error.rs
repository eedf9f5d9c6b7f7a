//! What a CRI RPC can fail with, and which gRPC code each failure is.
//!
//! The mapping is the contract with kubelet and crictl, so it lives in one match
//! ([`CriError::code`]) with a test per decision. The gRPC message is the error's `Display`, which
//! names the image, registry, field or RPC it is about; kubelet shows it in pod events.
//!
//! It must not build `tonic::Status` itself: [`crate::instrument`] does, so every RPC's error
//! goes through the same logging and metrics.

use keel_runtime::ImageError;
use keel_runtime::container::ContainerError;
use keel_runtime::pod::PodError;
use tonic::Code;

/// Everything an RPC handler can return as an error.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// A request field is missing or malformed.
    #[error("invalid request: {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The RPC is part of CRI but keel does not serve it yet.
    #[error("{rpc}: {reason}")]
    Unimplemented {
        rpc: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A pod or container name is taken (CRI: the same metadata while the holder exists).
    #[error("{what} name {name:?} is already reserved for {id}")]
    AlreadyExists {
        what: &'static str,
        name: String,
        id: String,
    },
    /// The pod sandbox or container the request names does not exist.
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// The node cannot do what was asked as it is configured (no CNI config, pod not ready).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// A blocking helper task died (panicked or was cancelled at shutdown).
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for CriError {
    fn from(e: tokio::task::JoinError) -> Self {
        CriError::Task(e.to_string())
    }
}

impl CriError {
    /// Shorthand for a missing or malformed request field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        CriError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC code kubelet and crictl see.
    ///
    /// Image errors follow containerd's `errdefs.ToGRPC` where containerd has a class for the
    /// error (not found, already exists, invalid argument, unauthenticated, unavailable,
    /// failed precondition), and the closest gRPC meaning elsewhere:
    /// - a manifest or tag missing in the registry, or no linux/amd64 image in an index: NotFound
    ///   (containerd: "not found"), so `crictl pull` of a typo says so;
    /// - the registry refusing credentials (401 and 403 both): Unauthenticated. Kubelet treats
    ///   every pull failure alike (ErrImagePull with the message), the code is for tools;
    /// - the registry unreachable or a download broken off: Unavailable (retryable);
    /// - any other registry answer: Unknown (what containerd returns for unexpected statuses);
    /// - a digest mismatch: DataLoss (corrupt content; retrying the same mirror will not help);
    /// - an image used by containers: FailedPrecondition;
    /// - an unsupported media type: FailedPrecondition (the image exists; keel cannot use it);
    /// - corrupt local state, io and task failures: Internal.
    pub fn code(&self) -> Code {
        match self {
            CriError::InvalidArgument { .. } => Code::InvalidArgument,
            CriError::Unimplemented { .. } => Code::Unimplemented,
            CriError::Task(_) => Code::Internal,
            CriError::Image(e) => image_code(e),
            CriError::AlreadyExists { .. } => Code::AlreadyExists,
            CriError::NotFound { .. } => Code::NotFound,
            CriError::FailedPrecondition(_) => Code::FailedPrecondition,
            CriError::Pod(e) => pod_code(e),
            CriError::Container(e) => container_code(e),
        }
    }
}

/// Pod errors: refusals before anything was made are the caller's (InvalidArgument,
/// AlreadyExists); a pod in the wrong state is FailedPrecondition; the rest is the node's.
fn pod_code(e: &PodError) -> Code {
    match e {
        PodError::NotFound(_) => Code::NotFound,
        PodError::NameInUse(_) => Code::AlreadyExists,
        PodError::InvalidConfig(_) | PodError::Sysctl { .. } => Code::InvalidArgument,
        PodError::Ambiguous(_) | PodError::InvalidState { .. } => Code::FailedPrecondition,
        PodError::Container(c) => container_code(c),
        PodError::Namespace { .. }
        | PodError::Keeper { .. }
        | PodError::Network { .. }
        | PodError::Cgroup { .. }
        | PodError::State(_)
        | PodError::Fs(_) => Code::Internal,
    }
}

/// Container errors: a config the image cannot satisfy (unknown user, capability, seccomp
/// profile) is InvalidArgument; a timeout is DeadlineExceeded.
fn container_code(e: &ContainerError) -> Code {
    match e {
        ContainerError::NotFound(_) => Code::NotFound,
        ContainerError::NameInUse(_) => Code::AlreadyExists,
        ContainerError::Ambiguous(_) | ContainerError::InvalidState { .. } => {
            Code::FailedPrecondition
        }
        ContainerError::Timeout { .. } => Code::DeadlineExceeded,
        ContainerError::Image(i) => image_code(i),
        ContainerError::Spec(_) | ContainerError::Seccomp(_) | ContainerError::User(_) => {
            Code::InvalidArgument
        }
        ContainerError::Libcontainer { .. }
        | ContainerError::Monitor { .. }
        | ContainerError::Exec { .. }
        | ContainerError::Rootfs(_)
        | ContainerError::Cgroup(_)
        | ContainerError::State(_)
        | ContainerError::Fs(_) => Code::Internal,
    }
}

fn image_code(e: &ImageError) -> Code {
    match e {
        ImageError::InvalidReference { .. }
        | ImageError::InvalidDigest { .. }
        | ImageError::Ambiguous { .. }
        | ImageError::Import { .. } => Code::InvalidArgument,
        ImageError::Config { .. } => Code::FailedPrecondition,
        ImageError::NotFoundInRegistry { .. }
        | ImageError::NoMatchingPlatform { .. }
        | ImageError::ImageNotFound { .. } => Code::NotFound,
        ImageError::Unauthorized { .. } => Code::Unauthenticated,
        ImageError::Unreachable { .. } => Code::Unavailable,
        ImageError::Registry { .. } => Code::Unknown,
        ImageError::DigestMismatch { .. } => Code::DataLoss,
        ImageError::UnsupportedMediaType { .. } | ImageError::InUse { .. } => {
            Code::FailedPrecondition
        }
        ImageError::Malformed { .. }
        | ImageError::Unpack { .. }
        | ImageError::CorruptRecord { .. }
        | ImageError::Fs(_)
        | ImageError::Task(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: fn(String, String, String) -> ImageError) -> CriError {
        CriError::Image(kind(
            "127.0.0.1:5000/a:v1".into(),
            "127.0.0.1:5000".into(),
            "why".into(),
        ))
    }

    #[test]
    fn pod_and_container_failures_map_to_cri_codes() {
        let e = CriError::AlreadyExists {
            what: "pod sandbox",
            name: "web_default_u1_0".into(),
            id: "abc".into(),
        };
        assert_eq!(e.code(), Code::AlreadyExists);
        assert!(e.to_string().contains("abc"), "{e}");
        assert_eq!(
            CriError::Pod(PodError::NotFound("p".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            CriError::Pod(PodError::InvalidConfig("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            CriError::Container(ContainerError::InvalidState {
                id: "c".into(),
                op: "exec",
                status: "exited".into()
            })
            .code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            CriError::Pod(PodError::Container(ContainerError::NameInUse("n".into()))).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            CriError::FailedPrecondition("no CNI".into()).code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn registry_failures_map_to_distinct_codes() {
        let nf = reg(
            |reference, registry, reason| ImageError::NotFoundInRegistry {
                reference,
                registry,
                reason,
            },
        );
        assert_eq!(nf.code(), Code::NotFound);
        let auth = reg(|reference, registry, reason| ImageError::Unauthorized {
            reference,
            registry,
            reason,
        });
        assert_eq!(auth.code(), Code::Unauthenticated);
        assert!(auth.to_string().contains("127.0.0.1:5000"), "{auth}");
        let down = reg(|reference, registry, reason| ImageError::Unreachable {
            reference,
            registry,
            reason,
        });
        assert_eq!(down.code(), Code::Unavailable);
        let other = reg(|reference, registry, reason| ImageError::Registry {
            reference,
            registry,
            reason,
        });
        assert_eq!(other.code(), Code::Unknown);
    }

    #[test]
    fn local_failures_map_to_client_or_server_codes() {
        let e = CriError::Image(ImageError::InvalidReference {
            reference: "UP".into(),
            reason: "bad".into(),
        });
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = CriError::Image(ImageError::ImageNotFound { name: "x".into() });
        assert_eq!(e.code(), Code::NotFound);
        let e = CriError::Image(ImageError::InUse {
            id: "sha256:a".into(),
        });
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = CriError::Image(ImageError::DigestMismatch {
            what: "layer".into(),
            expected: "a".into(),
            actual: "b".into(),
        });
        assert_eq!(e.code(), Code::DataLoss);
        let e = CriError::Image(ImageError::Task("boom".into()));
        assert_eq!(e.code(), Code::Internal);
        let e = CriError::invalid("image.image", "empty");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.to_string(), "invalid request: image.image: empty");
        let e = CriError::Unimplemented {
            rpc: "RunPodSandbox",
            reason: "pod sandboxes land with the runtime issue",
        };
        assert_eq!(e.code(), Code::Unimplemented);
        assert_eq!(
            e.to_string(),
            "RunPodSandbox: pod sandboxes land with the runtime issue"
        );
    }
}
