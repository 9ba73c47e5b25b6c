//! OTLP/gRPC front-end: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::{Accepted, OtlpError, Shared};
use crate::sinks::prometheus::metrics::{Protocol, RejectReason};

struct GrpcReceiver {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if !self.shared.authorized(auth) {
            self.shared
                .reject(Protocol::Grpc, RejectReason::Unauthenticated, "bad token");
            return Err(Status::unauthenticated("missing or wrong bearer token"));
        }
        match self.shared.accept(Protocol::Grpc, request.into_inner()) {
            Accepted::Ok => Ok(Response::new(ExportTraceServiceResponse::default())),
            Accepted::Invalid(e) => Err(Status::invalid_argument(e.to_string())),
            Accepted::QueueFull => Err(Status::unavailable("inferwatch pipeline queue is full")),
        }
    }
}

/// Rewrites two of tonic's framing-level status codes into the ones OTLP specifies, which is
/// what exporters act on:
/// - an oversized message: tonic says OUT_OF_RANGE, OTLP (and the OTel Collector) say
///   RESOURCE_EXHAUSTED;
/// - a body that does not decode: tonic-prost says INTERNAL, OTLP says INVALID_ARGUMENT (the
///   client must not retry it).
///
/// Both errors happen before our handler runs and come back as trailers-only responses, so the
/// status is in the response headers and can be rewritten here.
fn otlp_status_codes(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    let message = headers
        .get("grpc-message")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let contains = |needle: &[u8]| message.windows(needle.len()).any(|w| w == needle);
    let rewrite = match status.as_deref() {
        Some(b"11") if contains(b"too%20large") || contains(b"too large") => Some("8"),
        Some(b"13")
            if message.starts_with(b"failed%20to%20decode")
                || message.starts_with(b"failed to decode") =>
        {
            Some("3")
        }
        _ => None,
    };
    if let Some(code) = rewrite {
        headers.insert("grpc-status", http::HeaderValue::from_static(code));
    }
    response
}

pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), OtlpError> {
    let limit = shared.config.max_request_bytes;
    let tls = shared.tls.clone();
    let service = TraceServiceServer::new(GrpcReceiver { shared })
        .max_decoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(OtlpError::GrpcTls)?;
    }
    builder
        .layer(tower::util::MapResponseLayer::new(otlp_status_codes))
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await
        .map_err(OtlpError::Grpc)
}
