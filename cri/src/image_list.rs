//! ListImages: every image on the node, or only the one `filter.image.image` names (a reference,
//! an id or an id prefix, resolved as every other image RPC resolves names).

use keel_runtime::image::{ImageRecord, metadata};

use crate::image_convert::{config_user, to_cri_image};
use crate::service::CriService;
use crate::{CriError, api};

pub(crate) async fn list_images(
    svc: &CriService,
    req: api::ListImagesRequest,
) -> Result<api::ListImagesResponse, CriError> {
    let all = svc.images.list().await?;
    let selected = select(&all, filter_name(&req))?;
    let mut images = Vec::with_capacity(selected.len());
    for rec in selected {
        // The uid/username come from the config blob. One unreadable config must not hide every
        // other image from kubelet's image GC, so it is logged and the image listed without them;
        // ImageStatus of that image reports the error itself.
        let user = match svc.images.config(rec).await {
            Ok(config) => config_user(&config).map(str::to_owned),
            Err(e) => {
                tracing::warn!(image = %rec.id, error = %e, "read image config");
                None
            }
        };
        images.push(to_cri_image(rec, user.as_deref()));
    }
    Ok(api::ListImagesResponse { images })
}

/// The filter's image name; an absent filter, spec or empty name means every image.
fn filter_name(req: &api::ListImagesRequest) -> Option<&str> {
    req.filter
        .as_ref()
        .and_then(|f| f.image.as_ref())
        .map(|s| s.image.trim())
        .filter(|s| !s.is_empty())
}

/// The records a filter selects: all of them, or the one the name resolves to (none if it
/// resolves to nothing; an ambiguous id prefix is the caller's error).
fn select<'a>(
    all: &'a [ImageRecord],
    name: Option<&str>,
) -> Result<Vec<&'a ImageRecord>, CriError> {
    match name {
        None => Ok(all.iter().collect()),
        Some(name) => Ok(metadata::resolve(all, name)?.into_iter().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_convert::tests::record;

    fn filtered(name: &str) -> api::ListImagesRequest {
        api::ListImagesRequest {
            filter: Some(api::ImageFilter {
                image: Some(api::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
            }),
        }
    }

    #[test]
    fn a_filter_selects_by_tag_or_id_and_no_filter_selects_all() {
        let all = vec![
            record('a', &["127.0.0.1:5000/test/busybox:v1"]),
            record('b', &["docker.io/library/busybox:latest"]),
        ];
        assert_eq!(
            select(&all, filter_name(&api::ListImagesRequest::default()))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(select(&all, filter_name(&filtered(" "))).unwrap().len(), 2);
        let hit = select(&all, filter_name(&filtered("busybox"))).unwrap();
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].id, all[1].id);
        let hit = select(&all, filter_name(&filtered("aaaaaa"))).unwrap();
        assert_eq!(hit[0].id, all[0].id);
        assert!(
            select(&all, filter_name(&filtered("nginx")))
                .unwrap()
                .is_empty()
        );
    }
}
