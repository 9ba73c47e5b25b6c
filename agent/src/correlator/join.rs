//! The join of contract §2: which rule tied a runtime span to a request read on a connection, and
//! what the connection showed.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::config::CorrelatorConfig;
use super::index::KeySet;
use super::tables::{Conn, ConnKey, FastMap, Head, HeadKey, PeerClose, SpanKey, Tables};
use crate::model::{ConnId, RequestHead, RuntimeKind, RuntimeRequest, TraceParent, UnixNanos};

/// The rule that joined a runtime span to a request head, in order of preference
/// (`inferwatch.join`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRule {
    /// The trace id of the `traceparent` header = the span's trace id.
    Traceparent,
    /// The `x-request-id` header = the runtime's request id (exactly or after a known prefix).
    RequestId,
    /// The response's own id (the first SSE chunk's or the JSON body's `"id"`, or an
    /// `x-request-id` response header, read by the kernel from the server's first response
    /// bytes) = the span's `gen_ai.request.id` / `gen_ai.response.id`.
    ResponseId,
    /// The span's `client.address` / `client.port` = the connection's peer.
    ClientAddr,
    /// The head read on the span's instance closest in time to the span's arrival, within
    /// the temporal window: a guess, and said so.
    Temporal,
    /// No exact rule matched and several heads fit the span by time as well as each other: no
    /// join is made (and no finding), rather than a guess.
    Ambiguous,
    /// Nothing matched (TLS inside the runtime, HTTP/2, an unwatched port, or a head lost to
    /// an eviction).
    Unjoined,
}

impl JoinRule {
    /// The value of `inferwatch.join`.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRule::Traceparent => "traceparent",
            JoinRule::RequestId => "request_id",
            JoinRule::ResponseId => "response_id",
            JoinRule::ClientAddr => "client_addr",
            JoinRule::Temporal => "temporal",
            JoinRule::Ambiguous => "ambiguous",
            JoinRule::Unjoined => "unjoined",
        }
    }
}

/// What the kernel saw of one request on its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionFacts {
    /// The connection.
    pub conn: ConnId,
    /// The server's address, when the accept was seen.
    pub local: Option<SocketAddr>,
    /// The client's address, when the accept was seen.
    pub peer: Option<SocketAddr>,
    /// The server process (from the accept or the read).
    pub pid: Option<u32>,
    /// When the request head was read.
    pub head_ts: UnixNanos,
    /// The request head as the kernel read it (method, path, the allow-listed headers, the
    /// body's model); flattened, so that its fields read as the connection's.
    #[serde(flatten)]
    pub head: RequestHead,
    /// The first peer close while this request was the connection's current one.
    pub peer_closed: Option<PeerClose>,
    /// Writes after the peer left that look like token chunks.
    pub token_writes_after_close: u64,
}

/// A runtime span as it leaves the correlator: the request, the join rule, and what the
/// kernel saw of it. Emitted once per span received, when the span settles, so the exporter
/// can add `inferwatch.join` to the forwarded span.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinedRequest {
    /// The runtime's request, as received. Boxed: it is moved from the pending table to the
    /// exporter, and 392 bytes moved at every step (B-tree node shifts, output vectors) showed
    /// up as `memmove` in the profile.
    pub request: Box<RuntimeRequest>,
    /// The rule that joined it.
    pub join: JoinRule,
    /// The connection side; `None` when unjoined.
    pub connection: Option<ConnectionFacts>,
    /// `true` when the span settled early because the pending-span table was full.
    pub settled_early: bool,
    /// Through a watched gateway that did not propagate the client's trace (LiteLLM's proxy):
    /// the `traceparent` the client sent the gateway, when the runtime span is a root of
    /// another trace. The exporter moves the span into the client's trace under it (SPEC 2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_trace: Option<TraceParent>,
}

/// The header values a runtime request id can come from: itself and itself without each known
/// prefix (the keys of the request-id index).
pub(crate) fn request_id_keys<'a>(runtime_id: &'a str, prefixes: &'a [String]) -> Vec<&'a str> {
    let mut keys = vec![runtime_id];
    for p in prefixes {
        if let Some(rest) = runtime_id.strip_prefix(p.as_str())
            && !rest.is_empty()
            && !keys.contains(&rest)
        {
            keys.push(rest);
        }
    }
    keys
}

/// The join search (contract §2): the best head for a span by the exact rules, and by the
/// temporal rule. Spans claim heads in their key order during a tick ([`Claims`]).
impl Tables {
    /// The best head for `span` by the exact rules, in order of preference; among several
    /// candidates of one rule, the one read closest to the span's arrival.
    pub(super) fn best_exact(
        &self,
        span: &RuntimeRequest,
        reserved: &FastMap<HeadKey, SpanKey>,
        cfg: &CorrelatorConfig,
    ) -> Option<(JoinRule, HeadKey)> {
        let usable = |hk: &HeadKey| !reserved.contains_key(hk) && hk.0 <= span.end;
        // All 16 bytes: SGLang's own traces have 64-bit ids (upper half zero), which must never
        // match a 128-bit traceparent that only shares the low half.
        if let Some(set) = self.by_trace.get(&span.trace_id)
            && let Some(hk) = closest(span.arrival, set.iter().filter(usable))
        {
            return Some((JoinRule::Traceparent, hk));
        }
        if let Some(id) = &span.request_id {
            let candidates = request_id_keys(id, &cfg.request_id_prefixes)
                .into_iter()
                .filter_map(|k| self.by_request_id.get(k))
                .flat_map(KeySet::iter)
                .filter(usable);
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::RequestId, hk));
            }
            let candidates = request_id_keys(id, &cfg.request_id_prefixes)
                .into_iter()
                .filter_map(|k| self.by_response_id.get(k))
                .flat_map(KeySet::iter)
                .filter(usable);
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::ResponseId, hk));
            }
        }
        if let Some(client) = span.client
            && let Some(conns) = self.by_peer.get(&client)
        {
            let candidates = conns
                .iter()
                .filter_map(|ck| self.conns.get(&ck).map(|c| (ck, c)))
                .flat_map(|(ck, c)| {
                    c.requests
                        .iter()
                        .filter(|(_, h)| h.is_some())
                        .map(move |(ts, _)| (*ts, ck))
                })
                .filter(usable)
                .filter(|hk| {
                    self.head_ref(*hk).is_some_and(|(_, head)| {
                        !contradicts(span, &head.head, cfg) && !other_response(span, head, cfg)
                    })
                });
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::ClientAddr, hk));
            }
        }
        None
    }

    /// The unreserved head on the span's instance read closest to its arrival, within the
    /// temporal window, when it fits clearly better than any other: closer to the arrival than
    /// every other candidate by `temporal_margin_ms`. Candidates whose connection shows the
    /// span cannot be theirs are left out first ([`cannot_own`]).
    pub(super) fn best_temporal(
        &self,
        span: &RuntimeRequest,
        reserved: &FastMap<HeadKey, SpanKey>,
        cfg: &CorrelatorConfig,
    ) -> Option<Guess> {
        let window = cfg.temporal_window();
        let lo = (span.arrival.saturating_sub(window), ConnKey::MIN);
        let hi = (span.arrival.saturating_add(window), ConnKey::MAX);
        let instance_ports: Option<Vec<u16>> = span.instance.pid.and_then(|pid| {
            let ports: Vec<u16> = self
                .listeners
                .iter()
                .filter(|(_, p)| **p == Some(pid))
                .map(|(port, _)| *port)
                .collect();
            (!ports.is_empty()).then_some(ports)
        });
        let candidates = self
            .heads
            .range(lo..=hi)
            .copied()
            .filter(|hk| !reserved.contains_key(hk) && hk.0 <= span.end)
            .filter(|hk| {
                self.head_ref(*hk).is_some_and(|(conn, head)| {
                    !contradicts(span, &head.head, cfg)
                        && !other_response(span, head, cfg)
                        && !cannot_own(span, conn, hk.0)
                })
            })
            .filter(|hk| match (&instance_ports, self.conns.get(&hk.1)) {
                (None, _) => true,
                (Some(ports), Some(conn)) => {
                    conn.pid.is_some() && conn.pid == span.instance.pid
                        || conn.local.is_some_and(|l| ports.contains(&l.port()))
                }
                (Some(_), None) => false,
            });
        let mut by_distance: Vec<(UnixNanos, HeadKey)> = candidates
            .map(|hk| (hk.0.abs_diff(span.arrival), hk))
            .collect();
        by_distance.sort_unstable();
        match by_distance.as_slice() {
            [] => None,
            [(_, only)] => Some(Guess::One(*only)),
            [(best, head), (second, _), ..] => {
                if *second >= best.saturating_add(cfg.temporal_margin()) {
                    Some(Guess::One(*head))
                } else {
                    Some(Guess::Ambiguous)
                }
            }
        }
    }
}

/// Whether what the kernel saw of the request read at `head_ts` on `conn` rules `span`
/// out, whatever the time says: the connection carried more token chunks after its peer
/// left than the span has output tokens, or the server stopped writing when the peer left
/// and closed the connection while the span went on decoding to its limit (or, with
/// per-token times, past that close).
fn cannot_own(span: &RuntimeRequest, conn: &Conn, head_ts: UnixNanos) -> bool {
    let facts = conn.abort_facts(head_ts);
    let Some((t_c, _)) = facts.close else {
        return false;
    };
    if t_c >= span.end {
        return false;
    }
    let more_writes_than_tokens = !facts.not_started
        && span
            .output_tokens
            .is_some_and(|n| facts.token_writes > n.saturating_add(NON_TOKEN_CHUNKS_MAX));
    let stopped_at_close = facts.last_write.is_none()
        && facts.server_closed.is_some_and(|closed| {
            closed < span.end
                && (span.finish_reason.as_deref() == Some("length")
                    || span.token_times.iter().any(|t| *t > closed))
        });
    more_writes_than_tokens || stopped_at_close
}

/// Whether a head's identifiers rule out `span`, so that a guess never goes against
/// evidence: the span continues a propagated trace (it has a parent) that is not the
/// head's `traceparent`, or vLLM (which derives its id from `x-request-id`) reports an id
/// the header does not give.
fn contradicts(span: &RuntimeRequest, head: &RequestHead, cfg: &CorrelatorConfig) -> bool {
    let other_trace = span.parent_span_id.is_some()
        && head
            .traceparent
            .is_some_and(|tp| tp.trace_id != span.trace_id);
    let other_id = span.runtime == RuntimeKind::Vllm
        && match (&span.request_id, &head.request_id) {
            (Some(id), Some(header)) => {
                !request_id_keys(id, &cfg.request_id_prefixes).contains(&header.as_str())
            }
            _ => false,
        };
    other_trace || other_id
}

/// Whether the ids the server sent back on a request rule `span` out: the runtime's own
/// id came back on the connection and it is not the span's.
fn other_response(span: &RuntimeRequest, head: &Head, cfg: &CorrelatorConfig) -> bool {
    match &span.request_id {
        Some(id) if !head.response_ids.is_empty() => {
            let keys = request_id_keys(id, &cfg.request_id_prefixes);
            !head.response_ids.iter().any(|r| keys.contains(&r.as_str()))
        }
        _ => false,
    }
}

/// Chunks of an OpenAI-compatible stream that carry no token: the first (the role), the last
/// (the finish reason) and the usage chunk.
const NON_TOKEN_CHUNKS_MAX: u64 = 3;

/// What the temporal rule made of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Guess {
    /// One head fits clearly best.
    One(HeadKey),
    /// Several heads fit as well as each other: no join, no finding.
    Ambiguous,
}

/// The heads claimed during one tick, by the span that claims them.
#[derive(Debug)]
pub(super) struct Claims {
    pub(super) heads: FastMap<HeadKey, SpanKey>,
    /// The last key a span due at this tick can have.
    pub(super) due_end: SpanKey,
    /// Whether every waiting span's exact claim is in `heads`, not only the due spans'.
    pub(super) complete: bool,
}

impl Claims {
    pub(super) fn at(now: UnixNanos) -> Self {
        Self {
            heads: FastMap::default(),
            due_end: (now, [u8::MAX; 16], [u8::MAX; 8]),
            complete: false,
        }
    }
}

/// The head read closest to `arrival`; ties go to the earlier head, then the lower connection,
/// so the choice never depends on iteration order.
fn closest(arrival: UnixNanos, candidates: impl Iterator<Item = HeadKey>) -> Option<HeadKey> {
    candidates.min_by_key(|hk| (hk.0.abs_diff(arrival), *hk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_keys_are_the_id_and_the_id_without_a_known_prefix() {
        let prefixes = vec!["chatcmpl-".to_string(), "cmpl-".to_string()];
        assert_eq!(request_id_keys("abc", &prefixes), vec!["abc"]);
        assert_eq!(
            request_id_keys("cmpl-abc", &prefixes),
            vec!["cmpl-abc", "abc"]
        );
        assert_eq!(
            request_id_keys("chatcmpl-abc", &prefixes),
            vec!["chatcmpl-abc", "abc"]
        );
        assert_eq!(request_id_keys("xcmpl-abc", &prefixes), vec!["xcmpl-abc"]);
        assert_eq!(request_id_keys("cmpl-", &prefixes), vec!["cmpl-"]);
    }
}
