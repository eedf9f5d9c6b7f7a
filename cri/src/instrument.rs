//! The one instrumentation layer every CRI RPC passes through: a tracing span named after the RPC
//! (with the image, pod or container id when the request carries one), a duration histogram
//! labelled by RPC and gRPC code, a log line for every failure, and the one place where a
//! [`CriError`] becomes a `tonic::Status`.
//!
//! Why a generic wrapper ([`unary`]) called by every trait method rather than a tower layer over
//! the HTTP/2 requests: a tower layer sees only the URL path and encoded bytes, so it could not
//! name the image or container an RPC is about without decoding every message twice, it could not
//! log the typed error (only the status it already became), and it would have to wrap response
//! bodies to read the `grpc-status` trailer. This mirrors containerd's `instrumentedService`,
//! which wraps every RPC method the same way. `service.rs` implements each tonic trait method as
//! exactly one call to [`unary`], so no RPC can bypass it; the compiler makes every request type
//! say which ids it carries ([`RequestIds`]).
//!
//! It must not hold RPC logic: handlers live in their own files and return `Result<_, CriError>`.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::CriError;
use crate::api;

/// Name of the RPC duration histogram (`_bucket`, `_sum` and `_count` series).
pub const RPC_DURATION: &str = "keel_cri_rpc_duration_seconds";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
    code: &'static str,
}

type DurationFamily = Family<RpcLabels, Histogram, fn() -> Histogram>;

/// The CRI server's Prometheus metrics. Cheap to clone; clones share the series.
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    durations: DurationFamily,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~131 s: status RPCs take microseconds to milliseconds, pulls take seconds to minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let durations: DurationFamily = Family::new_with_constructor(duration_histogram);
        let mut registry = Registry::default();
        registry.register(
            RPC_DURATION,
            "Duration of CRI RPCs by RPC name and gRPC status code",
            durations.clone(),
        );
        Metrics {
            registry: std::sync::Arc::new(registry),
            durations,
        }
    }

    fn observe(&self, rpc: &'static str, code: Code, elapsed: Duration) {
        self.durations
            .get_or_create(&RpcLabels {
                rpc,
                code: code_name(code),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Every series in the OpenMetrics text format (which Prometheus scrapes natively).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a fmt::Write into a String, which cannot fail; keep the partial output.
            tracing::error!(error = %e, "encode metrics");
        }
        out
    }
}

/// The gRPC code as grpc-go spells it (`OK`, `NotFound`, ...), so dashboards written for
/// containerd's metrics read keel's too.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Records the RPC's outcome as Canceled if the client goes away (tonic drops the handler's
/// future) before it finishes.
struct Pending<'a> {
    metrics: &'a Metrics,
    rpc: &'static str,
    start: Instant,
    span: tracing::Span,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .observe(self.rpc, Code::Cancelled, self.start.elapsed());
            let _in = self.span.enter();
            tracing::info!(elapsed = ?self.start.elapsed(), "canceled by the client");
        }
    }
}

/// Runs one unary RPC: `handler` gets the decoded request and returns the response or a
/// [`CriError`]. Every tonic trait method of the CRI services is a call to this.
pub async fn unary<Req, Resp, Fut>(
    metrics: &Metrics,
    rpc: &'static str,
    request: tonic::Request<Req>,
    handler: impl FnOnce(Req) -> Fut,
) -> Result<tonic::Response<Resp>, tonic::Status>
where
    Req: RequestIds,
    Fut: Future<Output = Result<Resp, CriError>>,
{
    let req = request.into_inner();
    let span = tracing::info_span!("cri", rpc, image = Empty, pod = Empty, container = Empty);
    req.record_ids(&span);
    let mut pending = Pending {
        metrics,
        rpc,
        start: Instant::now(),
        span: span.clone(),
        done: false,
    };
    let result = handler(req).instrument(span.clone()).await;
    pending.done = true;
    let elapsed = pending.start.elapsed();
    let _in = span.enter();
    match result {
        Ok(resp) => {
            metrics.observe(rpc, Code::Ok, elapsed);
            tracing::debug!(?elapsed, "ok");
            Ok(tonic::Response::new(resp))
        }
        Err(e) => {
            let code = e.code();
            metrics.observe(rpc, code, elapsed);
            let code_str = code_name(code);
            match code {
                // Kubelet polls pod and container RPCs every second; until they are served,
                // one line each would drown the log.
                Code::Unimplemented => tracing::debug!(code = code_str, error = %e, "failed"),
                Code::Internal | Code::DataLoss | Code::Unknown => {
                    tracing::error!(code = code_str, ?elapsed, error = %e, "failed")
                }
                _ => tracing::warn!(code = code_str, ?elapsed, error = %e, "failed"),
            }
            Err(tonic::Status::new(code, e.to_string()))
        }
    }
}

/// The ids a request carries, recorded into its RPC span (`image`, `pod`, `container`). Every
/// request type of both services implements it, so a new RPC cannot skip the question.
pub trait RequestIds {
    fn record_ids(&self, _span: &tracing::Span) {}
}

fn record(span: &tracing::Span, field: &'static str, value: &str) {
    if !value.is_empty() {
        span.record(field, value);
    }
}

fn spec_image(spec: Option<&api::ImageSpec>) -> &str {
    spec.map(|s| s.image.as_str()).unwrap_or("")
}

/// Request types that carry no id worth a span field.
macro_rules! no_ids {
    ($($t:ident),* $(,)?) => { $(impl RequestIds for api::$t {})* };
}

/// Request types whose `$field` is the id recorded as span field `$name`.
macro_rules! id_field {
    ($name:literal, $field:ident: $($t:ident),* $(,)?) => {
        $(impl RequestIds for api::$t {
            fn record_ids(&self, span: &tracing::Span) {
                record(span, $name, &self.$field);
            }
        })*
    };
}

no_ids!(
    VersionRequest,
    StatusRequest,
    RuntimeConfigRequest,
    UpdateRuntimeConfigRequest,
    ImageFsInfoRequest,
    ListPodSandboxRequest,
    ListContainersRequest,
    ListContainerStatsRequest,
    ListPodSandboxStatsRequest,
    GetEventsRequest,
    ListMetricDescriptorsRequest,
    ListPodSandboxMetricsRequest,
);

id_field!(
    "pod",
    pod_sandbox_id: StopPodSandboxRequest,
    RemovePodSandboxRequest,
    PodSandboxStatusRequest,
    PortForwardRequest,
    PodSandboxStatsRequest,
);

id_field!(
    "container",
    container_id: StartContainerRequest,
    StopContainerRequest,
    RemoveContainerRequest,
    ContainerStatusRequest,
    UpdateContainerResourcesRequest,
    ReopenContainerLogRequest,
    ExecSyncRequest,
    ExecRequest,
    AttachRequest,
    ContainerStatsRequest,
    CheckpointContainerRequest,
);

impl RequestIds for api::RunPodSandboxRequest {
    fn record_ids(&self, span: &tracing::Span) {
        if let Some(m) = self.config.as_ref().and_then(|c| c.metadata.as_ref()) {
            record(span, "pod", &format!("{}/{}", m.namespace, m.name));
        }
    }
}

impl RequestIds for api::CreateContainerRequest {
    fn record_ids(&self, span: &tracing::Span) {
        record(span, "pod", &self.pod_sandbox_id);
        if let Some(m) = self.config.as_ref().and_then(|c| c.metadata.as_ref()) {
            record(span, "container", &m.name);
        }
    }
}

impl RequestIds for api::ListImagesRequest {
    fn record_ids(&self, span: &tracing::Span) {
        record(
            span,
            "image",
            spec_image(self.filter.as_ref().and_then(|f| f.image.as_ref())),
        );
    }
}

macro_rules! image_spec {
    ($($t:ident),* $(,)?) => {
        $(impl RequestIds for api::$t {
            fn record_ids(&self, span: &tracing::Span) {
                record(span, "image", spec_image(self.image.as_ref()));
            }
        })*
    };
}

image_spec!(ImageStatusRequest, PullImageRequest, RemoveImageRequest);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_outcome_lands_in_the_histogram() {
        let m = Metrics::new();
        let ok: Result<tonic::Response<api::VersionResponse>, _> = unary(
            &m,
            "Version",
            tonic::Request::new(api::VersionRequest::default()),
            |_| async { Ok(api::VersionResponse::default()) },
        )
        .await;
        assert!(ok.is_ok());
        let err: Result<tonic::Response<api::RunPodSandboxResponse>, _> = unary(
            &m,
            "RunPodSandbox",
            tonic::Request::new(api::RunPodSandboxRequest::default()),
            |_| async {
                Err(CriError::Unimplemented {
                    rpc: "RunPodSandbox",
                    reason: "later",
                })
            },
        )
        .await;
        let status = err.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(status.message(), "RunPodSandbox: later");
        let text = m.encode();
        assert!(
            text.contains(r#"keel_cri_rpc_duration_seconds_count{rpc="Version",code="OK"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keel_cri_rpc_duration_seconds_count{rpc="RunPodSandbox",code="Unimplemented"} 1"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_dropped_rpc_counts_as_canceled() {
        let m = Metrics::new();
        let fut = unary(
            &m,
            "PullImage",
            tonic::Request::new(api::PullImageRequest::default()),
            |_| std::future::pending::<Result<api::PullImageResponse, CriError>>(),
        );
        let timed_out = tokio::time::timeout(Duration::from_millis(10), fut).await;
        assert!(timed_out.is_err());
        let text = m.encode();
        assert!(
            text.contains(
                r#"keel_cri_rpc_duration_seconds_count{rpc="PullImage",code="Canceled"} 1"#
            ),
            "{text}"
        );
    }
}
