//! RuntimeConfig: the cgroup driver kubelet must use. Keel manages cgroups through the cgroupfs
//! (v1 and v2 trees directly, no systemd delegation), so kubelet must run with
//! `--cgroup-driver=cgroupfs`; kubelet reads this once at start instead of trusting its flag.

use crate::{CriError, api};

pub(crate) async fn runtime_config(
    _req: api::RuntimeConfigRequest,
) -> Result<api::RuntimeConfigResponse, CriError> {
    Ok(api::RuntimeConfigResponse {
        linux: Some(api::LinuxRuntimeConfiguration {
            cgroup_driver: api::CgroupDriver::Cgroupfs as i32,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_driver_is_cgroupfs() {
        let r = runtime_config(api::RuntimeConfigRequest {}).await.unwrap();
        assert_eq!(
            r.linux.unwrap().cgroup_driver(),
            api::CgroupDriver::Cgroupfs
        );
    }
}
