//! The OTLP trace receiver: OTLP/gRPC (`TraceService/Export`) and OTLP/HTTP
//! (`POST /v1/traces`, protobuf or JSON, optionally gzip), plus the runtime [`adapters`].
//!
//! Requests are decoded as [`RawTraceRequest`]s (each span kept as its protobuf bytes: see
//! [`request`]). Each accepted request is checked against the configured limits, read once by
//! the adapters ([`adapted`]) and sent, whole, onto a bounded channel to the pipeline as an
//! [`AdaptedRequest`]. The receiver never waits on that
//! channel: when it is full the request is dropped, counted and answered UNAVAILABLE (gRPC) /
//! 503 (HTTP), which the OTLP exporters treat as retryable.
//!
//! Hostile input is bounded three ways: the request size (`max_request_bytes`, checked before
//! buffering on HTTP and by tonic's framing on gRPC, and again after decompression); prost's
//! decoder recursion limit (100 nested messages, so a deeply nested `AnyValue` fails to decode
//! instead of overflowing the stack), which [`crate::otlp_wire::read`]'s span walker keeps
//! too; and [`validate`]
//! (every span well-formed, attribute counts and `AnyValue` depth).

pub mod adapted;
pub mod adapters;
pub mod config;
mod grpc;
mod http;
pub mod request;
pub mod sample;
#[cfg(test)]
pub(crate) mod tests;
mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use self::adapted::{AdaptedRequest, RequestAdapter};
use self::adapters::AdapterOptions;
pub use self::config::OtlpReceiverConfig;
pub use self::request::RawTraceRequest;
pub use self::tls::TlsError;
use crate::internal_events::{AgentMetrics, DropStage, Protocol, RejectReason};
use crate::internal_events::{OtlpRequestRejected, OtlpSpansReceived, SpansDropped};
use crate::otlp_wire::read::{LimitError, SpanView, WireError, WireLimits};
use crate::privacy::TenantHasher;
use crate::sources::channel::{SourceReceiver, SourceSender, source_channel};

/// Errors of the OTLP receiver.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// `bind(2)` failed for one of the listeners.
    #[error("binding the OTLP {protocol} listener on {addr}")]
    Bind {
        /// `grpc` or `http`.
        protocol: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("loading the OTLP receiver's TLS certificate")]
    Tls(#[source] TlsError),
    /// tonic refused the TLS identity.
    #[error("configuring TLS on the OTLP/gRPC listener")]
    GrpcTls(#[source] tonic::transport::Error),
    /// The gRPC server stopped with an error.
    #[error("serving OTLP/gRPC")]
    Grpc(#[source] tonic::transport::Error),
    /// The HTTP server stopped with an error.
    #[error("serving OTLP/HTTP")]
    Http(#[source] std::io::Error),
}

/// Why a decoded request was refused by [`validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    /// A limit was broken.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A span is not a `Span` message (the request as a whole does not decode).
    #[error("a span does not decode: {0}")]
    MalformedSpan(String),
}

/// The sending side of the receiver -> pipeline channel.
pub type SpanSender = SourceSender<AdaptedRequest>;

/// Creates the bounded receiver -> pipeline channel (`otlp`) with the configured capacity.
pub fn channel(
    config: &OtlpReceiverConfig,
    metrics: &AgentMetrics,
) -> (SpanSender, SourceReceiver<AdaptedRequest>) {
    source_channel("otlp", config.queue_capacity, metrics)
}

/// The state both protocol front-ends share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: OtlpReceiverConfig,
    pub(crate) sender: SpanSender,
    pub(crate) metrics: Arc<AgentMetrics>,
    /// Reads each accepted request's spans once; requests from both front-ends take turns.
    pub(crate) adapter: Mutex<RequestAdapter>,
    /// TLS on both listeners, when configured.
    pub(crate) tls: Option<tls::TlsMaterial>,
}

/// What [`Shared::accept`] decided.
pub(crate) enum Accepted {
    Ok,
    Invalid(InvalidRequest),
    QueueFull,
}

impl Shared {
    /// Validates a decoded request, adapts it and queues it for the pipeline.
    pub(crate) fn accept(&self, protocol: Protocol, mut request: RawTraceRequest) -> Accepted {
        if let Err(e) = validate(&mut request, &self.config) {
            let reason = match e {
                InvalidRequest::Limit(_) => RejectReason::LimitExceeded,
                InvalidRequest::MalformedSpan(_) => RejectReason::Malformed,
            };
            self.reject(protocol, reason, &e.to_string());
            return Accepted::Invalid(e);
        }
        let count = request.span_count();
        if count == 0 {
            return Accepted::Ok;
        }
        // A slot first: a request the pipeline has no room for is not adapted (the adapter's
        // memory across spans only sees what reaches the pipeline).
        match self.sender.try_reserve() {
            Ok(permit) => {
                let adapted = self
                    .adapter
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .adapt(request);
                permit.send(adapted);
                OtlpSpansReceived { protocol, count }.emit(&self.metrics);
                Accepted::Ok
            }
            Err(_) => {
                self.reject(protocol, RejectReason::QueueFull, "pipeline queue full");
                SpansDropped {
                    sink: "receiver",
                    stage: DropStage::ReceiverQueue,
                    count,
                }
                .emit(&self.metrics);
                Accepted::QueueFull
            }
        }
    }

    pub(crate) fn reject(&self, protocol: Protocol, reason: RejectReason, detail: &str) {
        OtlpRequestRejected {
            protocol,
            reason,
            detail,
        }
        .emit(&self.metrics);
    }

    /// True when no token is configured or `header` is `Bearer <token>`.
    pub(crate) fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = &self.config.bearer_token else {
            return true;
        };
        let Some(value) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        constant_time_eq(value, token.as_bytes())
    }
}

/// Compares without an early exit, so that response timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks that every span decodes, and attribute counts and `AnyValue` depth everywhere in the
/// request: what prost's decoding of the whole request and the limits refused before spans were
/// kept encoded.
///
/// A span that decodes but is not in the canonical form the span walker reads (a singular
/// message field written twice, which prost merges; no SDK writes that) is decoded by prost,
/// checked, and replaced by prost's encoding of it, so the pipeline only sees spans it can read.
pub fn validate(
    request: &mut RawTraceRequest,
    config: &OtlpReceiverConfig,
) -> Result<(), InvalidRequest> {
    let limits = (config.max_attributes, config.max_value_depth);
    let wire_limits = WireLimits::from(config);
    for rs in &mut request.resource_spans {
        if let Some(resource) = &rs.resource {
            check_attrs("resource", &resource.attributes, limits)?;
        }
        for ss in &mut rs.scope_spans {
            if let Some(scope) = &ss.scope {
                check_attrs("scope", &scope.attributes, limits)?;
            }
            for bytes in &mut ss.spans {
                match SpanView::parse(bytes, wire_limits) {
                    Ok(_) => {}
                    Err(WireError::Limit(e)) => return Err(e.into()),
                    Err(WireError::Malformed(e)) => {
                        return Err(InvalidRequest::MalformedSpan(e.to_string()));
                    }
                    Err(WireError::NotCanonical) => {
                        let span = Span::decode(bytes.as_slice())
                            .map_err(|e| InvalidRequest::MalformedSpan(e.to_string()))?;
                        check_span(&span, limits)?;
                        *bytes = span.encode_to_vec();
                    }
                }
            }
        }
    }
    Ok(())
}

/// [`validate`]'s limits on a decoded request: what the receiver checked before spans were
/// kept encoded, kept as the reference the fuzz target holds [`validate`] to.
pub fn validate_decoded(
    request: &ExportTraceServiceRequest,
    config: &OtlpReceiverConfig,
) -> Result<(), LimitError> {
    let limits = (config.max_attributes, config.max_value_depth);
    for rs in &request.resource_spans {
        if let Some(resource) = &rs.resource {
            check_attrs("resource", &resource.attributes, limits)?;
        }
        for ss in &rs.scope_spans {
            if let Some(scope) = &ss.scope {
                check_attrs("scope", &scope.attributes, limits)?;
            }
            for span in &ss.spans {
                check_span(span, limits)?;
            }
        }
    }
    Ok(())
}

/// The limits on a decoded span's attribute lists.
fn check_span(span: &Span, limits: (usize, usize)) -> Result<(), LimitError> {
    check_attrs("span", &span.attributes, limits)?;
    for event in &span.events {
        check_attrs("event", &event.attributes, limits)?;
    }
    for link in &span.links {
        check_attrs("link", &link.attributes, limits)?;
    }
    Ok(())
}

fn check_attrs(
    owner: &'static str,
    attrs: &[KeyValue],
    (max_attrs, max_depth): (usize, usize),
) -> Result<(), LimitError> {
    if attrs.len() > max_attrs {
        return Err(LimitError::TooManyAttributes {
            owner,
            count: attrs.len(),
            limit: max_attrs,
        });
    }
    for kv in attrs {
        if let Some(v) = &kv.value {
            check_depth(v, 1, max_depth, max_attrs)?;
        }
    }
    Ok(())
}

// Recursion is bounded: prost already refused anything nested deeper than 100 messages, and
// we stop at `max_depth`.
fn check_depth(
    value: &AnyValue,
    depth: usize,
    max_depth: usize,
    max_attrs: usize,
) -> Result<(), LimitError> {
    if depth > max_depth {
        return Err(LimitError::TooDeep { limit: max_depth });
    }
    match &value.value {
        Some(any_value::Value::ArrayValue(a)) => {
            for v in &a.values {
                check_depth(v, depth + 1, max_depth, max_attrs)?;
            }
        }
        Some(any_value::Value::KvlistValue(l)) => {
            if l.values.len() > max_attrs {
                return Err(LimitError::TooManyAttributes {
                    owner: "key-value list",
                    count: l.values.len(),
                    limit: max_attrs,
                });
            }
            for kv in &l.values {
                if let Some(v) = &kv.value {
                    check_depth(v, depth + 1, max_depth, max_attrs)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The OTLP receiver, bound and ready to serve.
#[derive(Debug)]
pub struct OtlpReceiver {
    shared: Arc<Shared>,
    grpc: TcpListener,
    http: TcpListener,
}

impl OtlpReceiver {
    /// Binds both listeners. Spans go to `sender` (see [`channel`]), adapted, with their tenant
    /// hashed by `tenant_hasher` when given; counters to `metrics`.
    ///
    /// # Errors
    /// [`OtlpError::Bind`] when a port is taken or the address is not local.
    pub async fn build(
        config: &OtlpReceiverConfig,
        sender: SpanSender,
        metrics: Arc<AgentMetrics>,
        tenant_hasher: Option<TenantHasher>,
    ) -> Result<Self, OtlpError> {
        // Before binding: a half-configured or unreadable TLS setup must not leave a
        // plaintext receiver running.
        let tls = tls::TlsMaterial::load(
            config.tls_cert_path.as_deref(),
            config.tls_key_path.as_deref(),
        )
        .map_err(OtlpError::Tls)?;
        let grpc_addr = SocketAddr::new(config.bind_address, config.grpc_port);
        let http_addr = SocketAddr::new(config.bind_address, config.http_port);
        let grpc = TcpListener::bind(grpc_addr)
            .await
            .map_err(|source| OtlpError::Bind {
                protocol: "grpc",
                addr: grpc_addr,
                source,
            })?;
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| OtlpError::Bind {
                protocol: "http",
                addr: http_addr,
                source,
            })?;
        let adapter = RequestAdapter::new(AdapterOptions::from(config))
            .with_tenant_hasher(tenant_hasher)
            .with_runtime_spans(&metrics.runtime_spans);
        Ok(Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                sender,
                metrics,
                adapter: Mutex::new(adapter),
                tls,
            }),
            grpc,
            http,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.shared.config.bind_address, 0))
    }

    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.shared.config.bind_address, 0))
    }

    /// Serves both protocols until `shutdown` is cancelled, then stops accepting and finishes
    /// in-flight requests.
    ///
    /// # Errors
    /// When either server fails; the other is stopped too.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), OtlpError> {
        info!(grpc = %self.grpc_addr(), http = %self.http_addr(), tls = self.shared.tls.is_some(), "OTLP receiver listening");
        let grpc = grpc::serve(self.shared.clone(), self.grpc, shutdown.clone());
        let http = http::serve(self.shared, self.http, shutdown.clone());
        let (g, h) = tokio::join!(
            async {
                let r = grpc.await;
                if r.is_err() {
                    shutdown.cancel();
                }
                r
            },
            async {
                let r = http.await;
                if r.is_err() {
                    shutdown.cancel();
                }
                r
            }
        );
        g.and(h)
    }
}
