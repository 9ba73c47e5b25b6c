//! vLLM's per-request span.
//!
//! vLLM (`vllm/tracing.py`, class `SpanAttributes`; the span is made in
//! `vllm/v1/engine/output_processor.py`, `do_tracing`) exports one span per request, named
//! `llm_request`, kind SERVER, started at the request's arrival time, in the trace of the
//! incoming `traceparent` when there is one. Its attributes:
//!
//! | key | type | unit |
//! |---|---|---|
//! | `gen_ai.request.id` | string | vLLM's request id (derived from `x-request-id`) |
//! | `gen_ai.response.model` | string | |
//! | `gen_ai.usage.prompt_tokens`, `gen_ai.usage.completion_tokens` | int | tokens |
//! | `gen_ai.latency.time_in_queue` | double | seconds (scheduled - queued) |
//! | `gen_ai.latency.time_to_first_token` | double | seconds from arrival |
//! | `gen_ai.latency.e2e` | double | seconds from arrival |
//! | `gen_ai.latency.time_in_model_prefill` / `_decode` / `_inference` | double | seconds |
//! | `gen_ai.response.finish_reasons` | string[] | when set |
//!
//! The arrival is the span's start; first token = arrival + TTFT; end = the span's end.

use super::{Fields, secs_to_ns};
use crate::model::RuntimeRequest;

/// The span name.
pub const SPAN_NAME: &str = "llm_request";

pub(super) fn fill(request: &mut RuntimeRequest, fields: &Fields<'_>) {
    request.queue_ns = fields.time_in_queue_s.and_then(secs_to_ns);
    request.first_token = fields
        .time_to_first_token_s
        .and_then(secs_to_ns)
        .map(|ttft| request.arrival.saturating_add(ttft));
    // When the SDK dropped the end time, e2e still tells when the request finished.
    if request.end <= request.arrival
        && let Some(e2e) = fields.e2e_s.and_then(secs_to_ns)
    {
        request.end = request.arrival.saturating_add(e2e);
    }
}
