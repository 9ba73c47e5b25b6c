//! Runtime adapters: pure functions from one OTLP span (and its resource) to a
//! [`RuntimeRequest`].
//!
//! [`adapt`] picks the adapter from the span's name and attributes: vLLM's `llm_request`
//! ([`vllm`]), SGLang's `"{role} Req <rid8>"` root span ([`sglang`]), TGI's `generate` /
//! `generate_stream` / `chat_completions` / `completions` handler spans ([`tgi`]), and any
//! span carrying the OTel GenAI usage attributes ([`genai`]). Every other span gives `None`;
//! it is still forwarded untouched, since the adapters only read. [`SpanAdapter`] adds what
//! needs a memory across spans (SGLang's queue time lives on a stage span) and [`runtime_of`]
//! names the runtime a span came from, adapted or not, for
//! `inferwatch_runtime_spans_total{runtime,adapted}`.
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

use super::{OtlpReceiverConfig, RawTraceRequest};
use crate::model::{InstanceIdentity, RuntimeKind, RuntimeRequest};
use crate::otlp_wire::read::{AttributeView, SpanView, ValueView, WireLimits};

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
    adapt_with(span, instance, options, None)
}

/// [`adapt`] with SGLang's queue times seen on earlier stage spans.
fn adapt_with(
    span: &SpanView<'_>,
    instance: &InstanceIdentity,
    options: &AdapterOptions,
    mut queue_times: Option<&mut sglang::QueueTimes>,
) -> Option<RuntimeRequest> {
    let kind = classify(span)?;
    let fields = Fields::read(span.attributes(), options);
    let kind = match kind {
        // A span merely named like SGLang's root or TGI's handler must carry that runtime's
        // own attributes; otherwise it is read as GenAI when it reports usage.
        Some(RuntimeKind::Sglang) if !sglang::is_root(&fields) => None,
        Some(RuntimeKind::Tgi) if !tgi::is_handler(&fields) => None,
        known => known,
    };
    let kind = match kind {
        Some(k) => k,
        // Not a known runtime span name: GenAI conventions only when it reports usage.
        None if fields.is_genai() => RuntimeKind::GenAi,
        None => return None,
    };
    let mut request = base(kind, span, instance, &fields)?;
    match kind {
        RuntimeKind::Vllm => vllm::fill(&mut request, &fields),
        RuntimeKind::Sglang => {
            let queued = queue_times.as_mut().and_then(|q| q.take(&request.trace_id));
            sglang::fill(&mut request, span, &fields, queued)
        }
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
    if sglang::root_role(span.name).is_some() {
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
        // vLLM's and SGLang's key alike.
        prefill_ns: fields.time_in_model_prefill_s.and_then(secs_to_ns),
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
    // vLLM's resource names its emitting process as `vllm.process_id`; the API server (the
    // front process) is the one without `vllm.process_kind`. The OTel SDKs' process detector
    // sets `process.pid`, which wins when both are there.
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
    /// `gen_ai.request.id`.
    pub request_id: Option<&'a str>,
    /// SGLang's `rid` (set when its root opens).
    pub sglang_rid: Option<&'a str>,
    /// SGLang's `module` (`sglang::<module>`).
    pub module: Option<&'a str>,
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
    /// `gen_ai.usage.cache_read.input_tokens`, `gen_ai.usage.cached_tokens` (SGLang) or
    /// `cached_tokens`.
    pub cached_tokens: Option<u64>,
    /// `gen_ai.response.finish_reasons` (first; a string array, or SGLang's JSON string
    /// `'["stop"]'`) or `finish_reason`.
    pub finish_reason: Option<String>,
    /// `gen_ai.latency.time_in_queue`, seconds.
    pub time_in_queue_s: Option<f64>,
    /// `gen_ai.latency.time_in_model_prefill`, seconds.
    pub time_in_model_prefill_s: Option<f64>,
    /// `gen_ai.latency.time_to_first_token`, seconds.
    pub time_to_first_token_s: Option<f64>,
    /// `gen_ai.latency.e2e`, seconds.
    pub e2e_s: Option<f64>,
    /// TGI `queue_time` (a Rust `Duration` debug string).
    pub tgi_queue_time: Option<&'a str>,
    /// TGI `inference_time` (a Rust `Duration` debug string).
    pub tgi_inference_time: Option<&'a str>,
    /// TGI `time_per_token` (a Rust `Duration` debug string).
    pub tgi_time_per_token: Option<&'a str>,
    /// TGI's handler recorded `parameters` (set at the start, so also on failures).
    pub tgi_parameters: bool,
    /// `code.namespace` (set by `tracing-opentelemetry` on every span TGI exports).
    pub code_namespace: Option<&'a str>,
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
                "gen_ai.request.id" => f.request_id = str_of(&value),
                "rid" => f.sglang_rid = str_of(&value),
                "module" => f.module = str_of(&value),
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
                "gen_ai.usage.cache_read.input_tokens"
                | "gen_ai.usage.cached_tokens"
                | "cached_tokens" => f.cached_tokens = u64_of(&value),
                "gen_ai.response.finish_reasons" | "finish_reason" => {
                    f.finish_reason = first_str(&value)
                }
                "gen_ai.latency.time_in_queue" => f.time_in_queue_s = f64_of(&value),
                "gen_ai.latency.time_to_first_token" => f.time_to_first_token_s = f64_of(&value),
                "gen_ai.latency.time_in_model_prefill" => {
                    f.time_in_model_prefill_s = f64_of(&value)
                }
                "gen_ai.latency.e2e" => f.e2e_s = f64_of(&value),
                "queue_time" => f.tgi_queue_time = str_of(&value),
                "inference_time" => f.tgi_inference_time = str_of(&value),
                "time_per_token" => f.tgi_time_per_token = str_of(&value),
                "parameters" => f.tgi_parameters = true,
                "code.namespace" => f.code_namespace = str_of(&value),
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

/// A string, or the first string of a string array; a string holding a JSON array of strings
/// (SGLang's `json.dumps([reason])`) gives its first element.
fn first_str(value: &ValueView<'_>) -> Option<String> {
    match value {
        ValueView::Str(s) if s.trim_start().starts_with('[') => {
            serde_json::from_str::<Vec<String>>(s)
                .ok()
                .and_then(|v| v.into_iter().next())
        }
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

/// The adapters with the memory some runtimes need across spans: SGLang's queue time is the
/// duration of its `prefill_waiting` stage span, which its scheduler exports before the root.
/// One per pipeline; bounded ([`sglang::QUEUE_TIMES_CAPACITY`]).
#[derive(Debug, Default)]
pub struct SpanAdapter {
    options: AdapterOptions,
    queue_times: sglang::QueueTimes,
}

impl SpanAdapter {
    /// An adapter reading the tenant and conversation from `options`' attributes.
    pub fn new(options: AdapterOptions) -> Self {
        Self {
            options,
            queue_times: sglang::QueueTimes::default(),
        }
    }

    /// The options it reads with.
    pub fn options(&self) -> &AdapterOptions {
        &self.options
    }

    /// [`adapt`], remembering SGLang's stage queue times for the roots that follow. A stage
    /// span is still not a request (`None`) and is forwarded untouched.
    pub fn adapt(
        &mut self,
        span: &SpanView<'_>,
        instance: &InstanceIdentity,
    ) -> Option<RuntimeRequest> {
        if self.queue_times.observe(span) {
            return None;
        }
        adapt_with(span, instance, &self.options, Some(&mut self.queue_times))
    }

    /// SGLang queue times forgotten before their root arrived (the table was full).
    pub fn queue_times_evicted(&self) -> u64 {
        self.queue_times.evicted
    }
}

/// The runtime a span came from, for `inferwatch_runtime_spans_total{runtime}`: known even
/// for spans no adapter turns into a request, so that a runtime that renames its spans shows
/// up as a rise of `adapted="false"` for its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeLabel {
    /// vLLM.
    Vllm,
    /// SGLang.
    Sglang,
    /// Text Generation Inference.
    Tgi,
    /// A span that follows the OTel GenAI conventions, from no runtime named above.
    GenAi,
    /// Nothing tells.
    Unknown,
}

impl RuntimeLabel {
    /// Every label, in a fixed order (for pre-creating counters).
    pub const ALL: [RuntimeLabel; 5] = [
        RuntimeLabel::Vllm,
        RuntimeLabel::Sglang,
        RuntimeLabel::Tgi,
        RuntimeLabel::GenAi,
        RuntimeLabel::Unknown,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeLabel::Vllm => "vllm",
            RuntimeLabel::Sglang => "sglang",
            RuntimeLabel::Tgi => "tgi",
            RuntimeLabel::GenAi => "genai",
            RuntimeLabel::Unknown => "unknown",
        }
    }

    /// The label of an adapted request's runtime.
    pub fn of_kind(kind: RuntimeKind) -> Self {
        match kind {
            RuntimeKind::Vllm => RuntimeLabel::Vllm,
            RuntimeKind::Sglang => RuntimeLabel::Sglang,
            RuntimeKind::Tgi => RuntimeLabel::Tgi,
            RuntimeKind::GenAi => RuntimeLabel::GenAi,
        }
    }
}

/// The runtime named by a span's resource: vLLM's own resource keys (`vllm.*`), or a
/// `service.name` of `sglang` / TGI's `text-generation-inference.router` (or any name holding
/// `vllm`, `sglang`, `text-generation-inference` / `tgi`). Read once per resource.
pub fn runtime_of_resource(resource: Option<&Resource>) -> Option<RuntimeLabel> {
    let attributes = resource
        .map(|r| r.attributes.as_slice())
        .unwrap_or_default();
    if attributes.iter().any(|kv| kv.key.starts_with("vllm.")) {
        return Some(RuntimeLabel::Vllm);
    }
    let service = attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.to_ascii_lowercase()),
            _ => None,
        })?;
    runtime_of_name(&service)
}

/// The runtime named by an instrumentation scope (`sglang server`, vLLM's module names,
/// TGI's `text_generation_router`).
pub fn runtime_of_scope(scope_name: &str) -> Option<RuntimeLabel> {
    runtime_of_name(&scope_name.to_ascii_lowercase())
}

fn runtime_of_name(name: &str) -> Option<RuntimeLabel> {
    if name.contains("sglang") {
        Some(RuntimeLabel::Sglang)
    } else if name.contains("vllm") {
        Some(RuntimeLabel::Vllm)
    } else if name.contains("text-generation-inference")
        || name.contains("text_generation")
        || name
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "tgi")
    {
        Some(RuntimeLabel::Tgi)
    } else {
        None
    }
}

/// The runtime of one span: the adapter's verdict when it adapted, else the resource's or the
/// scope's (`context`, from [`runtime_of_resource`] / [`runtime_of_scope`]), else the span's
/// own name (a runtime's known span names, and SGLang's stage and thread spans).
pub fn runtime_of(
    span_name: &str,
    adapted: Option<RuntimeKind>,
    context: Option<RuntimeLabel>,
) -> RuntimeLabel {
    if let Some(kind) = adapted {
        return RuntimeLabel::of_kind(kind);
    }
    if let Some(label) = context {
        return label;
    }
    if span_name == vllm::SPAN_NAME {
        RuntimeLabel::Vllm
    } else if sglang::root_role(span_name).is_some() || span_name == sglang::QUEUE_STAGE {
        RuntimeLabel::Sglang
    } else if tgi::SPAN_NAMES.contains(&span_name) {
        RuntimeLabel::Tgi
    } else {
        RuntimeLabel::Unknown
    }
}
