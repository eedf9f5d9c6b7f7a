//! ImageFsInfo: bytes and inodes the image store uses, with the store's directory as the
//! filesystem id. Containers write into the same state root, so `container_filesystems` reports
//! the same filesystem until the runtime issue gives containers their own accounting.

use std::time::{SystemTime, UNIX_EPOCH};

use keel_runtime::image::FsUsage;

use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn image_fs_info(
    svc: &CriService,
    _req: api::ImageFsInfoRequest,
) -> Result<api::ImageFsInfoResponse, CriError> {
    let usage = svc.images.fs_usage().await?;
    let fs = to_cri_usage(&usage, now_nanos());
    Ok(api::ImageFsInfoResponse {
        image_filesystems: vec![fs.clone()],
        container_filesystems: vec![fs],
    })
}

/// Nanoseconds since the epoch; CRI wants a timestamp > 0.
fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(1)
}

fn to_cri_usage(usage: &FsUsage, timestamp: i64) -> api::FilesystemUsage {
    api::FilesystemUsage {
        timestamp,
        fs_id: Some(api::FilesystemIdentifier {
            mountpoint: usage.path.to_string_lossy().into_owned(),
        }),
        used_bytes: Some(api::UInt64Value { value: usage.bytes }),
        inodes_used: Some(api::UInt64Value {
            value: usage.inodes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_maps_onto_filesystem_usage() {
        let u = FsUsage {
            path: "/var/lib/keel/images".into(),
            bytes: 42,
            inodes: 7,
        };
        let fs = to_cri_usage(&u, 5);
        assert_eq!(fs.timestamp, 5);
        assert_eq!(fs.fs_id.unwrap().mountpoint, "/var/lib/keel/images");
        assert_eq!(fs.used_bytes.unwrap().value, 42);
        assert_eq!(fs.inodes_used.unwrap().value, 7);
        assert!(now_nanos() > 0);
    }
}
