//! OTLP/HTTP front-end: `POST /v1/traces` with `application/x-protobuf` or `application/json`,
//! optionally `content-encoding: gzip`.

use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Accepted, OtlpError, RawTraceRequest, Shared};
use crate::internal_events::{Protocol, RejectReason};

#[derive(Clone, Copy)]
enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn protocol(self) -> Protocol {
        match self {
            Format::Protobuf => Protocol::HttpProtobuf,
            Format::Json => Protocol::HttpJson,
        }
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/traces", post(export))
        // The body limit is applied by `read_body` (before and after decompression), not by
        // axum's default 2 MB layer.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), OtlpError> {
    match shared.tls.as_ref().map(|t| t.http.clone()) {
        Some(config) => {
            let listener = super::tls::TlsListener::new(listener, config, shutdown.clone());
            axum::serve(listener, router(shared))
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
                .map_err(OtlpError::Http)
        }
        None => axum::serve(listener, router(shared))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(OtlpError::Http),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        message.to_owned(),
    )
        .into_response()
}

async fn export(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let format = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .as_deref()
    {
        Some("application/x-protobuf") | Some("application/protobuf") => Format::Protobuf,
        Some("application/json") => Format::Json,
        other => {
            shared.reject(
                Protocol::HttpProtobuf,
                RejectReason::UnsupportedMediaType,
                other.unwrap_or("none"),
            );
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-type must be application/x-protobuf or application/json",
            );
        }
    };
    let protocol = format.protocol();
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if !shared.authorized(auth) {
        shared.reject(protocol, RejectReason::Unauthenticated, "bad token");
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let limit = shared.config.max_request_bytes;
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes().to_ascii_lowercase())
        .as_deref()
    {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(_) => {
            shared.reject(protocol, RejectReason::UnsupportedMediaType, "encoding");
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content-encoding must be gzip or identity",
            );
        }
    };
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            // `to_bytes` fails with a length-limit error when the body (or its announced
            // length) is over the limit, otherwise with a transport error.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                shared.reject(protocol, RejectReason::TooLarge, "body over limit");
                return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            shared.reject(protocol, RejectReason::Malformed, &e.to_string());
            return error(StatusCode::BAD_REQUEST, "could not read request body");
        }
    };
    let bytes = if gzip {
        match gunzip(&bytes, limit) {
            Ok(b) => Bytes::from(b),
            Err(GunzipError::TooLarge) => {
                shared.reject(protocol, RejectReason::TooLarge, "inflated body over limit");
                return error(StatusCode::PAYLOAD_TOO_LARGE, "decompressed body too large");
            }
            Err(GunzipError::Io(e)) => {
                shared.reject(protocol, RejectReason::Malformed, &e.to_string());
                return error(StatusCode::BAD_REQUEST, "invalid gzip body");
            }
        }
    } else {
        bytes
    };
    let request = match decode(format, &bytes) {
        Ok(r) => r,
        Err(detail) => {
            shared.reject(protocol, RejectReason::Malformed, &detail);
            return error(
                StatusCode::BAD_REQUEST,
                "request body does not decode as OTLP",
            );
        }
    };
    match shared.accept(protocol, request) {
        Accepted::Ok => ok(format),
        Accepted::Invalid(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Accepted::QueueFull => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "inferwatch pipeline queue is full",
        )
            .into_response(),
    }
}

fn decode(format: Format, bytes: &[u8]) -> Result<RawTraceRequest, String> {
    match format {
        // The spans stay encoded (see `super::request`); `validate` walks them.
        Format::Protobuf => RawTraceRequest::decode(bytes).map_err(|e| e.to_string()),
        // serde_json stops at 128 levels of nesting, so a deep JSON AnyValue cannot overflow
        // the stack either. JSON is the slow path: decoded, then each span encoded.
        Format::Json => serde_json::from_slice::<ExportTraceServiceRequest>(bytes)
            .map(RawTraceRequest::from)
            .map_err(|e| e.to_string()),
    }
}

fn ok(format: Format) -> Response {
    match format {
        Format::Protobuf => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Format::Json => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{}",
        )
            .into_response(),
    }
}

enum GunzipError {
    TooLarge,
    Io(std::io::Error),
}

/// Inflates at most `limit` bytes: a small gzip bomb cannot allocate more than the limit.
fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, GunzipError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(GunzipError::Io)?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(out)
}
