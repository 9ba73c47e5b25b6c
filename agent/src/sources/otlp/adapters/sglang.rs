//! SGLang's request span tree (`--enable-trace --otlp-traces-endpoint`), as read from SGLang's
//! `python/sglang/srt/observability/trace.py` (`TraceReqContext`) and the tokenizer manager's
//! `make_span_attrs` (the attributes set when a request finishes), SGLang main of 2026.
//!
//! - **The root.** `trace_req_start` opens one root span per request named
//!   `f"{role} Req {rid[:8]}"`: `role` is empty in the normal (unified) mode, so the name
//!   starts with a space (`" Req 1a2b3c4d"`); `prefill` / `decode` when prefill and decode run
//!   on separate instances. It starts with the attributes `rid` (the rid without a
//!   multi-tokenizer worker prefix) and `module` (`sglang::<module>`), is parented on the
//!   request's `traceparent` when one arrived, and its kind is INTERNAL.
//! - **At finish** (`trace_req_finish`) the root gets `gen_ai.request.id` (the full rid: a
//!   uuid4 hex by default; SGLang ignores `X-Request-Id`, and the same rid is the `id` of the
//!   SSE chunks and of the JSON body), `gen_ai.usage.prompt_tokens`,
//!   `gen_ai.usage.completion_tokens`, `gen_ai.usage.cached_tokens`, `gen_ai.response.model`,
//!   `gen_ai.response.finish_reasons` as a JSON *string* (`'["stop"]'`, `'["abort"]'`), the
//!   sampling parameters when set, and the latencies (seconds):
//!   `gen_ai.latency.time_to_first_token`, `gen_ai.latency.time_in_model_prefill` and, in newer
//!   versions, `gen_ai.latency.e2e` / `time_in_model_decode` / `time_in_model_inference`.
//!   No queue time: the queue is the `prefill_waiting` stage span, below the scheduler's
//!   thread span (`"Scheduler [TP 0] (host:<8> | pid:<tid>)"`), in the same trace, exported by
//!   the scheduler process.
//! - **Ids.** SGLang installs its own id generator: trace ids and span ids are
//!   `getrandbits(64)`, so a trace SGLang starts has its upper 8 bytes zero. With a
//!   `traceparent` the root continues the client's 128-bit trace.
//! - **Resource.** `service.name` only (`sglang` by default); no pid. The thread spans carry
//!   `pid` (a thread id), `host_id` and `thread_label`.
//! - **Aborts.** A request aborted while running finishes with `'["abort"]'` and its counts; one
//!   aborted while queued finishes with no counts. SGLang aborts a disconnected request 2 s after
//!   it sees the disconnect by design, and some versions never end the root of a request whose
//!   client disconnected (no span at all, as vLLM).

use std::collections::{HashMap, VecDeque};

use super::{Fields, secs_to_ns};
use crate::model::RuntimeRequest;
use crate::otlp_wire::read::SpanView;

/// The word between the role and the rid in the root span's name.
const REQ_WORD: &str = "Req ";

/// The stage span whose duration is the request's time in the waiting queue.
pub const QUEUE_STAGE: &str = "prefill_waiting";

/// How many queue times from `prefill_waiting` spans are remembered while their root has not
/// arrived: the scheduler exports them before the tokenizer exports the root (the root ends
/// last), typically within SGLang's 500 ms batch delay.
pub const QUEUE_TIMES_CAPACITY: usize = 4096;

/// The role of a span named like SGLang's request root (`""`, `"prefill"`, `"decode"`), or
/// `None`. The role is one word without spaces; the rid part is SGLang's first 8 characters of
/// the rid (an older form without the role, `"Req <rid>"`, is read too).
pub fn root_role(name: &str) -> Option<&str> {
    let (role, rid) = if let Some(rid) = name.strip_prefix(REQ_WORD) {
        ("", rid)
    } else {
        let (role, rest) = name.split_once(' ')?;
        (role, rest.strip_prefix(REQ_WORD)?)
    };
    let rid_ok = !rid.is_empty() && !rid.contains(' ');
    let role_ok = role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (rid_ok && role_ok).then_some(role)
}

/// True when the span's attributes show SGLang's root: its `rid` or `module = sglang::...`
/// attribute, set when the root opens (so also on a root that ended before finishing).
pub(super) fn is_root(fields: &Fields<'_>) -> bool {
    fields.sglang_rid.is_some() || fields.module.is_some_and(|m| m.starts_with("sglang::"))
}

pub(super) fn fill(
    request: &mut RuntimeRequest,
    span: &SpanView<'_>,
    fields: &Fields<'_>,
    queue_ns: Option<u64>,
) {
    if request.request_id.is_none() {
        // The root carries the full rid only at finish; before that, `rid` (same value
        // without a worker prefix), else the 8 characters in the name.
        request.request_id = fields.sglang_rid.map(str::to_owned).or_else(|| {
            span.name
                .rsplit_once(' ')
                .map(|(_, rid)| rid.to_owned())
                .filter(|r| !r.is_empty())
        });
    }
    request.queue_ns = fields.time_in_queue_s.and_then(secs_to_ns).or(queue_ns);
    request.first_token = fields
        .time_to_first_token_s
        .and_then(secs_to_ns)
        .map(|ttft| request.arrival.saturating_add(ttft));
    if request.end <= request.arrival
        && let Some(e2e) = fields.e2e_s.and_then(secs_to_ns)
    {
        request.end = request.arrival.saturating_add(e2e);
    }
}

/// Queue times read from `prefill_waiting` stage spans, by trace id, until the request's root
/// arrives. Bounded: the oldest is forgotten first.
#[derive(Debug, Default)]
pub struct QueueTimes {
    by_trace: HashMap<[u8; 16], u64>,
    order: VecDeque<[u8; 16]>,
    /// Queue times forgotten before their root arrived (the table was full).
    pub evicted: u64,
}

impl QueueTimes {
    /// Remembers the queue time of `span` when it is a `prefill_waiting` stage; returns whether
    /// it was one. The first stage of a trace wins (a retried prefill does not add queue time).
    pub fn observe(&mut self, span: &SpanView<'_>) -> bool {
        if span.name != QUEUE_STAGE {
            return false;
        }
        let Ok(trace_id) = <[u8; 16]>::try_from(span.trace_id) else {
            return true;
        };
        let queued = span
            .end_time_unix_nano
            .saturating_sub(span.start_time_unix_nano);
        if self.by_trace.contains_key(&trace_id) {
            return true;
        }
        if self.by_trace.len() >= QUEUE_TIMES_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_trace.remove(&oldest);
            self.evicted += 1;
        }
        self.by_trace.insert(trace_id, queued);
        self.order.push_back(trace_id);
        true
    }

    /// The queue time seen for `trace_id`, forgotten once taken.
    pub fn take(&mut self, trace_id: &[u8; 16]) -> Option<u64> {
        let queued = self.by_trace.remove(trace_id)?;
        if let Some(at) = self.order.iter().position(|t| t == trace_id) {
            self.order.remove(at);
        }
        Some(queued)
    }

    /// How many queue times wait for their root.
    pub fn len(&self) -> usize {
        self.by_trace.len()
    }

    /// True when none waits.
    pub fn is_empty(&self) -> bool {
        self.by_trace.is_empty()
    }
}
