//! ImageStatus: the image a name resolves to, or an empty response when the node does not have
//! it (CRI: "If the image isn't present, the returned image status MUST be nil", which is how
//! kubelet decides to pull). With `verbose`, `info["info"]` holds a JSON object like
//! containerd's: the image config as `imageSpec`, plus the manifest and layers keel recorded.

use std::collections::HashMap;

use keel_runtime::image::ImageRecord;
use oci_spec::image::ImageConfiguration;

use crate::image_convert::{config_user, image_name, to_cri_image};
use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn image_status(
    svc: &CriService,
    req: api::ImageStatusRequest,
) -> Result<api::ImageStatusResponse, CriError> {
    let name = image_name(req.image.as_ref(), "image.image")?;
    let Some(rec) = svc.images.get(name).await? else {
        tracing::debug!("not on this node");
        return Ok(api::ImageStatusResponse::default());
    };
    let config = svc.images.config(&rec).await?;
    let info = if req.verbose {
        verbose_info(&rec, &config)
    } else {
        HashMap::new()
    };
    Ok(api::ImageStatusResponse {
        image: Some(to_cri_image(&rec, config_user(&config))),
        info,
    })
}

/// `{"info": "<json>"}`: containerd's verbose shape (`imageSpec`) plus keel's record fields.
fn verbose_info(rec: &ImageRecord, config: &ImageConfiguration) -> HashMap<String, String> {
    let info = serde_json::json!({
        "imageSpec": config,
        "manifestDigest": rec.manifest_digest,
        "manifestMediaType": rec.manifest_media_type,
        "indexDigest": rec.index_digest,
        "layers": rec.layers,
        "added": rec.added,
    });
    HashMap::from([("info".to_owned(), info.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_convert::tests::record;

    #[test]
    fn verbose_info_carries_the_image_spec_as_json() {
        let rec = record('a', &["127.0.0.1:5000/test/busybox:v1"]);
        let config: ImageConfiguration = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"User":"1000","Cmd":["sh"]},
                "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let info = verbose_info(&rec, &config);
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        assert_eq!(v["imageSpec"]["config"]["User"], "1000");
        assert_eq!(v["imageSpec"]["architecture"], "amd64");
        assert_eq!(v["manifestDigest"], rec.manifest_digest);
        assert_eq!(config_user(&config), Some("1000"));
    }
}
