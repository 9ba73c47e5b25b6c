//! The per-request OTLP span, shaped like vLLM's `llm_request`.
//!
//! Attribute keys and value types follow vLLM:
//! - `vllm/tracing.py`, class `SpanAttributes` (key names);
//! - `vllm/v1/engine/output_processor.py`, `OutputProcessor.do_tracing` (span name
//!   `llm_request`, kind SERVER, start at arrival, parent from the request's `traceparent`,
//!   and the v1 attribute set: ttft, e2e, queue, prompt/completion tokens, prefill / decode /
//!   inference time, request id; top_p / max_tokens / temperature / n only when truthy);
//! - `vllm/engine/llm_engine.py` (v0), `create_trace_span` (adds `gen_ai.response.model`,
//!   `gen_ai.usage.num_sequences`, `time_in_scheduler`, `time_in_model_forward` (ms),
//!   `time_in_model_execute`).
//!
//! On top, OTel GenAI keys that the agent reads: `gen_ai.request.model`,
//! `gen_ai.response.finish_reasons` (string array), `gen_ai.usage.cache_read.input_tokens`,
//! `gen_ai.conversation.id`, and `tenant.id`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanKind, Tracer, TracerProvider};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::ResourcePid;
use crate::flavor::Flavor;

/// vLLM's span name.
pub const SPAN_NAME: &str = "llm_request";

/// Attribute keys and their OTLP value types, as vLLM sets them (plus the OTel GenAI extras).
/// `"int"`, `"double"`, `"string"`, `"string_array"`.
pub const VLLM_ATTRIBUTES: &[(&str, &str)] = &[
    ("gen_ai.response.model", "string"),
    ("gen_ai.request.id", "string"),
    ("gen_ai.request.temperature", "double"),
    ("gen_ai.request.top_p", "double"),
    ("gen_ai.request.max_tokens", "int"),
    ("gen_ai.request.n", "int"),
    ("gen_ai.usage.num_sequences", "int"),
    ("gen_ai.usage.prompt_tokens", "int"),
    ("gen_ai.usage.completion_tokens", "int"),
    ("gen_ai.latency.time_in_queue", "double"),
    ("gen_ai.latency.time_to_first_token", "double"),
    ("gen_ai.latency.e2e", "double"),
    ("gen_ai.latency.time_in_scheduler", "double"),
    ("gen_ai.latency.time_in_model_forward", "double"),
    ("gen_ai.latency.time_in_model_execute", "double"),
    ("gen_ai.latency.time_in_model_prefill", "double"),
    ("gen_ai.latency.time_in_model_decode", "double"),
    ("gen_ai.latency.time_in_model_inference", "double"),
];

/// Extra keys (OTel GenAI + tenant) and their types.
pub const EXTRA_ATTRIBUTES: &[(&str, &str)] = &[
    ("gen_ai.request.model", "string"),
    ("gen_ai.response.finish_reasons", "string_array"),
    ("gen_ai.usage.cache_read.input_tokens", "int"),
    ("gen_ai.conversation.id", "string"),
    ("tenant.id", "string"),
];

/// Name of the optional per-token span event; attribute `gen_ai.token.index` (int).
pub const TOKEN_EVENT: &str = "gen_ai.token";

/// Facts that go into one span.
#[derive(Debug, Clone, Default)]
pub struct SpanFacts {
    /// `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// Model.
    pub model: String,
    /// Runtime request id.
    pub request_id: String,
    /// Sampling params (0 / None = not set, as vLLM omits falsy values).
    pub temperature: f64,
    /// top_p.
    pub top_p: f64,
    /// max_tokens.
    pub max_tokens: i64,
    /// n.
    pub n: i64,
    /// Tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// `length` / `abort` / ...
    pub finish_reason: String,
    /// Times, unix ns.
    pub arrival_ns: u64,
    /// Scheduled.
    pub scheduled_ns: u64,
    /// First token.
    pub first_token_ns: u64,
    /// Last token.
    pub last_token_ns: u64,
    /// End.
    pub stop_ns: u64,
    /// Model execute time, ns.
    pub execute_ns: u64,
    /// Conversation (omitted when empty).
    pub conversation: String,
    /// Tenant (omitted when empty).
    pub tenant: String,
    /// Per-token times for span events (empty: none).
    pub token_times: Vec<u64>,
    /// The request's path (TGI's SERVER span and handler name).
    pub path: String,
    /// The request's `host` header.
    pub host: String,
    /// The client's address (TGI's `http.client_ip`).
    pub peer: Option<std::net::SocketAddr>,
    /// A streaming request.
    pub stream: bool,
    /// Export no request root (SGLang versions that never end a disconnected request's root).
    pub omit_root: bool,
}

/// Exports spans (or only mints ids when no endpoint is configured).
#[derive(Debug)]
pub struct SpanSink {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    flavor: Flavor,
}

fn ts(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn secs(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e9
}

impl SpanSink {
    /// Export over OTLP/gRPC to `endpoint` (e.g. `http://127.0.0.1:4317`); `None`: no export.
    /// Needs a multi-thread tokio runtime (the batch processor blocks on shutdown otherwise).
    pub fn new(endpoint: Option<&str>, service_name: &str) -> anyhow::Result<Self> {
        Self::build(endpoint, service_name, Flavor::Vllm, ResourcePid::None)
    }

    /// As [`SpanSink::new`] for `flavor`'s shapes (SGLang's ids are 64-bit, each runtime has
    /// its own scope), with the pid attribute `pid` on the resource (none by default: the
    /// agent finds the instance from the kernel, contract §1.4).
    pub fn for_flavor(
        endpoint: Option<&str>,
        flavor: Flavor,
        pid: ResourcePid,
    ) -> anyhow::Result<Self> {
        Self::build(endpoint, flavor.service_name(), flavor, pid)
    }

    fn build(
        endpoint: Option<&str>,
        service_name: &str,
        flavor: Flavor,
        pid: ResourcePid,
    ) -> anyhow::Result<Self> {
        let mut resource = Resource::builder().with_service_name(service_name.to_string());
        let me = i64::from(std::process::id());
        match pid {
            ResourcePid::None => {}
            // As the OTel SDKs' process detector sets it.
            ResourcePid::ProcessPid => {
                resource = resource.with_attribute(KeyValue::new("process.pid", me));
            }
            // As vLLM 0.32 sets it: the API server's pid.
            ResourcePid::VllmProcessId => {
                resource = resource.with_attribute(KeyValue::new("vllm.process_id", me));
            }
        }
        let mut b = SdkTracerProvider::builder().with_resource(resource.build());
        if flavor == Flavor::Sglang {
            b = b.with_id_generator(crate::shapes::Sglang64BitIds);
        }
        if let Some(ep) = endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(ep)
                .build()?;
            b = b.with_batch_exporter(exporter);
        }
        let provider = b.build();
        let tracer = provider.tracer(match flavor {
            Flavor::Vllm => "vllm.entrypoints.openai.api_server",
            Flavor::Sglang => crate::shapes::sglang::SCOPE,
            Flavor::Tgi => crate::shapes::tgi::SCOPE,
        });
        Ok(Self {
            provider,
            tracer,
            flavor,
        })
    }

    /// The runtime whose spans this sink makes.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Emit one request's spans (vLLM: one `llm_request` span; SGLang / TGI: see
    /// [`crate::shapes`]); returns the request span's (trace id, span id) in hex.
    pub fn emit(&self, f: &SpanFacts) -> (String, String) {
        let mut carrier = HashMap::new();
        if let Some(tp) = &f.traceparent {
            carrier.insert("traceparent".to_string(), tp.clone());
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        match self.flavor {
            Flavor::Vllm => {}
            Flavor::Sglang => return crate::shapes::sglang::emit(&self.tracer, &parent, f),
            Flavor::Tgi => return crate::shapes::tgi::emit(&self.tracer, &parent, f),
        }
        let first = if f.first_token_ns == 0 {
            f.stop_ns
        } else {
            f.first_token_ns
        };
        let last = if f.last_token_ns == 0 {
            f.stop_ns
        } else {
            f.last_token_ns
        };
        let sched = if f.scheduled_ns == 0 {
            f.stop_ns
        } else {
            f.scheduled_ns
        };
        let mut attrs = vec![
            KeyValue::new("gen_ai.response.model", f.model.clone()),
            KeyValue::new("gen_ai.request.id", f.request_id.clone()),
            KeyValue::new("gen_ai.usage.num_sequences", 1i64),
            KeyValue::new("gen_ai.usage.prompt_tokens", f.prompt_tokens),
            KeyValue::new("gen_ai.usage.completion_tokens", f.completion_tokens),
            KeyValue::new("gen_ai.latency.time_in_queue", secs(f.arrival_ns, sched)),
            KeyValue::new(
                "gen_ai.latency.time_to_first_token",
                secs(f.arrival_ns, first),
            ),
            KeyValue::new("gen_ai.latency.e2e", secs(f.arrival_ns, f.stop_ns)),
            KeyValue::new("gen_ai.latency.time_in_scheduler", 0.0f64),
            // vLLM v0 reports forward time in milliseconds.
            KeyValue::new(
                "gen_ai.latency.time_in_model_forward",
                f.execute_ns as f64 / 1e6,
            ),
            KeyValue::new(
                "gen_ai.latency.time_in_model_execute",
                f.execute_ns as f64 / 1e9,
            ),
            KeyValue::new("gen_ai.latency.time_in_model_prefill", secs(sched, first)),
            KeyValue::new("gen_ai.latency.time_in_model_decode", secs(first, last)),
            KeyValue::new("gen_ai.latency.time_in_model_inference", secs(sched, last)),
            KeyValue::new("gen_ai.request.model", f.model.clone()),
            KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(Array::String(vec![StringValue::from(
                    f.finish_reason.clone(),
                )])),
            ),
            KeyValue::new("gen_ai.usage.cache_read.input_tokens", f.cached_tokens),
        ];
        // vLLM omits falsy sampling parameters.
        if f.top_p != 0.0 {
            attrs.push(KeyValue::new("gen_ai.request.top_p", f.top_p));
        }
        if f.max_tokens != 0 {
            attrs.push(KeyValue::new("gen_ai.request.max_tokens", f.max_tokens));
        }
        if f.temperature != 0.0 {
            attrs.push(KeyValue::new("gen_ai.request.temperature", f.temperature));
        }
        if f.n != 0 {
            attrs.push(KeyValue::new("gen_ai.request.n", f.n));
        }
        if !f.conversation.is_empty() {
            attrs.push(KeyValue::new(
                "gen_ai.conversation.id",
                f.conversation.clone(),
            ));
        }
        if !f.tenant.is_empty() {
            attrs.push(KeyValue::new("tenant.id", f.tenant.clone()));
        }
        let mut span = self
            .tracer
            .span_builder(SPAN_NAME)
            .with_kind(SpanKind::Server)
            .with_start_time(ts(f.arrival_ns))
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        for (i, t) in f.token_times.iter().enumerate() {
            span.add_event_with_timestamp(
                TOKEN_EVENT,
                ts(*t),
                vec![KeyValue::new("gen_ai.token.index", i as i64)],
            );
        }
        let sc = span.span_context().clone();
        span.end_with_timestamp(ts(f.stop_ns));
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }

    /// Flush and stop the exporter (bounded by the SDK's timeout).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "span flush failed");
        }
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "span exporter shutdown");
        }
    }
}
