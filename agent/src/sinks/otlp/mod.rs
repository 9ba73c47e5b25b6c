//! The OTLP trace exporter: forwards every received span, with the agent's additions, to a
//! backend (Jaeger, Tempo, an OTel Collector) over OTLP/gRPC or OTLP/HTTP-protobuf.
//!
//! # Why protobuf pass-through, not the OpenTelemetry SDK
//! The SDK's exporters take `SpanData` that the SDK produced: forwarding through them would
//! mean converting each received protobuf span into SDK types and back, which loses what the
//! SDK does not model (the sender's resource per span, scope attributes, dropped counts, span
//! flags) and costs a full copy per span. The agent is a pass-through hop, so it keeps the
//! received `ResourceSpans` and sends them with the generated tonic `TraceServiceClient`
//! (gRPC) or as a prost-encoded body over a small hyper client (HTTP): resource, trace ids,
//! parent ids and attributes reach the backend byte for byte, plus what the pipeline added.
//!
//! # Delivery
//! Batches wait in a bounded [`SinkReceiver`] queue (drops counted when full). A retryable
//! failure (gRPC UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / ABORTED, HTTP 429 /
//! 502 / 503 / 504, connection errors) is retried with exponential backoff until it succeeds,
//! so export resumes by itself when the backend returns, while the queue in front keeps memory
//! bounded. Other failures drop the request and count it. On shutdown the queue is flushed for
//! at most `shutdown_flush_ms`; what is left is counted as dropped.
//!
//! Plain-text endpoints only (`http://`): TLS to the backend is not built in yet.

pub mod config;
pub(crate) mod encode;
pub mod render;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;

pub use self::config::{ExportCompression, ExportConfig, ExportProtocol, ResolvedExport};
use super::{SinkReceiver, SinkSender, sink_queue};
use crate::internal_events::{AgentMetrics, DropStage};
use crate::internal_events::{ExportFailed, SpansDropped, SpansExported};
use crate::otlp_wire::batch::{SpanBatch, agent_resource};

/// The sink's name in metrics and logs.
pub const SINK_NAME: &str = "otlp";

/// Errors of the OTLP exporter.
#[derive(Debug, thiserror::Error)]
pub enum OtlpExportError {
    /// The endpoint is not a usable URL.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A configured header is not a valid header name or value.
    #[error("invalid export header {name:?}")]
    Header {
        /// The header name.
        name: String,
    },
    /// The backend answered with a gRPC error.
    #[error("backend answered gRPC {code:?}: {message}")]
    GrpcStatus {
        /// The status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The backend answered with an HTTP error.
    #[error("backend answered HTTP {status}")]
    HttpStatus {
        /// The status.
        status: http::StatusCode,
    },
    /// The HTTP request could not be sent.
    #[error("sending OTLP/HTTP request to {endpoint}")]
    HttpSend {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The request did not finish within the timeout.
    #[error("export request timed out after {0:?}")]
    Timeout(Duration),
    /// gzip compression failed.
    #[error("compressing export request")]
    Compress(#[source] std::io::Error),
}

impl OtlpExportError {
    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            OtlpExportError::GrpcStatus { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
                    | tonic::Code::OutOfRange
                    | tonic::Code::DataLoss
                    // tonic reports a refused connection as UNKNOWN ("transport error").
                    | tonic::Code::Unknown
            ),
            OtlpExportError::HttpStatus { status } => matches!(status.as_u16(), 429 | 502..=504),
            OtlpExportError::HttpSend { .. } | OtlpExportError::Timeout(_) => true,
            OtlpExportError::Endpoint { .. }
            | OtlpExportError::Header { .. }
            | OtlpExportError::Compress(_) => false,
        }
    }
}

enum Transport {
    Grpc {
        client: tonic::client::Grpc<Channel>,
        metadata: MetadataMap,
    },
    Http {
        // Boxed: the hyper client is much larger than the gRPC variant, and the transport is
        // built once, so the indirection costs nothing.
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        uri: http::Uri,
        headers: http::HeaderMap,
        gzip: bool,
    },
}

/// The OTLP exporter, built and ready to run.
pub struct OtlpExporter {
    transport: Transport,
    endpoint: String,
    timeout: Duration,
    config: ExportConfig,
    resource: Resource,
    metrics: Arc<AgentMetrics>,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ExportConfig {
    /// Creates the exporter's bounded queue (named `otlp`) with the configured bounds.
    pub fn queue(&self, metrics: Arc<AgentMetrics>) -> (SinkSender, SinkReceiver) {
        sink_queue(
            SINK_NAME,
            self.queue_max_batches,
            self.queue_max_spans,
            metrics,
        )
    }
}

impl OtlpExporter {
    /// Builds the exporter for `resolved` (see [`ExportConfig::resolve`]). Connects lazily:
    /// a backend that is down at start-up is not an error.
    ///
    /// # Errors
    /// An endpoint that is not an `http://` URL, or a header that is not valid.
    pub fn build(
        config: &ExportConfig,
        resolved: ResolvedExport,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, OtlpExportError> {
        let endpoint = resolved.endpoint.clone();
        let bad = |reason: &str| OtlpExportError::Endpoint {
            endpoint: endpoint.clone(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// endpoints are supported (no TLS yet)"));
        }
        let gzip = resolved.compression == ExportCompression::Gzip;
        let transport = match resolved.protocol {
            ExportProtocol::Grpc => {
                let channel = Channel::from_shared(endpoint.clone())
                    .map_err(|e| bad(&e.to_string()))?
                    .connect_timeout(resolved.timeout)
                    .timeout(resolved.timeout)
                    .connect_lazy();
                let mut client = tonic::client::Grpc::new(channel);
                if gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                let mut metadata = MetadataMap::new();
                for (k, v) in &resolved.headers {
                    let key = MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|_| OtlpExportError::Header { name: k.clone() })?;
                    let value = MetadataValue::try_from(v.as_str())
                        .map_err(|_| OtlpExportError::Header { name: k.clone() })?;
                    metadata.insert(key, value);
                }
                Transport::Grpc { client, metadata }
            }
            ExportProtocol::HttpProtobuf => {
                let mut headers = http::HeaderMap::new();
                for (k, v) in &resolved.headers {
                    let name = http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| OtlpExportError::Header { name: k.clone() })?;
                    let value = http::HeaderValue::from_str(v)
                        .map_err(|_| OtlpExportError::Header { name: k.clone() })?;
                    headers.insert(name, value);
                }
                Transport::Http {
                    client: Box::new(Client::builder(TokioExecutor::new()).build_http()),
                    uri,
                    headers,
                    gzip,
                }
            }
        };
        let host = std::env::var("HOSTNAME").ok();
        Ok(Self {
            transport,
            endpoint,
            timeout: resolved.timeout,
            config: config.clone(),
            resource: agent_resource(host.as_deref()),
            metrics,
        })
    }

    /// Exports batches from `queue` until `shutdown` is cancelled (or every sender is gone),
    /// then flushes what is queued for at most `shutdown_flush_ms`.
    pub async fn run(mut self, mut queue: SinkReceiver, shutdown: CancellationToken) {
        let mut pending: Option<EncodedRequest> = None;
        let interval = Duration::from_millis(self.config.min_send_interval_ms);
        let mut next_send = Instant::now();
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                b = queue.recv() => match b {
                    Some(b) => b,
                    None => break,
                },
            };
            let batch = Self::gather(
                batch,
                next_send,
                self.config
                    .send_batch_spans
                    .min(self.config.max_batch_spans),
                &mut queue,
                &shutdown,
            )
            .await;
            next_send = Instant::now() + interval;
            let Some(request) = self.merge(batch, &mut queue) else {
                continue;
            };
            if let Err(request) = self.deliver(request, &shutdown, None).await {
                pending = Some(request);
                break;
            }
        }
        // Flush: what is queued now, within the deadline.
        let deadline = Instant::now() + Duration::from_millis(self.config.shutdown_flush_ms);
        let mut dropped = 0usize;
        let never = CancellationToken::new();
        if let Some(request) = pending.take()
            && let Err(r) = self.deliver(request, &never, Some(deadline)).await
        {
            dropped += r.spans;
        }
        while let Some(batch) = queue.try_recv() {
            if Instant::now() >= deadline {
                dropped += batch.span_count();
                continue;
            }
            let Some(request) = self.merge(batch, &mut queue) else {
                continue;
            };
            if let Err(r) = self.deliver(request, &never, Some(deadline)).await {
                dropped += r.spans;
            }
        }
        if dropped > 0 {
            SpansDropped {
                sink: SINK_NAME,
                stage: DropStage::Shutdown,
                count: dropped,
            }
            .emit(&self.metrics);
        }
    }

    /// `first` plus what arrives until `until`, until `enough` spans are there (at once when
    /// `until` has passed or `shutdown` is cancelled).
    ///
    /// Why wait: every export request costs the agent about as much as a hundred spans of it
    /// (HTTP/2 framing, the response, the wakeups of the exporter and connection tasks): at
    /// 1k requests/s, one request per pipeline tick cost 7-14 % of the agent's CPU more than
    /// one a second (docs/performance.md).
    async fn gather(
        first: SpanBatch,
        until: Instant,
        enough: usize,
        queue: &mut SinkReceiver,
        shutdown: &CancellationToken,
    ) -> SpanBatch {
        let mut batch = first;
        while batch.span_count() < enough && Instant::now() < until {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(until) => break,
                b = queue.recv() => match b {
                    Some(next) => batch.append(next),
                    None => break,
                },
            }
        }
        batch
    }

    /// One request from `first` plus whatever else is queued, up to `max_batch_spans`,
    /// encoded; `None` (counted) when encoding failed.
    fn merge(&self, first: SpanBatch, queue: &mut SinkReceiver) -> Option<EncodedRequest> {
        let mut batch = first;
        while batch.span_count() < self.config.max_batch_spans {
            match queue.try_recv() {
                Some(next) => batch.append(next),
                None => break,
            }
        }
        let spans = batch.span_count();
        // Encoded once, with the agent's own encoder, and the same bytes sent on every
        // attempt: cloning the request per attempt (what a typed client needs, since it
        // takes the message by value) was a tenth of the agent's CPU at 1k requests/s.
        let gzip = matches!(self.transport, Transport::Http { gzip: true, .. });
        match encode_batch_body(batch, &self.resource, gzip) {
            Ok(body) => Some(EncodedRequest {
                body: Bytes::from(body),
                spans,
            }),
            Err(e) => {
                self.count_failure(&e, spans);
                None
            }
        }
    }

    /// Sends `request`, retrying retryable failures with backoff. Gives the request back when
    /// `stop` is cancelled or `deadline` passes before it was delivered.
    async fn deliver(
        &mut self,
        request: EncodedRequest,
        stop: &CancellationToken,
        deadline: Option<Instant>,
    ) -> Result<(), EncodedRequest> {
        let spans = request.spans;
        let mut delay = Duration::from_millis(self.config.retry_initial_ms.max(1));
        let max_delay = Duration::from_millis(self.config.retry_max_ms.max(1));
        loop {
            match self.send(request.body.clone()).await {
                Ok(()) => {
                    SpansExported {
                        sink: SINK_NAME,
                        count: spans,
                    }
                    .emit(&self.metrics);
                    return Ok(());
                }
                Err(e) => {
                    if !self.count_failure(&e, spans) {
                        return Ok(());
                    }
                }
            }
            let wake = Instant::now() + delay;
            if deadline.is_some_and(|d| wake >= d) {
                return Err(request);
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(request),
                _ = tokio::time::sleep_until(wake) => {}
            }
            delay = (delay * 2).min(max_delay);
        }
    }

    /// Counts a failed attempt, and the request's spans as dropped when `e` is not worth a
    /// retry; returns whether it is.
    fn count_failure(&self, e: &OtlpExportError, spans: usize) -> bool {
        let retryable = e.retryable();
        ExportFailed {
            sink: SINK_NAME,
            error: e,
            retryable,
        }
        .emit(&self.metrics);
        if !retryable {
            SpansDropped {
                sink: SINK_NAME,
                stage: DropStage::Rejected,
                count: spans,
            }
            .emit(&self.metrics);
        }
        retryable
    }

    async fn send(&mut self, body: Bytes) -> Result<(), OtlpExportError> {
        match &mut self.transport {
            Transport::Grpc { client, metadata } => {
                client
                    .ready()
                    .await
                    .map_err(|e| OtlpExportError::GrpcStatus {
                        code: tonic::Code::Unavailable,
                        message: format!("service was not ready: {e}"),
                    })?;
                let mut req = tonic::Request::new(body);
                *req.metadata_mut() = metadata.clone();
                req.set_timeout(self.timeout);
                req.extensions_mut()
                    .insert(tonic::GrpcMethod::new(TRACE_SERVICE, "Export"));
                client
                    .unary(
                        req,
                        http::uri::PathAndQuery::from_static(TRACE_EXPORT_PATH),
                        PreEncodedCodec,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|s| OtlpExportError::GrpcStatus {
                        code: s.code(),
                        message: s.message().to_owned(),
                    })
            }
            Transport::Http {
                client,
                uri,
                headers,
                gzip,
            } => {
                let mut req = http::Request::new(Full::new(body));
                *req.method_mut() = http::Method::POST;
                *req.uri_mut() = uri.clone();
                *req.headers_mut() = headers.clone();
                req.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                if *gzip {
                    req.headers_mut().insert(
                        http::header::CONTENT_ENCODING,
                        http::HeaderValue::from_static("gzip"),
                    );
                }
                let endpoint = self.endpoint.clone();
                let response = tokio::time::timeout(self.timeout, client.request(req))
                    .await
                    .map_err(|_| OtlpExportError::Timeout(self.timeout))?
                    .map_err(|source| OtlpExportError::HttpSend { endpoint, source })?;
                let status = response.status();
                // Drain the (small) body so the connection can be reused.
                let _ = tokio::time::timeout(self.timeout, response.into_body().collect()).await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(OtlpExportError::HttpStatus { status })
                }
            }
        }
    }
}

/// The OTLP trace service, as gRPC names it.
const TRACE_SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const TRACE_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC codec whose requests are already-encoded `ExportTraceServiceRequest` bytes, so that a
/// retry resends the same bytes; responses are decoded with prost.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncodedCodec;

#[derive(Debug, Clone, Copy, Default)]
struct PreEncodedEncoder;

impl tonic::codec::Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<ExportTraceServiceResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// An export request's body, ready to send (and to resend), and how many spans it carries.
#[derive(Debug)]
struct EncodedRequest {
    body: Bytes,
    spans: usize,
}

/// Encodes a batch as the export request `batch.into_request(agent_resource)` (the spans held
/// encoded are copied, not decoded), gzip-compressed when asked (the HTTP body).
///
/// # Errors
/// Only when gzip fails, which writing to memory does not do in practice.
pub fn encode_batch_body(
    batch: SpanBatch,
    agent_resource: &Resource,
    gzip: bool,
) -> Result<Vec<u8>, OtlpExportError> {
    let raw = encode::encode_batch(batch, agent_resource);
    if !gzip {
        return Ok(raw);
    }
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&raw).map_err(OtlpExportError::Compress)?;
    encoder.finish().map_err(OtlpExportError::Compress)
}
