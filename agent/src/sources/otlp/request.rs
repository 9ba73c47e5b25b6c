//! [`RawTraceRequest`]: an OTLP trace export request as the receiver keeps it — resources and
//! scopes decoded, each span left as its protobuf bytes.
//!
//! The agent forwards every span it receives, and reads only a dozen fields of the spans it
//! adapts. Decoding a span into prost's owned `Span` made every attribute key and string value
//! its own allocation (~33 per vLLM span), all dropped again once the span was re-encoded to be
//! held or forwarded: at 1k requests/s that decoding, re-encoding and dropping was about a fifth
//! of the agent's CPU. The wire format allows doing neither: these message types read the same
//! bytes as `ExportTraceServiceRequest` (same field numbers), but a `Span` is a `bytes` field,
//! copied once and never parsed by prost. [`crate::otlp_wire::read::SpanView`] reads it in
//! place, and the same bytes (plus appended attributes) are what the exporter writes.
//!
//! prost does not look inside a span here, so [`super::validate`] walks each one: a request is
//! accepted only when prost would have decoded all of it, as before.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// `ExportTraceServiceRequest` with its spans kept encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RawTraceRequest {
    /// Field 1 of `ExportTraceServiceRequest`.
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<RawResourceSpans>,
}

/// `ResourceSpans` with its spans kept encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RawResourceSpans {
    /// The exporting process's resource (decoded: one per request, and the adapters read it).
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// The spans, grouped by instrumentation scope.
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<RawScopeSpans>,
    /// The resource's schema URL.
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `ScopeSpans` whose spans are their protobuf encodings.
#[derive(Clone, PartialEq, Message)]
pub struct RawScopeSpans {
    /// The instrumentation scope.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// Each span's `Span` message bytes (without the field key and length).
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub spans: Vec<Vec<u8>>,
    /// The scope's schema URL.
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

impl RawTraceRequest {
    /// The number of spans.
    pub fn span_count(&self) -> usize {
        self.resource_spans
            .iter()
            .flat_map(|rs| rs.scope_spans.iter())
            .map(|ss| ss.spans.len())
            .sum()
    }
}

/// A decoded request (OTLP/JSON, tests) in the receiver's form: each span encoded by prost.
impl From<ExportTraceServiceRequest> for RawTraceRequest {
    fn from(request: ExportTraceServiceRequest) -> Self {
        Self {
            resource_spans: request
                .resource_spans
                .into_iter()
                .map(|rs| RawResourceSpans {
                    resource: rs.resource,
                    scope_spans: rs
                        .scope_spans
                        .into_iter()
                        .map(|ss| RawScopeSpans {
                            scope: ss.scope,
                            spans: ss.spans.iter().map(Message::encode_to_vec).collect(),
                            schema_url: ss.schema_url,
                        })
                        .collect(),
                    schema_url: rs.schema_url,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;
    use crate::otlp_wire::batch::kv_str;

    #[test]
    fn the_raw_request_reads_the_same_bytes_as_the_decoded_one() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "llm_request".into(),
            attributes: vec![kv_str("gen_ai.request.id", "r1")],
            ..Default::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "vllm")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "vllm".into(),
                        ..Default::default()
                    }),
                    spans: vec![span.clone(), span.clone()],
                    schema_url: "s".into(),
                }],
                schema_url: "r".into(),
            }],
        };
        let bytes = request.encode_to_vec();
        let raw = RawTraceRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(raw.span_count(), 2);
        assert_eq!(raw, RawTraceRequest::from(request.clone()));
        // And back: the raw form encodes to the very bytes it was read from.
        assert_eq!(raw.encode_to_vec(), bytes);
        let ss = &raw.resource_spans[0].scope_spans[0];
        assert_eq!(Span::decode(ss.spans[0].as_slice()).expect("span"), span);
    }
}
