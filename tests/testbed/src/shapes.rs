//! The spans of SGLang and TGI, shaped as those runtimes' tracing code makes them (names, kinds,
//! ids, parents, resource, attribute keys and value types, and what is missing on an abort).
//! The vLLM shape is [`crate::otel`]'s.
//!
//! Read from SGLang's `python/sglang/srt/observability/trace.py` and its tokenizer manager's
//! `make_span_attrs` (2026), and from TGI's `router/src/server.rs` / `logging.rs`
//! (3.3.6-dev0); the agent's `docs/runtimes.md` lists the same facts.

use std::time::Duration;

use opentelemetry::trace::{
    Span, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{IdGenerator, SdkTracer};

use crate::otel::SpanFacts;

fn ts(ns: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(ns)
}

fn secs(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e9
}

/// SGLang's `TraceCustomIdGenerator`: `getrandbits(64)` for trace and span ids alike, so a trace
/// SGLang starts has the upper 8 bytes of its id zero.
#[derive(Debug, Default)]
pub struct Sglang64BitIds;

impl IdGenerator for Sglang64BitIds {
    fn new_trace_id(&self) -> TraceId {
        TraceId::from(u128::from(nonzero_random()))
    }

    fn new_span_id(&self) -> SpanId {
        SpanId::from(nonzero_random())
    }
}

fn nonzero_random() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// SGLang's request spans.
pub mod sglang {
    use super::*;

    /// The instrumentation scope (`trace.get_tracer("sglang server")`).
    pub const SCOPE: &str = "sglang server";

    /// The rid SGLang gives a request: `uuid.uuid4().hex` (32 hex digits). `X-Request-Id` is
    /// ignored.
    pub fn rid(seed: u64, seq: u64) -> String {
        let a = crate::tokens::mix(seed ^ seq.rotate_left(17));
        let b = crate::tokens::mix(a ^ seq);
        // The version nibble of a uuid4.
        format!("{:016x}{b:016x}", (a & !0xf000) | 0x4000)
    }

    /// The finish reason's `type` as SGLang reports it.
    fn reason(finish: &str) -> &str {
        match finish {
            "length" | "abort" | "stop" => finish,
            _ => "stop",
        }
    }

    /// Emits one request's spans: the root `" Req <rid8>"` (parent: the request's
    /// `traceparent`), the tokenizer's and the scheduler's thread spans below it, and the
    /// scheduler's stages (`prefill_waiting`, `prefill_forward`, `decode_loop`). Stages end
    /// before the root, so they are exported first, as the scheduler's are. Returns the root's
    /// (trace id, span id) in hex.
    pub fn emit(tracer: &SdkTracer, parent: &Context, f: &SpanFacts) -> (String, String) {
        let root_attrs = vec![
            KeyValue::new("rid", f.request_id.clone()),
            KeyValue::new("module", "sglang::"),
        ];
        let rid8: String = f.request_id.chars().take(8).collect();
        // A root that is never ended is never exported; its children still name it.
        let mut root = (!f.omit_root).then(|| {
            tracer
                .span_builder(format!(" Req {rid8}"))
                .with_kind(SpanKind::Internal)
                .with_start_time(ts(f.arrival_ns))
                .with_attributes(root_attrs)
                .start_with_context(tracer, parent)
        });
        let sc = match &root {
            Some(root) => root.span_context().clone(),
            None => {
                let ids = Sglang64BitIds;
                let remote = parent.span();
                let trace_id = if remote.span_context().is_valid() {
                    remote.span_context().trace_id()
                } else {
                    ids.new_trace_id()
                };
                SpanContext::new(
                    trace_id,
                    ids.new_span_id(),
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::default(),
                )
            }
        };
        let root_cx = parent.with_remote_span_context(sc.clone());
        let pid = i64::from(std::process::id());
        let host = "5f2a9c1e0b7d4e21a3c6";
        let thread = |label: &str, name: String, start: u64, tp: bool| {
            let mut attrs = vec![
                KeyValue::new("host_id", host),
                KeyValue::new("pid", pid),
                KeyValue::new("thread_label", label.to_string()),
            ];
            if tp {
                attrs.insert(0, KeyValue::new("tp_rank", 0i64));
            }
            let s = tracer
                .span_builder(name)
                .with_start_time(ts(start))
                .with_attributes(attrs)
                .start_with_context(tracer, &root_cx);
            let cx = root_cx.with_remote_span_context(s.span_context().clone());
            let end_at = move |end: u64| {
                let mut s = s;
                s.end_with_timestamp(ts(end));
            };
            (end_at, cx)
        };
        let scheduled = f.scheduled_ns.min(f.stop_ns);
        let (end_sched, sched_cx) = thread(
            "Scheduler",
            format!("Scheduler [TP 0] (host:{} | pid:{pid})", &host[..8]),
            f.arrival_ns,
            true,
        );
        let stage = |name: &str, start: u64, end: u64| {
            if end > start {
                let mut s = tracer
                    .span_builder(name.to_string())
                    .with_start_time(ts(start))
                    .start_with_context(tracer, &sched_cx);
                s.end_with_timestamp(ts(end));
            }
        };
        if f.scheduled_ns != 0 {
            stage("prefill_waiting", f.arrival_ns, scheduled);
            if f.first_token_ns != 0 {
                stage("prefill_forward", scheduled, f.first_token_ns);
                stage("decode_loop", f.first_token_ns, f.stop_ns);
            }
        } else {
            // Aborted while waiting: the stage ends with the request.
            stage("prefill_waiting", f.arrival_ns, f.stop_ns);
        }
        end_sched(f.stop_ns);
        let (end_tok, _) = thread(
            "Tokenizer",
            // No space before `(host:` without ranks, as trace.py joins them.
            format!("Tokenizer(host:{} | pid:{pid})", &host[..8]),
            f.arrival_ns,
            false,
        );
        end_tok(f.stop_ns);
        // `make_span_attrs` at finish.
        let mut finish = Vec::new();
        let queued_abort = f.scheduled_ns == 0;
        if !queued_abort {
            finish.push(KeyValue::new(
                "gen_ai.usage.completion_tokens",
                f.completion_tokens,
            ));
            finish.push(KeyValue::new("gen_ai.usage.prompt_tokens", f.prompt_tokens));
            finish.push(KeyValue::new("gen_ai.usage.cached_tokens", f.cached_tokens));
        }
        finish.push(KeyValue::new("gen_ai.request.id", f.request_id.clone()));
        if f.max_tokens != 0 {
            finish.push(KeyValue::new("gen_ai.request.max_tokens", f.max_tokens));
        }
        if f.top_p != 0.0 {
            finish.push(KeyValue::new("gen_ai.request.top_p", f.top_p));
        }
        if f.temperature != 0.0 {
            finish.push(KeyValue::new("gen_ai.request.temperature", f.temperature));
        }
        finish.push(KeyValue::new("gen_ai.response.model", f.model.clone()));
        finish.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            format!("[\"{}\"]", reason(&f.finish_reason)),
        ));
        if f.first_token_ns != 0 {
            finish.push(KeyValue::new(
                "gen_ai.latency.time_to_first_token",
                secs(f.arrival_ns, f.first_token_ns),
            ));
            finish.push(KeyValue::new(
                "gen_ai.latency.time_in_model_prefill",
                secs(scheduled, f.first_token_ns),
            ));
        }
        if let Some(root) = root.as_mut() {
            root.set_attributes(finish);
            root.end_with_timestamp(ts(f.stop_ns));
        }
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }
}

/// TGI's request spans.
pub mod tgi {
    use super::*;

    /// The instrumentation scope `opentelemetry-otlp`'s pipeline gives its tracer.
    pub const SCOPE: &str = "opentelemetry-otlp";

    /// The handler TGI routes `path` to (the span is named after the function).
    pub fn handler(path: &str, stream: bool) -> &'static str {
        match path {
            "/v1/chat/completions" => "chat_completions",
            "/v1/completions" => "completions",
            _ if stream => "generate_stream",
            _ => "generate",
        }
    }

    /// TGI's timings for a finished request: `(total, validation, queue, inference,
    /// time_per_token)`, as `generate_internal` / `generate_stream_internal` compute them
    /// (`time_per_token = inference_time / generated_tokens`, a `Duration` divided by a
    /// `u32`).
    pub fn timings(f: &SpanFacts) -> Option<[Duration; 5]> {
        let generated = u32::try_from(f.completion_tokens).ok().filter(|n| *n > 0)?;
        let scheduled = f.scheduled_ns;
        if scheduled == 0 {
            return None;
        }
        // Validation: a fixed 150 µs after arrival (the testbed does not validate).
        let queued = f.arrival_ns + 150_000;
        let total = Duration::from_nanos(f.stop_ns.saturating_sub(f.arrival_ns));
        let validation = Duration::from_nanos(queued.saturating_sub(f.arrival_ns));
        let queue = Duration::from_nanos(scheduled.saturating_sub(queued));
        let inference = Duration::from_nanos(f.stop_ns.saturating_sub(scheduled));
        Some([total, validation, queue, inference, inference / generated])
    }

    /// Emits the axum layer's SERVER span and the handler's span, as `tracing-opentelemetry`
    /// exports them. With a `traceparent` the handler is re-parented on it
    /// (`span.set_parent(context)`), a sibling of the SERVER span; without one it is the
    /// SERVER span's child. Timings are recorded only when the request succeeded. Returns the
    /// handler span's (trace id, span id) in hex.
    pub fn emit(tracer: &SdkTracer, parent: &Context, f: &SpanFacts) -> (String, String) {
        let route = f.path.split('?').next().unwrap_or("").to_string();
        let mut server_attrs = vec![
            KeyValue::new("http.method", "POST"),
            KeyValue::new("http.route", route.clone()),
            KeyValue::new("http.target", f.path.clone()),
            KeyValue::new("http.flavor", "1.1"),
            KeyValue::new("http.scheme", "HTTP"),
            KeyValue::new("http.host", f.host.clone()),
            KeyValue::new("otel.kind", "server"),
        ];
        if let Some(peer) = f.peer {
            server_attrs.push(KeyValue::new("http.client_ip", peer.ip().to_string()));
        }
        let mut server = tracer
            .span_builder(format!("POST {route}"))
            .with_kind(SpanKind::Server)
            .with_start_time(ts(f.arrival_ns))
            .with_attributes(server_attrs)
            .start_with_context(tracer, parent);
        let handler_parent = if parent.has_active_span() {
            parent.clone()
        } else {
            Context::new().with_remote_span_context(server.span_context().clone())
        };
        let name = handler(&route, f.stream);
        let mut attrs = vec![
            KeyValue::new(
                "parameters",
                format!(
                    "GenerateParameters {{ best_of: None, temperature: {:?}, top_p: {:?}, max_new_tokens: Some({}), stop: [], details: true, decoder_input_details: false, seed: None }}",
                    (f.temperature != 0.0).then_some(f.temperature),
                    (f.top_p != 0.0).then_some(f.top_p),
                    f.max_tokens
                ),
            ),
            KeyValue::new("code.filepath", "router/src/server.rs"),
            KeyValue::new("code.namespace", "text_generation_router::server"),
            KeyValue::new("code.lineno", 1168i64),
            KeyValue::new("thread.id", 7i64),
            KeyValue::new("thread.name", "tokio-runtime-worker"),
        ];
        let succeeded = f.finish_reason != "abort";
        if succeeded && let Some([total, validation, queue, inference, per_token]) = timings(f) {
            attrs.extend([
                KeyValue::new("total_time", format!("{total:?}")),
                KeyValue::new("validation_time", format!("{validation:?}")),
                KeyValue::new("queue_time", format!("{queue:?}")),
                KeyValue::new("inference_time", format!("{inference:?}")),
                KeyValue::new("time_per_token", format!("{per_token:?}")),
                KeyValue::new("seed", "None"),
            ]);
        }
        attrs.push(KeyValue::new(
            "busy_ns",
            (f.execute_ns.min(i64::MAX as u64)) as i64,
        ));
        attrs.push(KeyValue::new(
            "idle_ns",
            f.stop_ns.saturating_sub(f.arrival_ns + f.execute_ns) as i64,
        ));
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(ts(f.arrival_ns + 20_000))
            .with_attributes(attrs)
            .start_with_context(tracer, &handler_parent);
        let sc = span.span_context().clone();
        span.end_with_timestamp(ts(f.stop_ns));
        let status: i64 = if succeeded { 200 } else { 499 };
        server.set_attribute(KeyValue::new("http.status_code", status));
        server.end_with_timestamp(ts(f.stop_ns));
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }

    /// The headers `generate_internal` adds to a non-streaming response (the timings in ms).
    pub fn response_headers(f: &SpanFacts, prompt_tokens: u64) -> String {
        let Some([total, validation, queue, inference, per_token]) = timings(f) else {
            return String::new();
        };
        format!(
            "x-compute-type: gpu+optimized\r\nx-compute-time: {}\r\nx-total-time: {}\r\nx-validation-time: {}\r\nx-queue-time: {}\r\nx-inference-time: {}\r\nx-time-per-token: {}\r\nx-prompt-tokens: {prompt_tokens}\r\nx-generated-tokens: {}\r\n",
            total.as_secs_f64(),
            total.as_millis(),
            validation.as_millis(),
            queue.as_millis(),
            inference.as_millis(),
            per_token.as_millis(),
            f.completion_tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglang_rids_are_uuid4_hex() {
        let a = sglang::rid(1, 1);
        let b = sglang::rid(1, 2);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(&a[12..13], "4", "version nibble (xxxxxxxx-xxxx-4xxx)");
        assert_ne!(a, b);
    }

    #[test]
    fn sglang_trace_ids_are_64_bit() {
        let g = Sglang64BitIds;
        for _ in 0..100 {
            let id = g.new_trace_id().to_bytes();
            assert_eq!(&id[..8], &[0; 8]);
            assert_ne!(&id[8..], &[0; 8]);
        }
    }

    #[test]
    fn tgi_time_per_token_is_the_truncating_division() {
        let f = SpanFacts {
            arrival_ns: 1_000_000_000,
            scheduled_ns: 1_010_000_000,
            stop_ns: 2_201_263_700,
            completion_tokens: 20,
            ..SpanFacts::default()
        };
        let [_, validation, queue, inference, per_token] =
            tgi::timings(&f).expect("a finished request has timings");
        assert_eq!(format!("{validation:?}"), "150µs");
        assert_eq!(format!("{queue:?}"), "9.85ms");
        assert_eq!(format!("{inference:?}"), "1.1912637s");
        assert_eq!(format!("{per_token:?}"), "59.563185ms");
        assert_eq!(
            tgi::handler("/v1/chat/completions", true),
            "chat_completions"
        );
        assert_eq!(tgi::handler("/generate_stream", true), "generate_stream");
    }
}
