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

/// tonic answers an oversized message with OUT_OF_RANGE; OTLP (and the OTel Collector) use
/// RESOURCE_EXHAUSTED, which is what exporters expect. The framing error is a trailers-only
/// response, so the status is in the response headers and can be rewritten here.
fn oversize_to_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .is_some_and(|v| v.as_bytes().windows(9).any(|w| w == b"too%20lar" || w == b"too large"));
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), OtlpError> {
    let limit = shared.config.max_request_bytes;
    let service = TraceServiceServer::new(GrpcReceiver { shared })
        .max_decoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd);
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            oversize_to_resource_exhausted,
        ))
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await
        .map_err(OtlpError::Grpc)
}
