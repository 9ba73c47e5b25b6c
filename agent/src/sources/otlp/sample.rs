//! Realistic sample requests (vLLM `llm_request` spans) for tests and the benchmark.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};

use crate::otlp_wire::batch::{kv_f64, kv_i64, kv_str};

/// One `llm_request` span as vLLM exports it (same keys and value types), request number `i`.
pub fn vllm_span(i: u64) -> Span {
    let start = 1_760_000_000_000_000_000 + i * 1_000_000;
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(i + 1).to_be_bytes());
    trace_id[8..].copy_from_slice(&0x5eed_u64.to_be_bytes());
    Span {
        trace_id: trace_id.to_vec(),
        span_id: (i + 1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .to_be_bytes()
            .to_vec(),
        parent_span_id: (i + 7).to_be_bytes().to_vec(),
        name: "llm_request".into(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 2_500_000_000,
        attributes: vec![
            kv_str("gen_ai.response.model", "meta-llama/Llama-3.1-8B-Instruct"),
            kv_str("gen_ai.request.id", &format!("chatcmpl-{i:016x}")),
            kv_f64("gen_ai.request.temperature", 0.7),
            kv_f64("gen_ai.request.top_p", 1.0),
            kv_i64("gen_ai.request.max_tokens", 512),
            kv_i64("gen_ai.request.n", 1),
            kv_i64("gen_ai.usage.prompt_tokens", 1200 + (i % 300) as i64),
            kv_i64("gen_ai.usage.completion_tokens", 80 + (i % 50) as i64),
            kv_f64("gen_ai.latency.time_in_queue", 0.012),
            kv_f64("gen_ai.latency.time_to_first_token", 0.145),
            kv_f64("gen_ai.latency.e2e", 2.5),
            kv_f64("gen_ai.latency.time_in_model_prefill", 0.13),
            kv_f64("gen_ai.latency.time_in_model_decode", 2.3),
            kv_f64("gen_ai.latency.time_in_model_inference", 2.43),
            opentelemetry_proto::tonic::common::v1::KeyValue {
                key: "gen_ai.response.finish_reasons".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue {
                        values: vec![AnyValue {
                            value: Some(any_value::Value::StringValue("stop".into())),
                        }],
                    })),
                }),
                ..Default::default()
            },
            kv_str("tenant.id", &format!("tenant-{}", i % 8)),
        ],
        ..Default::default()
    }
}

/// A request of `spans` vLLM spans from one vLLM process, numbered from `first`.
pub fn vllm_request(first: u64, spans: usize) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv_str("service.name", "vllm"),
                    kv_i64("process.pid", 4242),
                    kv_str("host.name", "gpu-node-1"),
                    kv_str("telemetry.sdk.language", "python"),
                    kv_str("telemetry.sdk.name", "opentelemetry"),
                    kv_str("telemetry.sdk.version", "1.27.0"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "vllm.entrypoints.openai.api_server".into(),
                    ..Default::default()
                }),
                spans: (first..first + spans as u64).map(vllm_span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
