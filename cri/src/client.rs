//! Connecting a CRI client to keel's (or any CRI runtime's) unix socket: what crictl does, for
//! tests and tools. [`connect`] fails at once if nobody listens.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::image_service_client::ImageServiceClient;
use crate::api::runtime_service_client::RuntimeServiceClient;

/// Messages up to 16 MiB, as kubelet allows (ListImages on a node with many images is large).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// A gRPC channel over the unix socket at `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_owned();
    // The URI is required by tonic but unused: every connection goes to the socket.
    Endpoint::from_static("http://keel.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Both CRI clients over one channel.
pub fn clients(channel: Channel) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    (
        RuntimeServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        ImageServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
    )
}
