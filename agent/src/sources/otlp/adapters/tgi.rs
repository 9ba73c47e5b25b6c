//! Text Generation Inference (TGI) router spans.
//!
//! TGI's router (`router/src/server.rs`) instruments its handlers `generate` and
//! `generate_stream` (and `chat_completions` / `completions`, which call them) with
//! `tracing` spans exported over OTLP (`--otlp-endpoint`). When a request finishes it records,
//! as strings made with `format!("{:?}", duration)`: `total_time`, `validation_time`,
//! `queue_time`, `inference_time`, `time_per_token`, and in recent versions `prompt_tokens` and
//! `generated_tokens` (`format!("{:?}", n)`). The durations are Rust `Duration` debug strings
//! such as `1.234567ms`, `12.5s`, `350µs`, `900ns`, parsed by [`parse_debug_duration`].

use super::Fields;
use crate::model::RuntimeRequest;

/// Span names of TGI's request handlers.
pub const SPAN_NAMES: &[&str] = &[
    "generate_stream",
    "generate",
    "chat_completions",
    "completions",
];

pub(super) fn fill(request: &mut RuntimeRequest, fields: &Fields<'_>) {
    request.queue_ns = fields.tgi_queue_time.and_then(parse_debug_duration);
}

/// Parses a `std::time::Duration` debug string (`1.5ms`, `2s`, `10µs`, `7ns`) into
/// nanoseconds.
pub fn parse_debug_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "ns" => 1.0,
        "µs" | "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    };
    let ns = value * scale;
    (ns.is_finite() && ns >= 0.0).then(|| ns.round() as u64)
}
