//! Adapter tests: one table-like test per runtime, plus pass-through of unknown spans.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, span::Event};

use super::tgi::parse_debug_duration;
use super::*;
use crate::otlp_wire::batch::{kv_f64, kv_i64, kv_str};
use crate::otlp_wire::read::SpanView;
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

/// A trace id as SGLang's `TraceCustomIdGenerator` makes it (`getrandbits(64)`): the upper 8
/// bytes zero.
fn sglang_trace_id(low: u64) -> Vec<u8> {
    let mut id = vec![0u8; 16];
    id[8..].copy_from_slice(&low.to_be_bytes());
    id
}

/// SGLang's root span as `TraceReqContext.trace_req_start` opens it and `trace_req_finish`
/// ends it with `make_span_attrs` (tokenizer manager): name `f"{role} Req {rid[:8]}"`, kind
/// INTERNAL, no parent without `traceparent`, `rid` and `module` set at the start.
fn sglang_root(role: &str, rid: &str, finish: Vec<KeyValue>) -> Span {
    let mut attributes = vec![kv_str("rid", rid), kv_str("module", "sglang::")];
    attributes.extend(finish);
    Span {
        trace_id: sglang_trace_id(0x1a2b_3c4d_5e6f_7081),
        span_id: 0x0bad_cafe_u64.to_be_bytes().to_vec(),
        parent_span_id: Vec::new(),
        name: format!("{role} Req {}", &rid[..8]),
        kind: 1,
        start_time_unix_nano: START,
        end_time_unix_nano: START + 3_000_000_000,
        attributes,
        ..Default::default()
    }
}

/// The attributes `make_span_attrs` sets when a request finishes normally.
fn sglang_finish(rid: &str, reason: &str) -> Vec<KeyValue> {
    vec![
        kv_i64("gen_ai.usage.completion_tokens", 40),
        kv_i64("gen_ai.usage.prompt_tokens", 500),
        kv_i64("gen_ai.usage.cached_tokens", 256),
        kv_str("gen_ai.request.id", rid),
        kv_i64("gen_ai.request.max_tokens", 64),
        kv_str("gen_ai.response.model", "qwen2.5-7b"),
        kv_str("gen_ai.response.finish_reasons", &format!("[\"{reason}\"]")),
        kv_f64("gen_ai.latency.time_to_first_token", 0.120),
        kv_f64("gen_ai.latency.time_in_model_prefill", 0.045),
    ]
}

fn sglang_resource() -> Resource {
    // SGLang's `process_tracing_init`: `service.name` only.
    Resource {
        attributes: vec![kv_str("service.name", "sglang")],
        ..Default::default()
    }
}

const SGLANG_RID: &str = "8f3a2c1d9e7b4a6f8c2d1e0f3a4b5c6d";

#[test]
fn sglang_root_in_every_role() {
    for role in ["", "prefill", "decode"] {
        let s = sglang_root(role, SGLANG_RID, sglang_finish(SGLANG_RID, "stop"));
        let r = adapt_decoded(&s, Some(&sglang_resource()), &AdapterOptions::default())
            .unwrap_or_else(|| panic!("SGLang root {:?} adapts", s.name));
        assert_eq!(r.runtime, RuntimeKind::Sglang, "{:?}", s.name);
        assert_eq!(r.request_id.as_deref(), Some(SGLANG_RID));
        assert_eq!(r.prompt_tokens, Some(500));
        assert_eq!(r.cached_tokens, Some(256));
        assert_eq!(r.output_tokens, Some(40));
        assert_eq!(
            r.finish_reason.as_deref(),
            Some("stop"),
            "JSON string parsed"
        );
        assert_eq!(r.model.as_deref(), Some("qwen2.5-7b"));
        assert_eq!(r.first_token, Some(START + 120_000_000));
        assert_eq!(r.queue_ns, None, "no queue time on the root itself");
        assert_eq!(r.parent_span_id, None);
        assert_eq!(&r.trace_id[..8], &[0; 8], "64-bit trace id kept as sent");
        assert_eq!(r.instance.service_name.as_deref(), Some("sglang"));
        assert_eq!(r.instance.pid, None);
    }
    // The normal-mode name starts with a space.
    assert_eq!(sglang_root("", SGLANG_RID, vec![]).name, " Req 8f3a2c1d");
}

#[test]
fn sglang_abort_while_running_and_while_queued() {
    let running = sglang_root("", SGLANG_RID, sglang_finish(SGLANG_RID, "abort"));
    let r = adapt_decoded(&running, None, &AdapterOptions::default()).expect("adapts");
    assert_eq!(r.finish_reason.as_deref(), Some("abort"));
    assert_eq!(r.output_tokens, Some(40));
    // Aborted in the queue: the root ends with the finish reason and no counts.
    let queued = sglang_root(
        "",
        SGLANG_RID,
        vec![
            kv_str("gen_ai.request.id", SGLANG_RID),
            kv_str("gen_ai.response.model", "qwen2.5-7b"),
            kv_str("gen_ai.response.finish_reasons", "[\"abort\"]"),
        ],
    );
    let r = adapt_decoded(&queued, None, &AdapterOptions::default()).expect("adapts");
    assert_eq!(r.finish_reason.as_deref(), Some("abort"));
    assert_eq!((r.prompt_tokens, r.output_tokens), (None, None));
    assert_eq!(r.first_token, None);
    // A root that was ended before finishing (only the start attributes) still names its
    // request, from `rid`.
    let bare = sglang_root("", SGLANG_RID, vec![]);
    let r = adapt_decoded(&bare, None, &AdapterOptions::default()).expect("adapts");
    assert_eq!(r.request_id.as_deref(), Some(SGLANG_RID));
}

#[test]
fn sglang_names_without_its_attributes_are_not_requests() {
    for name in [" Req 8f3a2c1d", "Req 8f3a2c1d", "decode Req 8f3a2c1d"] {
        let s = span(name, vec![kv_str("http.method", "GET")]);
        assert_eq!(
            adapt_decoded(&s, None, &AdapterOptions::default()),
            None,
            "{name:?}"
        );
    }
    for name in ["Request 1", "a b Req 1", "Req ", " Req a b"] {
        assert_eq!(sglang::root_role(name), None, "{name:?}");
    }
    assert_eq!(sglang::root_role(" Req 8f3a2c1d"), Some(""));
    assert_eq!(sglang::root_role("prefill Req 8f3a2c1d"), Some("prefill"));
}

/// SGLang's scheduler-side stage span: below the scheduler's thread span, same trace.
fn sglang_stage(name: &str, start: u64, end: u64) -> Span {
    Span {
        trace_id: sglang_trace_id(0x1a2b_3c4d_5e6f_7081),
        span_id: 0x51ab_u64.to_be_bytes().to_vec(),
        parent_span_id: 0x7e0d_u64.to_be_bytes().to_vec(),
        name: name.into(),
        kind: 1,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        ..Default::default()
    }
}

#[test]
fn sglang_queue_time_from_the_prefill_waiting_stage() {
    use crate::otlp_wire::read::WireLimits;
    let mut adapter = SpanAdapter::new(AdapterOptions::default());
    let identity = instance(Some(&sglang_resource()));
    let thread = Span {
        name: "Scheduler [TP 0] (host:5f2a9c1e | pid:4242)".into(),
        attributes: vec![
            kv_str("host_id", "5f2a9c1e0000"),
            kv_i64("pid", 4242),
            kv_str("thread_label", "Scheduler"),
            kv_i64("tp_rank", 0),
        ],
        ..sglang_stage("", START, START + 3_000_000_000)
    };
    let waiting = sglang_stage("prefill_waiting", START + 5_000_000, START + 30_000_000);
    let forward = sglang_stage("prefill_forward", START + 30_000_000, START + 75_000_000);
    for s in [&thread, &waiting, &forward] {
        let bytes = s.encode_to_vec();
        let view = SpanView::parse(&bytes, WireLimits::unlimited()).expect("reads");
        assert_eq!(
            adapter.adapt(&view, &identity),
            None,
            "{} is no request",
            s.name
        );
    }
    let root = sglang_root("", SGLANG_RID, sglang_finish(SGLANG_RID, "stop"));
    let bytes = root.encode_to_vec();
    let view = SpanView::parse(&bytes, WireLimits::unlimited()).expect("reads");
    let r = adapter.adapt(&view, &identity).expect("root adapts");
    assert_eq!(r.queue_ns, Some(25_000_000));
    // Taken once: another root of the same trace (a retry) gets none.
    let r = adapter.adapt(&view, &identity).expect("root adapts");
    assert_eq!(r.queue_ns, None);
}

#[test]
fn sglang_queue_times_are_bounded() {
    use crate::otlp_wire::read::WireLimits;
    let mut times = sglang::QueueTimes::default();
    for i in 0..(sglang::QUEUE_TIMES_CAPACITY as u64 + 10) {
        let mut s = sglang_stage("prefill_waiting", START, START + 1_000);
        s.trace_id = sglang_trace_id(i + 1);
        let bytes = s.encode_to_vec();
        let view = SpanView::parse(&bytes, WireLimits::unlimited()).expect("reads");
        assert!(times.observe(&view));
    }
    assert_eq!(times.len(), sglang::QUEUE_TIMES_CAPACITY);
    assert_eq!(times.evicted, 10);
    let first: [u8; 16] = sglang_trace_id(1).try_into().expect("16 bytes");
    assert_eq!(times.take(&first), None, "the oldest went first");
    let last: [u8; 16] = sglang_trace_id(sglang::QUEUE_TIMES_CAPACITY as u64 + 10)
        .try_into()
        .expect("16 bytes");
    assert_eq!(times.take(&last), Some(1_000));
}

/// A TGI handler span as `#[instrument(skip_all, fields(parameters = ?req.parameters,
/// total_time, ...))]` and `tracing-opentelemetry` export it: named after the function, kind
/// INTERNAL, the `tracing` metadata as `code.*` / `thread.*` / `busy_ns` / `idle_ns`, and the
/// timings as `Duration` debug strings, only on success.
fn tgi_handler(name: &str, timings: bool) -> Span {
    let mut attributes = vec![
        kv_str(
            "parameters",
            "GenerateParameters { best_of: None, temperature: None, max_new_tokens: Some(20) }",
        ),
        kv_str("code.filepath", "router/src/server.rs"),
        kv_str("code.namespace", "text_generation_router::server"),
        kv_i64("code.lineno", 1168),
        kv_i64("thread.id", 7),
        kv_str("thread.name", "tokio-runtime-worker"),
        kv_i64("busy_ns", 812_000),
        kv_i64("idle_ns", 1_203_000_000),
    ];
    if timings {
        attributes.extend([
            kv_str("total_time", "1.204113882s"),
            kv_str("validation_time", "350.2µs"),
            kv_str("queue_time", "12.5ms"),
            kv_str("inference_time", "1.1912637s"),
            // inference_time / 20 tokens, truncated to whole nanoseconds.
            kv_str("time_per_token", "59.563185ms"),
            kv_str("seed", "None"),
        ]);
    }
    Span {
        trace_id: vec![0x4b; 16],
        span_id: vec![2; 8],
        parent_span_id: vec![3; 8],
        name: name.into(),
        kind: 1,
        start_time_unix_nano: START,
        end_time_unix_nano: START + 1_204_113_882,
        attributes,
        ..Default::default()
    }
}

#[test]
fn tgi_handlers_as_tgi_sends_them() {
    let resource = Resource {
        attributes: vec![kv_str("service.name", "text-generation-inference.router")],
        ..Default::default()
    };
    for name in tgi::SPAN_NAMES {
        let s = tgi_handler(name, true);
        let r = adapt_decoded(&s, Some(&resource), &AdapterOptions::default())
            .unwrap_or_else(|| panic!("{name} adapts"));
        assert_eq!(r.runtime, RuntimeKind::Tgi);
        assert_eq!(r.queue_ns, Some(12_500_000));
        assert_eq!(r.output_tokens, Some(20), "inference_time / time_per_token");
        assert_eq!((r.request_id.as_deref(), r.prompt_tokens), (None, None));
        assert_eq!(r.finish_reason, None);
        assert_eq!(r.first_token, None, "TGI reports no time to first token");
        assert_eq!(r.end, START + 1_204_113_882);
    }
    // An aborted or failed request: no timings, still TGI's span.
    let r = adapt_decoded(
        &tgi_handler("generate_stream", false),
        Some(&resource),
        &AdapterOptions::default(),
    )
    .expect("adapts without timings");
    assert_eq!((r.queue_ns, r.output_tokens), (None, None));
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
fn tgi_generated_tokens_only_when_the_division_is_exact() {
    use super::tgi::generated_tokens;
    // 20 tokens: 1.1912637 s / 20 = 59.563185 ms exactly.
    assert_eq!(
        generated_tokens(Some(1_191_263_700), Some(59_563_185)),
        Some(20)
    );
    // 3 tokens with a remainder of 2 ns (< 3).
    assert_eq!(generated_tokens(Some(3_000_002), Some(1_000_000)), Some(3));
    // A remainder the truncating division cannot leave.
    assert_eq!(generated_tokens(Some(3_500_000), Some(1_000_000)), None);
    assert_eq!(generated_tokens(Some(5), Some(0)), None);
    assert_eq!(generated_tokens(None, Some(1)), None);
    // Token times under the count (sub-microsecond decode): not exact, not claimed.
    assert_eq!(generated_tokens(Some(1_000_000), Some(10)), None);
}

#[test]
fn debug_durations_parse() {
    assert_eq!(parse_debug_duration("1.5ms"), Some(1_500_000));
    assert_eq!(parse_debug_duration("1.2ms"), Some(1_200_000));
    assert_eq!(parse_debug_duration("2.1s"), Some(2_100_000_000));
    assert_eq!(parse_debug_duration("350µs"), Some(350_000));
    assert_eq!(parse_debug_duration("1.204113882s"), Some(1_204_113_882));
    assert_eq!(parse_debug_duration("2s"), Some(2_000_000_000));
    assert_eq!(parse_debug_duration("10µs"), Some(10_000));
    assert_eq!(parse_debug_duration("7ns"), Some(7));
    assert_eq!(parse_debug_duration("ms"), None);
    assert_eq!(parse_debug_duration(".5ms"), None);
    assert_eq!(parse_debug_duration("1.2.3ms"), None);
    assert_eq!(parse_debug_duration("3 parsecs"), None);
}

#[test]
fn runtime_of_spans_adapted_or_not() {
    let res = |attrs: Vec<KeyValue>| Resource {
        attributes: attrs,
        ..Default::default()
    };
    assert_eq!(
        runtime_of_resource(Some(&res(vec![kv_i64("vllm.process_id", 9)]))),
        Some(RuntimeLabel::Vllm)
    );
    assert_eq!(
        runtime_of_resource(Some(&sglang_resource())),
        Some(RuntimeLabel::Sglang)
    );
    assert_eq!(
        runtime_of_resource(Some(&res(vec![kv_str(
            "service.name",
            "text-generation-inference.router"
        )]))),
        Some(RuntimeLabel::Tgi)
    );
    assert_eq!(
        runtime_of_resource(Some(&res(vec![kv_str(
            "service.name",
            "unknown_service:python"
        )]))),
        None
    );
    assert_eq!(
        runtime_of_scope("sglang server"),
        Some(RuntimeLabel::Sglang)
    );
    assert_eq!(
        runtime_of("Load weights", None, Some(RuntimeLabel::Vllm)),
        RuntimeLabel::Vllm
    );
    assert_eq!(
        runtime_of("prefill_waiting", None, None),
        RuntimeLabel::Sglang
    );
    assert_eq!(runtime_of("GET /health", None, None), RuntimeLabel::Unknown);
    assert_eq!(
        runtime_of("chat llama", Some(RuntimeKind::GenAi), None),
        RuntimeLabel::GenAi
    );
    let labels: Vec<&str> = RuntimeLabel::ALL.iter().map(|l| l.as_str()).collect();
    assert_eq!(labels, ["vllm", "sglang", "tgi", "genai", "unknown"]);
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

/// The OTLP request SGLang 0.5.23's own `trace.py` sent (produced by
/// `tests/fixtures/runtimes/sglang_spans.py`): four requests (normal mode, with a
/// `traceparent`, the `prefill` role, aborted while queued), each with its tokenizer and
/// scheduler thread spans and stages, in the order SGLang exported them.
#[test]
fn sglang_0_5_23_spans_from_its_own_tracing_code() {
    use crate::sources::otlp::RawTraceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    let bytes = include_bytes!("../../../../../tests/fixtures/runtimes/sglang-0.5.23.pb");
    let request = ExportTraceServiceRequest::decode(&bytes[..]).expect("fixture decodes");
    let raw = RawTraceRequest::from(request);
    let mut adapter = SpanAdapter::new(AdapterOptions::default());
    let mut requests = Vec::new();
    let mut others = 0;
    for rs in &raw.resource_spans {
        let identity = instance(rs.resource.as_ref());
        assert_eq!(identity.service_name.as_deref(), Some("sglang"));
        assert_eq!(identity.pid, None, "SGLang sends no pid");
        let context = runtime_of_resource(rs.resource.as_ref());
        assert_eq!(context, Some(RuntimeLabel::Sglang));
        for span in rs.scope_spans.iter().flat_map(|ss| ss.spans.iter()) {
            let view = SpanView::read_validated(span).expect("span reads");
            match adapter.adapt(&view, &identity) {
                Some(r) => requests.push((view.name.to_owned(), r)),
                None => {
                    assert_eq!(runtime_of(view.name, None, context), RuntimeLabel::Sglang);
                    others += 1;
                }
            }
        }
    }
    assert_eq!(others, 22, "thread and stage spans pass through");
    let names: Vec<&str> = requests.iter().map(|(n, _)| &n[..n.len() - 8]).collect();
    assert_eq!(names, [" Req ", " Req ", "prefill Req ", " Req "]);
    for (name, r) in &requests {
        assert_eq!(r.runtime, RuntimeKind::Sglang);
        let rid = r.request_id.as_deref().expect("rid");
        assert_eq!(rid.len(), 32, "uuid4 hex");
        assert!(name.ends_with(&rid[..8]));
        assert_eq!(r.model.as_deref(), Some("qwen2.5-7b"));
    }
    let [(_, plain), (_, traced), (_, prefill), (_, queued)] = &requests[..] else {
        panic!("four requests");
    };
    for r in [plain, prefill, queued] {
        assert_eq!(&r.trace_id[..8], &[0; 8], "SGLang's own traces are 64-bit");
        assert_eq!(r.parent_span_id, None);
    }
    assert_eq!(
        hex::encode(traced.trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "a traceparent's trace is continued"
    );
    assert_eq!(
        traced.parent_span_id.map(hex::encode).as_deref(),
        Some("00f067aa0ba902b7")
    );
    for r in [plain, traced, prefill] {
        assert_eq!(
            (r.prompt_tokens, r.output_tokens, r.cached_tokens),
            (Some(500), Some(40), Some(256))
        );
        assert_eq!(r.queue_ns, Some(25_000_000), "from prefill_waiting");
        assert_eq!(r.first_token, Some(r.arrival + 120_000_000));
        assert_eq!(r.end, r.arrival + 900_000_000);
    }
    assert_eq!(plain.finish_reason.as_deref(), Some("stop"));
    assert_eq!(prefill.finish_reason.as_deref(), Some("length"));
    assert_eq!(queued.finish_reason.as_deref(), Some("abort"));
    assert_eq!((queued.prompt_tokens, queued.output_tokens), (None, None));
    assert_eq!(queued.queue_ns, Some(400_000_000));
    assert_eq!(queued.first_token, None);
}

#[test]
fn vllm_process_id_is_the_pid_alias_when_process_pid_is_absent() {
    let res = |attrs: Vec<KeyValue>| Resource {
        attributes: attrs,
        ..Default::default()
    };
    // vLLM 0.32's resource: no process.pid, its API server's pid as vllm.process_id.
    assert_eq!(
        instance(Some(&res(vec![kv_i64("vllm.process_id", 9)]))).pid,
        Some(9)
    );
    assert_eq!(
        instance(Some(&res(vec![
            kv_i64("vllm.process_id", 9),
            kv_i64("process.pid", 7),
        ])))
        .pid,
        Some(7),
        "process.pid wins, in either order"
    );
    assert_eq!(
        instance(Some(&res(vec![
            kv_i64("process.pid", 7),
            kv_i64("vllm.process_id", 9),
        ])))
        .pid,
        Some(7)
    );
    assert_eq!(instance(Some(&res(vec![]))).pid, None);
}

/// vLLM 0.32's resource names the API server's pid only as `vllm.process_id`: it becomes the
/// instance's pid (how a discovered KV endpoint, `pid:<pid>`, ties to the spans); a
/// `process.pid` wins wherever it comes.
#[test]
fn vllm_process_id_is_the_instance_pid_unless_process_pid_says() {
    let res = |attrs: Vec<KeyValue>| Resource {
        attributes: attrs,
        ..Default::default()
    };
    let vllm = res(vec![
        kv_str("service.instance.id", "5f0c2a9e"),
        kv_i64("vllm.process_id", 4242),
    ]);
    assert_eq!(instance(Some(&vllm)).pid, Some(4242));
    for attrs in [
        vec![kv_i64("process.pid", 7), kv_i64("vllm.process_id", 4242)],
        vec![kv_i64("vllm.process_id", 4242), kv_i64("process.pid", 7)],
    ] {
        assert_eq!(instance(Some(&res(attrs))).pid, Some(7));
    }
}
