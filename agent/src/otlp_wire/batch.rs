//! [`SpanBatch`]: the unit that travels from the OTLP receiver through the pipeline to the
//! sinks, and the enrichment API the correlator uses on it.
//!
//! A batch is the received `ResourceSpans` kept as protobuf values, not converted to SDK spans:
//! the agent is a pass-through hop, so resource, scope, trace and parent ids and every
//! attribute must reach the backend exactly as the runtime sent them. The pipeline may mutate
//! a batch before handing it to the sinks:
//!
//! - [`SpanBatch::add_attributes`] appends attributes to one forwarded span (for example
//!   `inferwatch.join`, `inferwatch.start`);
//! - [`SpanBatch::push_finding`] adds a new span (a finding such as `inferwatch.abort`, built
//!   with [`finding_span`]) under the agent's own resource, in the request's trace.
//!
//! Request spans that wait for their join travel as [`EncodedSpan`]s: a decoded span with its
//! attributes costs about three and a half times its wire size on the heap (every key and
//! value is a separate allocation), and the agent holds each one for a few hundred milliseconds
//! (most of a second when only a guess can join it), so at 10k requests/s the decoded form was
//! the largest part of the agent's memory. Enrichment appends attributes to the bytes (a
//! repeated field may be split anywhere in a message), and the exporter writes the bytes as
//! they are.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Buf;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
use prost::Message;

use super::write;

/// The instrumentation scope name of the spans the agent creates.
pub const AGENT_SCOPE: &str = "inferwatch";

/// A group of received spans on its way to the sinks, with the agent's additions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanBatch {
    /// The spans as received, grouped by resource and scope.
    pub resource_spans: Vec<ResourceSpans>,
    /// Received spans held encoded (see [`EncodedSpan`]), with their resource and scope.
    pub encoded: Vec<EncodedGroup>,
    /// Spans the agent created (findings), exported under the agent's resource.
    pub findings: Vec<Span>,
}

impl From<ExportTraceServiceRequest> for SpanBatch {
    fn from(request: ExportTraceServiceRequest) -> Self {
        Self {
            resource_spans: request.resource_spans,
            encoded: Vec::new(),
            findings: Vec::new(),
        }
    }
}

/// The resource and scope (with their schema URLs) a group of received spans came with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanGroup {
    /// The exporting process's resource.
    pub resource: Option<Resource>,
    /// The `ResourceSpans` schema URL.
    pub resource_schema_url: String,
    /// The instrumentation scope.
    pub scope: Option<InstrumentationScope>,
    /// The `ScopeSpans` schema URL.
    pub scope_schema_url: String,
}

/// One span as its protobuf encoding (a `Span` message, without the field key and length that
/// put it in a `ScopeSpans`): the span's own bytes, then the attributes the agent appended.
///
/// The two parts are kept apart because the received bytes come at their exact size: appending
/// to them would reallocate and copy the whole span for every enriched request (a fortieth of
/// the agent's CPU at 1k requests/s). The exporter writes one after the other.
#[derive(Debug, Clone)]
pub struct EncodedSpan {
    body: Vec<u8>,
    added: Vec<u8>,
}

/// Room for the attributes the agent appends to a request span (join, start kind, GPU facts:
/// ~100-250 bytes), taken once at the first append.
const ADDED_CAPACITY: usize = 256;

impl EncodedSpan {
    /// Encodes `span`, byte for byte as prost would.
    pub fn new(span: &Span) -> Self {
        Self::from_received(write::encode_span(span))
    }

    /// A received span's bytes, kept as they are. The receiver checked that they decode as a
    /// `Span` (`sources::otlp::validate`): the exporter writes them unchecked.
    pub fn from_received(bytes: Vec<u8>) -> Self {
        Self {
            body: bytes,
            added: Vec::new(),
        }
    }

    /// The buffer appended attributes go to.
    fn added(&mut self) -> &mut Vec<u8> {
        if self.added.capacity() == 0 {
            self.added.reserve(ADDED_CAPACITY);
        }
        &mut self.added
    }

    /// Appends attributes: the decoded span gets them after the ones it had.
    pub fn add_attributes(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        for kv in attributes {
            write::append_attribute(kv, self.added());
        }
    }

    /// Appends one string attribute.
    pub fn add_str_attribute(&mut self, key: &str, value: &str) {
        write::append_str_attribute(key, value, self.added());
    }

    /// Moves the span into another trace, under `parent_span_id` (the decoded span has the
    /// new ids: the last value of a singular field wins).
    pub fn move_to_trace(&mut self, trace_id: &[u8; 16], parent_span_id: &[u8; 8]) {
        write::append_trace_and_parent(trace_id, parent_span_id, self.added());
    }

    /// The length of the encoding.
    pub fn len(&self) -> usize {
        self.body.len() + self.added.len()
    }

    /// True for an empty span (every field at its default).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the encoding to `buf`.
    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.body);
        buf.extend_from_slice(&self.added);
    }

    /// The span, decoded again.
    ///
    /// # Errors
    /// Only if the bytes are not a `Span`, which [`EncodedSpan::new`] does not produce.
    pub fn decode(&self) -> Result<Span, prost::DecodeError> {
        Span::decode(self.body.as_slice().chain(self.added.as_slice()))
    }
}

/// Equal when the encodings are, however they are split.
impl PartialEq for EncodedSpan {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .body
                .iter()
                .chain(&self.added)
                .eq(other.body.iter().chain(&other.added))
    }
}

impl Eq for EncodedSpan {}

/// Encoded spans that share a resource and scope.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedGroup {
    /// Their resource and scope.
    pub group: Arc<SpanGroup>,
    /// The spans.
    pub spans: Vec<EncodedSpan>,
}

impl EncodedGroup {
    /// The group as a decoded `ResourceSpans`. A span that does not decode (a bug, never
    /// input) is left out and logged.
    pub fn decode(&self) -> ResourceSpans {
        let spans = self
            .spans
            .iter()
            .filter_map(|s| {
                s.decode()
                    .map_err(|e| tracing::error!(error = %e, "an encoded span did not decode"))
                    .ok()
            })
            .collect();
        let g = &*self.group;
        ResourceSpans {
            resource: g.resource.clone(),
            scope_spans: vec![ScopeSpans {
                scope: g.scope.clone(),
                spans,
                schema_url: g.scope_schema_url.clone(),
            }],
            schema_url: g.resource_schema_url.clone(),
        }
    }
}

impl SpanBatch {
    /// The number of spans in the batch, findings included.
    pub fn span_count(&self) -> usize {
        count_spans(&self.resource_spans)
            + self.encoded.iter().map(|g| g.spans.len()).sum::<usize>()
            + self.findings.len()
    }

    /// Every received span (not those held encoded) with its resource, for the adapters.
    pub fn spans(&self) -> impl Iterator<Item = (Option<&Resource>, &Span)> {
        self.resource_spans.iter().flat_map(|rs| {
            rs.scope_spans
                .iter()
                .flat_map(move |ss| ss.spans.iter().map(move |s| (rs.resource.as_ref(), s)))
        })
    }

    /// Calls `f` on every received span with its resource, in one pass: the cheap way to
    /// adapt and enrich a whole batch (see [`SpanBatch::add_attributes`] for single spans).
    pub fn for_each_span_mut(&mut self, mut f: impl FnMut(Option<&Resource>, &mut Span)) {
        for rs in &mut self.resource_spans {
            let resource = rs.resource.as_ref();
            for ss in &mut rs.scope_spans {
                for span in &mut ss.spans {
                    f(resource, span);
                }
            }
        }
    }

    /// The received span with this trace and span id, to be mutated before export.
    pub fn find_span_mut(&mut self, trace_id: &[u8; 16], span_id: &[u8; 8]) -> Option<&mut Span> {
        self.resource_spans
            .iter_mut()
            .flat_map(|rs| rs.scope_spans.iter_mut())
            .flat_map(|ss| ss.spans.iter_mut())
            .find(|s| s.trace_id == trace_id && s.span_id == span_id)
    }

    /// Appends `attributes` to the received span `trace_id`/`span_id`. Returns false when the
    /// batch does not hold that span (it was in an earlier batch and has already left).
    pub fn add_attributes(
        &mut self,
        trace_id: &[u8; 16],
        span_id: &[u8; 8],
        attributes: impl IntoIterator<Item = KeyValue>,
    ) -> bool {
        match self.find_span_mut(trace_id, span_id) {
            Some(span) => {
                span.attributes.extend(attributes);
                true
            }
            None => false,
        }
    }

    /// Adds a span the agent created (see [`finding_span`]).
    pub fn push_finding(&mut self, span: Span) {
        self.findings.push(span);
    }

    /// The OTLP request to export: the received resource spans unchanged (plus any added
    /// attributes), then the encoded groups decoded, then the findings under `agent_resource`
    /// and the `inferwatch` scope. The exporter writes the same thing without decoding
    /// ([`crate::sinks::otlp::encode_batch_body`]); this form is for the file sink and tests.
    pub fn to_request(&self, agent_resource: &Resource) -> ExportTraceServiceRequest {
        let mut resource_spans = self.resource_spans.clone();
        resource_spans.extend(self.encoded.iter().map(EncodedGroup::decode));
        if !self.findings.is_empty() {
            resource_spans.push(findings_resource_spans(
                agent_resource,
                self.findings.clone(),
            ));
        }
        ExportTraceServiceRequest { resource_spans }
    }

    /// Like [`SpanBatch::to_request`], consuming the batch (no copy).
    pub fn into_request(self, agent_resource: &Resource) -> ExportTraceServiceRequest {
        let mut resource_spans = self.resource_spans;
        resource_spans.extend(self.encoded.iter().map(EncodedGroup::decode));
        if !self.findings.is_empty() {
            resource_spans.push(findings_resource_spans(agent_resource, self.findings));
        }
        ExportTraceServiceRequest { resource_spans }
    }

    /// Appends another batch (the exporter merges queued batches into one request).
    pub fn append(&mut self, other: SpanBatch) {
        self.resource_spans.extend(other.resource_spans);
        self.encoded.extend(other.encoded);
        self.findings.extend(other.findings);
    }
}

/// The findings' group: the agent's resource and the `inferwatch` scope.
pub(crate) fn findings_resource_spans(
    agent_resource: &Resource,
    spans: Vec<Span>,
) -> ResourceSpans {
    ResourceSpans {
        resource: Some(agent_resource.clone()),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: AGENT_SCOPE.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            }),
            spans,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// Counts the spans in a list of resource spans.
pub fn count_spans(resource_spans: &[ResourceSpans]) -> usize {
    resource_spans
        .iter()
        .flat_map(|rs| rs.scope_spans.iter())
        .map(|ss| ss.spans.len())
        .sum()
}

/// The resource the agent's own spans carry: `service.name = inferwatch`, plus `host.name`
/// when given.
pub fn agent_resource(host_name: Option<&str>) -> Resource {
    let mut attributes = vec![kv_str("service.name", "inferwatch")];
    attributes.push(kv_str("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(host) = host_name {
        attributes.push(kv_str("host.name", host));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

/// Builds a finding span (`inferwatch.abort`, `inferwatch.kv_eviction`, ...) inside the
/// request's trace: same `trace_id`, parent = the runtime's request span, a fresh span id,
/// kind INTERNAL.
pub fn finding_span(
    name: &str,
    trace_id: [u8; 16],
    parent_span_id: [u8; 8],
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    attributes: Vec<KeyValue>,
) -> Span {
    Span {
        trace_id: trace_id.to_vec(),
        span_id: new_span_id().to_vec(),
        parent_span_id: parent_span_id.to_vec(),
        name: name.to_owned(),
        kind: span::SpanKind::Internal as i32,
        start_time_unix_nano: start_unix_nanos,
        end_time_unix_nano: end_unix_nanos.max(start_unix_nanos),
        attributes,
        ..Default::default()
    }
}

/// A random, non-zero span id. Uses std's randomly keyed SipHash over a process-wide counter:
/// unique within the process and unpredictable across processes, without a `rand` dependency.
pub fn new_span_id() -> [u8; 8] {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    static STATE: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let state = STATE.get_or_init(RandomState::new);
    loop {
        let mut hasher = state.build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let id = hasher.finish();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A string attribute.
pub fn kv_str(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.to_owned()))
}

/// An integer attribute.
pub fn kv_i64(key: &str, value: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value))
}

/// A floating-point attribute.
pub fn kv_f64(key: &str, value: f64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(value))
}

/// A boolean attribute.
pub fn kv_bool(key: &str, value: bool) -> KeyValue {
    kv(key, any_value::Value::BoolValue(value))
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_moves_into_another_trace_without_being_decoded() {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "llm_request".into(),
            ..Default::default()
        };
        let mut encoded = EncodedSpan::new(&span);
        encoded.add_str_attribute("inferwatch.join", "response_id");
        encoded.move_to_trace(&[7; 16], &[9; 8]);
        let back = encoded.decode().expect("decodes");
        assert_eq!(back.trace_id, vec![7; 16]);
        assert_eq!(back.parent_span_id, vec![9; 8]);
        assert_eq!(back.span_id, vec![2; 8]);
        assert_eq!(back.name, "llm_request");
        assert_eq!(
            back.attributes,
            vec![kv_str("inferwatch.join", "response_id")]
        );
    }

    fn batch() -> SpanBatch {
        SpanBatch::from(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "vllm")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        parent_span_id: vec![3; 8],
                        name: "llm_request".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
    }

    #[test]
    fn enrichment_adds_attributes_and_findings() {
        let mut b = batch();
        assert!(b.add_attributes(
            &[1; 16],
            &[2; 8],
            [kv_str("inferwatch.join", "traceparent")]
        ));
        assert!(!b.add_attributes(&[9; 16], &[2; 8], [kv_bool("x", true)]));
        b.push_finding(finding_span(
            "inferwatch.abort",
            [1; 16],
            [2; 8],
            10,
            5,
            vec![],
        ));
        assert_eq!(b.span_count(), 2);
        let req = b.into_request(&agent_resource(None));
        assert_eq!(req.resource_spans.len(), 2);
        let forwarded = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(forwarded.parent_span_id, vec![3; 8]);
        assert_eq!(forwarded.attributes.len(), 1);
        let finding = &req.resource_spans[1].scope_spans[0].spans[0];
        assert_eq!(finding.trace_id, vec![1; 16]);
        assert_eq!(finding.parent_span_id, vec![2; 8]);
        assert_eq!(finding.end_time_unix_nano, 10, "end clamped to start");
        assert_ne!(finding.span_id, vec![0; 8]);
    }

    #[test]
    fn span_ids_are_unique() {
        let a = new_span_id();
        let b = new_span_id();
        assert_ne!(a, b);
    }
}
