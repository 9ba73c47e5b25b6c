//! Adapter tests: one table-like test per runtime, plus pass-through of unknown spans.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, span::Event};

use super::tgi::parse_debug_duration;
use super::*;
use crate::sinks::batch::{kv_f64, kv_i64, kv_str};
use crate::sources::otlp::sample::vllm_span;

const START: u64 = 1_000_000_000_000;

fn span(name: &str, attributes: Vec<KeyValue>) -> Span {
    Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        parent_span_id: vec![3; 8],
        name: name.into(),
        start_time_unix_nano: START,
        end_time_unix_nano: START + 3_000_000_000,
        attributes,
        ..Default::default()
    }
}

fn resource() -> Resource {
    Resource {
        attributes: vec![
            kv_str("service.name", "sglang"),
            kv_i64("process.pid", 77),
            kv_str("host.name", "node-a"),
            kv_str("service.instance.id", "i-1"),
        ],
        ..Default::default()
    }
}

#[test]
fn vllm_llm_request() {
    let s = vllm_span(3);
    let r =
        adapt_decoded(&s, Some(&resource()), &AdapterOptions::default()).expect("vllm span adapts");
    assert_eq!(r.runtime, RuntimeKind::Vllm);
    assert_eq!(r.request_id.as_deref(), Some("chatcmpl-0000000000000003"));
    assert_eq!(r.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
    assert_eq!(r.queue_ns, Some(12_000_000));
    assert_eq!(r.first_token, Some(s.start_time_unix_nano + 145_000_000));
    assert_eq!(r.arrival, s.start_time_unix_nano);
    assert_eq!(r.end, s.end_time_unix_nano);
    assert_eq!(r.prompt_tokens, Some(1203));
    assert_eq!(r.output_tokens, Some(83));
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.tenant.as_deref(), Some("tenant-3"));
    assert_eq!(r.parent_span_id, Some(10u64.to_be_bytes()));
    assert_eq!(r.instance.pid, Some(77));
    assert_eq!(r.instance.service_instance_id.as_deref(), Some("i-1"));
}

#[test]
fn vllm_end_falls_back_to_e2e() {
    let mut s = span("llm_request", vec![kv_f64("gen_ai.latency.e2e", 1.5)]);
    s.end_time_unix_nano = 0;
    let r = adapt_decoded(&s, None, &AdapterOptions::default()).expect("adapts");
    assert_eq!(r.end, START + 1_500_000_000);
}

#[test]
fn genai_conventions_with_configured_keys() {
    let options = AdapterOptions {
        tenant_attribute: "org".into(),
        conversation_attribute: "session.id".into(),
    };
    let s = span(
        "chat llama",
        vec![
            kv_str("gen_ai.operation.name", "chat"),
            kv_str("gen_ai.request.model", "llama"),
            kv_i64("gen_ai.usage.input_tokens", 28_000),
            kv_i64("gen_ai.usage.output_tokens", 12),
            kv_i64("gen_ai.usage.cache_read.input_tokens", 0),
            kv_str("gen_ai.conversation.id", "ignored-with-custom-key"),
            kv_str("session.id", "conv-9"),
            kv_str("org", "globex"),
            kv_str("client.address", "10.0.0.5"),
            kv_i64("client.port", 51234),
            kv_str("gen_ai.response.finish_reasons", "length"),
        ],
    );
    let r = adapt_decoded(&s, None, &options).expect("GenAI span adapts");
    assert_eq!(r.runtime, RuntimeKind::GenAi);
    assert_eq!(r.prompt_tokens, Some(28_000));
    assert_eq!(r.cached_tokens, Some(0));
    assert_eq!(r.output_tokens, Some(12));
    assert_eq!(r.conversation.as_deref(), Some("conv-9"));
    assert_eq!(r.tenant.as_deref(), Some("globex"));
    assert_eq!(r.client, Some("10.0.0.5:51234".parse().expect("addr")));
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!(r.model.as_deref(), Some("llama"));
}

#[test]
fn sglang_root_span() {
    let s = span(
        "Req 8f3a2c1d",
        vec![
            kv_i64("prompt_tokens", 500),
            kv_i64("completion_tokens", 40),
            kv_i64("cached_tokens", 256),
        ],
    );
    let r =
        adapt_decoded(&s, Some(&resource()), &AdapterOptions::default()).expect("sglang adapts");
    assert_eq!(r.runtime, RuntimeKind::Sglang);
    assert_eq!(r.request_id.as_deref(), Some("8f3a2c1d"));
    assert_eq!(r.prompt_tokens, Some(500));
    assert_eq!(r.cached_tokens, Some(256));
    assert_eq!(r.output_tokens, Some(40));
    assert_eq!(r.instance.service_name.as_deref(), Some("sglang"));
    // Its children (stages) are not requests.
    assert_eq!(
        adapt_decoded(&span("Prefill", vec![]), None, &AdapterOptions::default()),
        None
    );
}

#[test]
fn tgi_generate_stream() {
    let s = span(
        "generate_stream",
        vec![
            kv_str("total_time", "3.2s"),
            kv_str("validation_time", "350µs"),
            kv_str("queue_time", "12.5ms"),
            kv_str("inference_time", "3.1s"),
            kv_str("time_per_token", "25ms"),
            kv_str("prompt_tokens", "900"),
            kv_str("generated_tokens", "124"),
        ],
    );
    let r = adapt_decoded(&s, None, &AdapterOptions::default()).expect("tgi adapts");
    assert_eq!(r.runtime, RuntimeKind::Tgi);
    assert_eq!(r.queue_ns, Some(12_500_000));
    assert_eq!(r.prompt_tokens, Some(900));
    assert_eq!(r.output_tokens, Some(124));
    // A span merely named `generate` without TGI's fields is not a TGI request.
    assert_eq!(
        adapt_decoded(
            &span("generate", vec![kv_str("x", "y")]),
            None,
            &AdapterOptions::default()
        ),
        None
    );
}

#[test]
fn debug_durations_parse() {
    assert_eq!(parse_debug_duration("1.5ms"), Some(1_500_000));
    assert_eq!(parse_debug_duration("2s"), Some(2_000_000_000));
    assert_eq!(parse_debug_duration("10µs"), Some(10_000));
    assert_eq!(parse_debug_duration("7ns"), Some(7));
    assert_eq!(parse_debug_duration("ms"), None);
    assert_eq!(parse_debug_duration("3 parsecs"), None);
}

#[test]
fn token_events_become_token_times() {
    let mut s = span(
        "llm_request",
        vec![kv_i64("gen_ai.usage.completion_tokens", 3)],
    );
    s.events = [10u64, 20, 30]
        .iter()
        .map(|t| Event {
            name: "token".into(),
            time_unix_nano: START + t,
            ..Default::default()
        })
        .chain(std::iter::once(Event {
            name: "other".into(),
            time_unix_nano: START + 5,
            ..Default::default()
        }))
        .collect();
    let r = adapt_decoded(&s, None, &AdapterOptions::default()).expect("adapts");
    assert_eq!(r.token_times, vec![START + 10, START + 20, START + 30]);
    assert_eq!(
        r.first_token,
        Some(START + 10),
        "first token from events without TTFT"
    );
}

#[test]
fn unknown_spans_give_none_and_pass_through_untouched() {
    use crate::sources::otlp::RawTraceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    let unknown = vec![
        span("GET /health", vec![kv_str("http.method", "GET")]),
        span("db.query", vec![]),
        span(
            "llm_request_like",
            vec![kv_i64("gen_ai.usage.prompt_tokens", 5)],
        ),
    ];
    for s in &unknown {
        assert_eq!(
            adapt_decoded(s, None, &AdapterOptions::default()),
            None,
            "{}",
            s.name
        );
    }
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource()),
            scope_spans: vec![ScopeSpans {
                spans: unknown,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let raw = RawTraceRequest::from(request);
    assert!(adapt_request(&raw, &AdapterOptions::default()).is_empty());
}

#[test]
fn malformed_ids_give_none() {
    let mut s = vllm_span(1);
    s.trace_id = vec![1, 2, 3];
    assert_eq!(adapt_decoded(&s, None, &AdapterOptions::default()), None);
}
