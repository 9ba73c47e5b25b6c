//! OTLP/gRPC front-end: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{Body, BoxFuture, EnabledCompressionEncodings, StdError};
use tonic::{Request, Response, Status};

use super::{Accepted, OtlpError, RawTraceRequest, Shared};
use crate::internal_events::{Protocol, RejectReason};

/// The gRPC service's name, and the one method's path.
const SERVICE_NAME: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// `TraceService`, written out rather than generated: the generated server decodes an
/// `ExportTraceServiceRequest`, every span into owned messages; this one decodes the same
/// bytes as a [`RawTraceRequest`], each span kept encoded (see `super::request`). The rest is
/// what the generated code does: tonic's `Grpc` handles framing, compression and the size
/// limit.
#[derive(Clone)]
struct TraceServiceServer {
    shared: Arc<Shared>,
    accept_compression: EnabledCompressionEncodings,
    max_decoding_message_size: usize,
}

impl tonic::server::NamedService for TraceServiceServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> tower::Service<http::Request<B>> for TraceServiceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != EXPORT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let export = Export(self.shared.clone());
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
            ExportTraceServiceResponse,
            RawTraceRequest,
        >::default())
        .apply_compression_config(
            self.accept_compression,
            EnabledCompressionEncodings::default(),
        )
        .apply_max_message_size_config(Some(self.max_decoding_message_size), None);
        Box::pin(async move { Ok(grpc.unary(export, request).await) })
    }
}

/// The `Export` method.
struct Export(Arc<Shared>);

impl tonic::server::UnaryService<RawTraceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<Response<ExportTraceServiceResponse>, Status>>;

    fn call(&mut self, request: Request<RawTraceRequest>) -> Self::Future {
        std::future::ready(export(&self.0, request))
    }
}

fn export(
    shared: &Shared,
    request: Request<RawTraceRequest>,
) -> Result<Response<ExportTraceServiceResponse>, Status> {
    let auth = request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes());
    if !shared.authorized(auth) {
        shared.reject(Protocol::Grpc, RejectReason::Unauthenticated, "bad token");
        return Err(Status::unauthenticated("missing or wrong bearer token"));
    }
    match shared.accept(Protocol::Grpc, request.into_inner()) {
        Accepted::Ok => Ok(Response::new(ExportTraceServiceResponse::default())),
        Accepted::Invalid(e) => Err(Status::invalid_argument(e.to_string())),
        Accepted::QueueFull => Err(Status::unavailable("inferwatch pipeline queue is full")),
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
    let mut accept_compression = EnabledCompressionEncodings::default();
    accept_compression.enable(CompressionEncoding::Gzip);
    accept_compression.enable(CompressionEncoding::Zstd);
    let service = TraceServiceServer {
        shared,
        accept_compression,
        max_decoding_message_size: limit,
    };
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
