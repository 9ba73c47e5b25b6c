//! Spans that follow the OTel GenAI semantic conventions
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/>): `gen_ai.request.model`,
//! `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//! `gen_ai.usage.cache_read.input_tokens`, `gen_ai.conversation.id`,
//! `gen_ai.response.finish_reasons`. The common fields are read by the caller; this adapter
//! only adds what the conventions express differently (time to first token, when a runtime
//! records vLLM's latency key too).

use super::{Fields, secs_to_ns};
use crate::model::RuntimeRequest;

pub(super) fn fill(request: &mut RuntimeRequest, fields: &Fields<'_>) {
    request.queue_ns = fields.time_in_queue_s.and_then(secs_to_ns);
    request.first_token = fields
        .time_to_first_token_s
        .and_then(secs_to_ns)
        .map(|ttft| request.arrival.saturating_add(ttft));
}
