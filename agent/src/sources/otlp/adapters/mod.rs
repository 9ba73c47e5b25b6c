//! Runtime adapters: pure functions from one OTLP span (and its resource) to a
//! [`RuntimeRequest`].
//!
//! [`adapt`] picks the adapter from the span's name and attributes: vLLM's `llm_request`
//! ([`vllm`]), SGLang's `Req <rid>` root span ([`sglang`]), TGI's `generate` /
//! `generate_stream` spans ([`tgi`]), and any span carrying the OTel GenAI usage attributes
//! ([`genai`]). Every other span gives `None`; it is still forwarded untouched, since the
//! adapters only read.
//!
//! The attributes are read in one pass ([`Fields::read`]) whatever the runtime, so adapting
//! costs one scan of the attribute list per span. Spans are read in place from their protobuf
//! encoding ([`SpanView`]): nothing is decoded that no adapter reads.

pub mod genai;
pub mod sglang;
pub mod startup;
#[cfg(test)]
mod tests;
pub mod tgi;
pub mod vllm;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::wire::{AttributeView, SpanView, ValueView, WireLimits};
use super::{OtlpReceiverConfig, RawTraceRequest};
use crate::model::{InstanceIdentity, RuntimeKind, RuntimeRequest};

/// What the adapters need from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterOptions {
    /// The span attribute that names the tenant (default `tenant.id`).
    pub tenant_attribute: String,
    /// The span attribute that names the conversation (default `gen_ai.conversation.id`).
    pub conversation_attribute: String,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        Self::from(&OtlpReceiverConfig::default())
    }
}

impl From<&OtlpReceiverConfig> for AdapterOptions {
    fn from(c: &OtlpReceiverConfig) -> Self {
        Self {
            tenant_attribute: c.tenant_attribute.clone(),
            conversation_attribute: c.conversation_attribute.clone(),
        }
    }
}

/// Span event names read as one output token each (their times become `token_times`).
pub const TOKEN_EVENT_NAMES: &[&str] = &["token", "gen_ai.token", "new_token", "output_token"];

/// Maps one span to a runtime request, or `None` when no adapter recognises it. `instance` is
/// the exporting process's identity from the span's resource ([`instance`]), read once per
/// resource rather than per span.
pub fn adapt(
    span: &SpanView<'_>,
    instance: &InstanceIdentity,
    options: &AdapterOptions,
) -> Option<RuntimeRequest> {
    let kind = classify(span)?;
    let fields = Fields::read(span.attributes(), options);
    let kind = match kind {
        Some(k) => k,
        // Not a known runtime span name: GenAI conventions only when it reports usage.
        None if fields.is_genai() => RuntimeKind::GenAi,
        None => return None,
    };
    // A span that is merely named like TGI's handler must carry TGI's timings.
    if kind == RuntimeKind::Tgi && fields.tgi_queue_time.is_none() && !fields.is_genai() {
        return None;
    }
    let mut request = base(kind, span, instance, &fields)?;
    match kind {
        RuntimeKind::Vllm => vllm::fill(&mut request, &fields),
        RuntimeKind::Sglang => sglang::fill(&mut request, span, &fields),
        RuntimeKind::Tgi => tgi::fill(&mut request, &fields),
        RuntimeKind::GenAi => genai::fill(&mut request, &fields),
    }
    if request.first_token.is_none() {
        request.first_token = request.token_times.first().copied();
    }
    Some(request)
}

/// [`adapt`] for a decoded span (OTLP/JSON, tests, tools): encoded, then read like a received
/// one, so both take the same path.
pub fn adapt_decoded(
    span: &Span,
    resource: Option<&Resource>,
    options: &AdapterOptions,
) -> Option<RuntimeRequest> {
    let bytes = span.encode_to_vec();
    // prost's own encoding is canonical and within prost's limits: it always reads.
    let view = SpanView::parse(&bytes, WireLimits::unlimited()).ok()?;
    adapt(&view, &instance(resource), options)
}

/// Adapts every span of a request that passed [`super::validate`] (or was built from decoded
/// spans), reading each span's top level as the pipeline does.
pub fn adapt_request(request: &RawTraceRequest, options: &AdapterOptions) -> Vec<RuntimeRequest> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let identity = instance(rs.resource.as_ref());
        for span in rs.scope_spans.iter().flat_map(|ss| ss.spans.iter()) {
            if let Some(view) = SpanView::read_validated(span) {
                out.extend(adapt(&view, &identity, options));
            }
        }
    }
    out
}

/// `Some(Some(kind))` for a known span name, `Some(None)` for "maybe GenAI", `None` for a
/// span that cannot be a request (no attributes at all).
fn classify(span: &SpanView<'_>) -> Option<Option<RuntimeKind>> {
    if span.name == vllm::SPAN_NAME {
        return Some(Some(RuntimeKind::Vllm));
    }
    if span.name.starts_with(sglang::SPAN_PREFIX) {
        return Some(Some(RuntimeKind::Sglang));
    }
    if tgi::SPAN_NAMES.contains(&span.name) {
        return Some(Some(RuntimeKind::Tgi));
    }
    if span.attribute_count == 0 {
        return None;
    }
    Some(None)
}

fn base(
    kind: RuntimeKind,
    span: &SpanView<'_>,
    instance: &InstanceIdentity,
    fields: &Fields<'_>,
) -> Option<RuntimeRequest> {
    let trace_id: [u8; 16] = span.trace_id.try_into().ok()?;
    let span_id: [u8; 8] = span.span_id.try_into().ok()?;
    let parent_span_id = <[u8; 8]>::try_from(span.parent_span_id)
        .ok()
        .filter(|p| p != &[0; 8]);
    let client = match (fields.client_address, fields.client_port) {
        (Some(addr), Some(port)) => addr
            .parse::<IpAddr>()
            .ok()
            .zip(u16::try_from(port).ok())
            .map(|(ip, port)| SocketAddr::new(ip, port)),
        _ => None,
    };
    let token_times = span
        .events()
        .filter(|e| TOKEN_EVENT_NAMES.contains(&e.name))
        .map(|e| e.time_unix_nano)
        .collect();
    Some(RuntimeRequest {
        runtime: kind,
        trace_id,
        span_id,
        parent_span_id,
        request_id: fields.request_id.map(str::to_owned),
        model: fields.model.or(fields.response_model).map(str::to_owned),
        tenant: fields.tenant.map(str::to_owned),
        conversation: fields.conversation.map(str::to_owned),
        client,
        // Shared strings: a clone per span, not three allocations.
        instance: instance.clone(),
        arrival: span.start_time_unix_nano,
        queue_ns: None,
        first_token: None,
        end: span.end_time_unix_nano.max(span.start_time_unix_nano),
        prompt_tokens: fields.input_tokens.or(fields.prompt_tokens),
        cached_tokens: fields.cached_tokens,
        output_tokens: fields.output_tokens.or(fields.completion_tokens),
        finish_reason: fields.finish_reason.clone(),
        token_times,
    })
}

/// The exporting process's identity from its resource.
///
/// vLLM sends no `process.pid`: its `vllm.process_id` stands in for it when the resource is the
/// API server's (no `vllm.process_kind`), the process that listens and exports the request
/// spans (contract §1.4, aliases).
pub fn instance(resource: Option<&Resource>) -> InstanceIdentity {
    let mut id = InstanceIdentity::default();
    let mut vllm_pid = None;
    let mut vllm_kind = false;
    for kv in resource
        .map(|r| r.attributes.as_slice())
        .unwrap_or_default()
    {
        let value = kv
            .value
            .as_ref()
            .and_then(|v| v.value.as_ref())
            .map_or(ValueView::Empty, scalar_view);
        match kv.key.as_str() {
            "service.name" => id.service_name = str_of(&value).map(Arc::from),
            "service.instance.id" => id.service_instance_id = str_of(&value).map(Arc::from),
            "host.name" => id.host_name = str_of(&value).map(Arc::from),
            "process.pid" => id.pid = u64_of(&value).and_then(|p| u32::try_from(p).ok()),
            "vllm.process_id" => vllm_pid = u64_of(&value).and_then(|p| u32::try_from(p).ok()),
            "vllm.process_kind" => vllm_kind = true,
            _ => {}
        }
    }
    if id.pid.is_none() && !vllm_kind {
        id.pid = vllm_pid;
    }
    id
}

/// A decoded (resource) attribute value as the view the readers below take; arrays, key-value
/// lists and profiles' string-table indexes, which no resource attribute the adapters read
/// holds, as `Empty`.
pub(crate) fn scalar_view(value: &Value) -> ValueView<'_> {
    match value {
        Value::StringValue(s) => ValueView::Str(s),
        Value::BoolValue(b) => ValueView::Bool(*b),
        Value::IntValue(i) => ValueView::Int(*i),
        Value::DoubleValue(d) => ValueView::Double(*d),
        Value::BytesValue(b) => ValueView::Bytes(b),
        Value::ArrayValue(_) | Value::KvlistValue(_) | Value::StringValueStrindex(_) => {
            ValueView::Empty
        }
    }
}

/// Every attribute any adapter reads, collected in one pass over the span's attributes.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    /// `gen_ai.request.id` (vLLM) or `rid` (SGLang).
    pub request_id: Option<&'a str>,
    /// `gen_ai.request.model`.
    pub model: Option<&'a str>,
    /// `gen_ai.response.model`.
    pub response_model: Option<&'a str>,
    /// `gen_ai.operation.name`.
    pub operation: Option<&'a str>,
    /// The configured tenant attribute.
    pub tenant: Option<&'a str>,
    /// The configured conversation attribute.
    pub conversation: Option<&'a str>,
    /// `client.address`.
    pub client_address: Option<&'a str>,
    /// `client.port`.
    pub client_port: Option<u64>,
    /// `gen_ai.usage.prompt_tokens` (vLLM, older conventions) or `prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `gen_ai.usage.input_tokens`.
    pub input_tokens: Option<u64>,
    /// `gen_ai.usage.completion_tokens` or `completion_tokens` / `generated_tokens`.
    pub completion_tokens: Option<u64>,
    /// `gen_ai.usage.output_tokens`.
    pub output_tokens: Option<u64>,
    /// `gen_ai.usage.cache_read.input_tokens` or `cached_tokens`.
    pub cached_tokens: Option<u64>,
    /// `gen_ai.response.finish_reasons` (first) or `finish_reason`.
    pub finish_reason: Option<String>,
    /// `gen_ai.latency.time_in_queue`, seconds.
    pub time_in_queue_s: Option<f64>,
    /// `gen_ai.latency.time_to_first_token`, seconds.
    pub time_to_first_token_s: Option<f64>,
    /// `gen_ai.latency.e2e`, seconds.
    pub e2e_s: Option<f64>,
    /// TGI `queue_time` (a Rust `Duration` debug string).
    pub tgi_queue_time: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// Reads the known attributes from `attrs`.
    pub fn read(attrs: impl Iterator<Item = AttributeView<'a>>, options: &AdapterOptions) -> Self {
        let mut f = Fields::default();
        for AttributeView { key, value } in attrs {
            if key == options.tenant_attribute {
                f.tenant = str_of(&value);
                continue;
            }
            if key == options.conversation_attribute {
                f.conversation = str_of(&value);
                continue;
            }
            match key {
                "gen_ai.request.id" | "rid" => f.request_id = str_of(&value),
                "gen_ai.request.model" => f.model = str_of(&value),
                "gen_ai.response.model" => f.response_model = str_of(&value),
                "gen_ai.operation.name" => f.operation = str_of(&value),
                "client.address" => f.client_address = str_of(&value),
                "client.port" => f.client_port = u64_of(&value),
                "gen_ai.usage.prompt_tokens" | "prompt_tokens" => f.prompt_tokens = u64_of(&value),
                "gen_ai.usage.input_tokens" => f.input_tokens = u64_of(&value),
                "gen_ai.usage.completion_tokens" | "completion_tokens" | "generated_tokens" => {
                    f.completion_tokens = u64_of(&value)
                }
                "gen_ai.usage.output_tokens" => f.output_tokens = u64_of(&value),
                "gen_ai.usage.cache_read.input_tokens" | "cached_tokens" => {
                    f.cached_tokens = u64_of(&value)
                }
                "gen_ai.response.finish_reasons" | "finish_reason" => {
                    f.finish_reason = first_str(&value)
                }
                "gen_ai.latency.time_in_queue" => f.time_in_queue_s = f64_of(&value),
                "gen_ai.latency.time_to_first_token" => f.time_to_first_token_s = f64_of(&value),
                "gen_ai.latency.e2e" => f.e2e_s = f64_of(&value),
                "queue_time" => f.tgi_queue_time = str_of(&value),
                _ => {}
            }
        }
        f
    }

    /// True when the span reports GenAI usage or names a GenAI operation on a model.
    pub fn is_genai(&self) -> bool {
        self.input_tokens.is_some()
            || self.output_tokens.is_some()
            || (self.operation.is_some() && (self.model.is_some() || self.response_model.is_some()))
    }
}

/// A string attribute's value.
pub fn str_of<'a>(value: &ValueView<'a>) -> Option<&'a str> {
    match *value {
        ValueView::Str(s) => Some(s),
        _ => None,
    }
}

/// A non-negative integer attribute, also accepted as a whole double or a decimal string
/// (TGI records counts with `format!("{:?}")`).
pub fn u64_of(value: &ValueView<'_>) -> Option<u64> {
    match *value {
        ValueView::Int(i) => u64::try_from(i).ok(),
        ValueView::Double(d) if d >= 0.0 && d.fract() == 0.0 && d < u64::MAX as f64 => {
            Some(d as u64)
        }
        ValueView::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A floating-point attribute (an integer is accepted too).
pub fn f64_of(value: &ValueView<'_>) -> Option<f64> {
    match *value {
        ValueView::Double(d) if d.is_finite() => Some(d),
        ValueView::Int(i) => Some(i as f64),
        _ => None,
    }
}

/// A string, or the first string of a string array.
fn first_str(value: &ValueView<'_>) -> Option<String> {
    match value {
        ValueView::Str(s) => Some((*s).to_owned()),
        ValueView::Array(a) => a.values().find_map(|v| match v {
            ValueView::Str(s) => Some(s.to_owned()),
            _ => None,
        }),
        _ => None,
    }
}

/// Seconds (a non-negative finite double) to nanoseconds.
pub fn secs_to_ns(s: f64) -> Option<u64> {
    (s.is_finite() && s >= 0.0).then(|| (s * 1e9).round() as u64)
}
