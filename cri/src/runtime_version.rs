//! Version: who answers on this socket. `version` is the kubelet runtime API version every CRI
//! runtime reports ("0.1.0"), `runtime_api_version` the CRI version served ("v1").

use crate::{CriError, api};

/// The kubelet runtime API version (containerd and CRI-O report the same constant).
const KUBE_RUNTIME_API_VERSION: &str = "0.1.0";

pub(crate) async fn version(_req: api::VersionRequest) -> Result<api::VersionResponse, CriError> {
    Ok(version_response())
}

fn version_response() -> api::VersionResponse {
    api::VersionResponse {
        version: KUBE_RUNTIME_API_VERSION.to_owned(),
        runtime_name: "keel".to_owned(),
        runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
        runtime_api_version: "v1".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keel_and_cri_v1() {
        let v = version_response();
        assert_eq!(v.runtime_name, "keel");
        assert_eq!(v.runtime_api_version, "v1");
        assert_eq!(v.version, "0.1.0");
        assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    }
}
