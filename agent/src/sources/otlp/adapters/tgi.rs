//! Text Generation Inference (TGI) router spans, as read from TGI's `router/src/server.rs` and
//! `router/src/logging.rs` (TGI 3.3.6-dev0, January 2026).
//!
//! TGI exports `tracing` spans through `tracing-opentelemetry` (`--otlp-endpoint`, gRPC,
//! resource `service.name = text-generation-inference.router` unless `--otlp-service-name`
//! sets it; no pid). Its handlers `generate`, `generate_stream`, `chat_completions` and
//! `completions` are `#[instrument]`ed: the span is named after the function, kind INTERNAL,
//! parented on the request's `traceparent` (TGI's own middleware parses it), else on the axum
//! layer's SERVER span. The handler records, **on success only**, `format!("{:?}")` strings:
//! `total_time`, `validation_time`, `queue_time`, `inference_time`, `time_per_token` (Rust
//! `Duration` debug strings: `1.234567ms`, `2.1s`, `350µs`, `900ns`) and `seed`; `parameters`
//! (the request's parameters, a debug string) is set at the start. There is no request id, no
//! token count, no finish reason and no time to first token; chat and completion ids in its
//! responses are empty strings. Non-streaming responses carry `x-prompt-tokens`,
//! `x-generated-tokens` and `x-queue-time` (ms) headers, which the kernel program does not
//! read (it keeps only the response's id).
//!
//! What the adapter derives: the queue time; and the output token count, because TGI computes
//! `time_per_token = inference_time / generated_tokens` (a `Duration` divided by a `u32`,
//! truncated to whole nanoseconds) and prints both durations exactly, so
//! `generated_tokens = inference_time / time_per_token` whenever `time_per_token` exceeds the
//! count (always, for token times above a microsecond): see [`generated_tokens`].

use super::Fields;
use crate::model::RuntimeRequest;

/// Span names of TGI's request handlers.
pub const SPAN_NAMES: &[&str] = &[
    "generate_stream",
    "generate",
    "chat_completions",
    "completions",
];

/// The `code.namespace` that `tracing-opentelemetry` sets on spans made in TGI's router crate.
pub const CODE_NAMESPACE_PREFIX: &str = "text_generation_router";

/// True when a span named like a TGI handler carries evidence that TGI made it: one of the
/// handler's own fields, or the router crate's `code.namespace`. A failed or aborted request
/// keeps `parameters` and `code.namespace` but has no timings.
pub(super) fn is_handler(fields: &Fields<'_>) -> bool {
    fields.tgi_queue_time.is_some()
        || fields.tgi_inference_time.is_some()
        || fields.tgi_parameters
        || fields
            .code_namespace
            .is_some_and(|n| n.starts_with(CODE_NAMESPACE_PREFIX))
}

pub(super) fn fill(request: &mut RuntimeRequest, fields: &Fields<'_>) {
    request.queue_ns = fields.tgi_queue_time.and_then(parse_debug_duration);
    if request.output_tokens.is_none() {
        request.output_tokens = generated_tokens(
            fields.tgi_inference_time.and_then(parse_debug_duration),
            fields.tgi_time_per_token.and_then(parse_debug_duration),
        );
    }
}

/// The generated token count from TGI's `inference_time` and `time_per_token` (nanoseconds).
/// `time_per_token = floor(inference / n)`, so `inference = n * tpt + r` with `r < n`, and
/// `floor(inference / tpt) = n` when `tpt > n`. `None` when the figures cannot come from
/// that division (zero or inconsistent).
pub fn generated_tokens(inference_ns: Option<u64>, time_per_token_ns: Option<u64>) -> Option<u64> {
    let (inference, tpt) = (inference_ns?, time_per_token_ns?);
    if tpt == 0 {
        return None;
    }
    let n = inference / tpt;
    // Exactness condition of the division above, and the remainder it implies.
    (n >= 1 && tpt > n && inference - n * tpt < n).then_some(n)
}

/// Parses a `std::time::Duration` debug string (`1.5ms`, `2s`, `10µs`, `7ns`) into
/// nanoseconds, exactly (no floating point: TGI's debug strings carry every digit).
pub fn parse_debug_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let scale_digits: u32 = match unit {
        "ns" => 0,
        "µs" | "us" => 3,
        "ms" => 6,
        "s" => 9,
        _ => return None,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || frac.contains('.') {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let scale = 10u64.pow(scale_digits);
    let mut ns = whole.checked_mul(scale)?;
    // Fraction digits beyond nanoseconds are dropped (Duration never prints them).
    let mut unit_value = scale;
    for d in frac.chars() {
        unit_value /= 10;
        if unit_value == 0 {
            break;
        }
        ns = ns.checked_add(u64::from(d.to_digit(10)?) * unit_value)?;
    }
    Some(ns)
}
