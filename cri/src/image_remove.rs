//! RemoveImage: deletes the image a name resolves to, whatever name was used (CRI semantics,
//! [`RemoveMode::Whole`]), then collects its now unused blobs and snapshots. Removing an image
//! the node does not have succeeds: CRI requires RemoveImage to be idempotent.
//!
//! No container uses images yet, so nothing is refused as in use; the runtime issue passes the
//! images its containers use.

use std::collections::HashSet;

use keel_runtime::ImageError;
use keel_runtime::image::RemoveMode;

use crate::image_convert::image_name;
use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn remove_image(
    svc: &CriService,
    req: api::RemoveImageRequest,
) -> Result<api::RemoveImageResponse, CriError> {
    let name = image_name(req.image.as_ref(), "image.image")?;
    match svc
        .images
        .remove(name, RemoveMode::Whole, &HashSet::new())
        .await
    {
        Ok(report) => {
            tracing::info!(
                deleted = ?report.deleted,
                blobs_removed = report.blobs_removed,
                snapshots_removed = report.snapshots_removed,
                "removed"
            );
            Ok(api::RemoveImageResponse {})
        }
        Err(ImageError::ImageNotFound { .. }) => {
            tracing::debug!("not on this node: nothing to remove");
            Ok(api::RemoveImageResponse {})
        }
        Err(e) => Err(e.into()),
    }
}
