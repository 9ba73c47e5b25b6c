//! SGLang's request span tree (`--enable-trace --otlp-traces-endpoint`,
//! `python/sglang/srt/tracing/trace.py`).
//!
//! SGLang opens one root span per request named `Req <rid>` (the request id, sometimes
//! shortened) and hangs its stages (tokenize, dispatch, schedule, prefill, decode) below it as
//! child spans. The root span covers the request from arrival to the end, so it gives the
//! arrival, end and request id; token counts are read when SGLang (or a wrapper) records them
//! (`prompt_tokens`, `completion_tokens`, `cached_tokens`, or the GenAI keys). Queue and
//! first-token times live on the child spans, which this per-span adapter does not join: the
//! children pass through untouched and the correlator can refine them.

use super::{Fields, secs_to_ns};
use crate::model::RuntimeRequest;
use crate::sources::otlp::wire::SpanView;

/// The root span's name prefix.
pub const SPAN_PREFIX: &str = "Req ";

pub(super) fn fill(request: &mut RuntimeRequest, span: &SpanView<'_>, fields: &Fields<'_>) {
    if request.request_id.is_none() {
        let rid = span.name[SPAN_PREFIX.len()..].trim();
        if !rid.is_empty() {
            request.request_id = Some(rid.to_owned());
        }
    }
    request.queue_ns = fields.time_in_queue_s.and_then(secs_to_ns);
    request.first_token = fields
        .time_to_first_token_s
        .and_then(secs_to_ns)
        .map(|ttft| request.arrival.saturating_add(ttft));
}
