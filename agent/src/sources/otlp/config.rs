//! Configuration of the OTLP trace receiver.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::otlp_wire::read::WireLimits;

/// The OTLP trace receiver (`[otlp]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpReceiverConfig {
    /// Turn the receiver on.
    pub enabled: bool,
    /// Address both listeners bind to. Default 127.0.0.1; in Kubernetes, the node address.
    pub bind_address: IpAddr,
    /// OTLP/gRPC port (0 picks a free port).
    pub grpc_port: u16,
    /// OTLP/HTTP port, serving `POST /v1/traces` (0 picks a free port).
    pub http_port: u16,
    /// When set, every request must carry `authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// PEM certificate chain (leaf first) served by both listeners. With `tls_key_path`, the
    /// receiver speaks TLS only (rustls; plaintext clients are refused); set both or neither.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_path`; set both or neither.
    pub tls_key_path: Option<PathBuf>,
    /// Largest request accepted, in bytes, after decompression (gRPC RESOURCE_EXHAUSTED,
    /// HTTP 413 above it).
    pub max_request_bytes: usize,
    /// Most attributes on one span, resource, scope, event or link; a request with more is
    /// refused (gRPC INVALID_ARGUMENT, HTTP 400).
    pub max_attributes: usize,
    /// Deepest `AnyValue` nesting (arrays / key-value lists) accepted. prost refuses nesting
    /// beyond 100 messages anyway; this is the tighter, documented bound.
    pub max_value_depth: usize,
    /// Capacity of the queue from the receiver to the pipeline, in requests. When it is full
    /// the request is dropped, counted, and answered UNAVAILABLE / 503 so the sender may retry.
    pub queue_capacity: usize,
    /// The span attribute that names the tenant.
    pub tenant_attribute: String,
    /// The span attribute that names the conversation.
    pub conversation_attribute: String,
}

impl Default for OtlpReceiverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            grpc_port: 4317,
            http_port: 4318,
            bearer_token: None,
            tls_cert_path: None,
            tls_key_path: None,
            max_request_bytes: 4 * 1024 * 1024,
            max_attributes: 1024,
            max_value_depth: 16,
            queue_capacity: 1024,
            tenant_attribute: "tenant.id".into(),
            conversation_attribute: "gen_ai.conversation.id".into(),
        }
    }
}

impl From<&OtlpReceiverConfig> for WireLimits {
    fn from(config: &OtlpReceiverConfig) -> Self {
        Self {
            max_attributes: config.max_attributes,
            max_value_depth: config.max_value_depth,
        }
    }
}
