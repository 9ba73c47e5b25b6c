//! What the KV-eviction detection reports: its finding, its counters and the size of its
//! tables.

use serde::{Deserialize, Serialize};

use crate::model::UnixNanos;

/// Where the attribution of a KV eviction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEvidence {
    /// Per-tenant KV demand computed from the runtime's request spans.
    Spans,
    /// Blocks stored and removed, from the runtime's KV events.
    KvEvents,
}

impl KvEvidence {
    /// The attribute value (`inferwatch.kv_eviction.method`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvEvidence::Spans => "spans",
            KvEvidence::KvEvents => "kv_events",
        }
    }
}

/// How the victim's miss itself was established (`inferwatch.kv.evidence`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissEvidence {
    /// The span's cached-token count.
    #[default]
    Span,
    /// The conversation's own block hashes, stored again by the later turn after their removal.
    KvEvents,
    /// The later turn's prefill time against the instance's recent prefill rate.
    PrefillTime,
}

impl MissEvidence {
    /// The attribute value (`inferwatch.kv.evidence`).
    pub fn as_str(self) -> &'static str {
        match self {
            MissEvidence::Span => "span",
            MissEvidence::KvEvents => "kv_events",
            MissEvidence::PrefillTime => "prefill_time",
        }
    }
}

/// One tenant's share of the KV demand in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantShare {
    /// The tenant (hashed when configured), or `self` for the victim's own tenant.
    pub tenant: String,
    /// Its share of the demand, 0..=1, rounded to 4 decimals.
    pub share: f64,
}

/// A link to one of the neighbour's request spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanLink {
    /// The request span's trace id.
    pub trace_id: [u8; 16],
    /// The request span's id.
    pub span_id: [u8; 8],
}

/// A conversation whose warm prefix was evicted between two turns (`inferwatch.kv_eviction`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEvictionFinding {
    /// The victim request span's trace id: the finding span goes into this trace.
    pub trace_id: [u8; 16],
    /// The victim request span's id: the finding span's parent.
    pub parent_span_id: [u8; 8],
    /// The victim's tenant (hashed when configured).
    pub victim_tenant: Option<String>,
    /// The victim's conversation id.
    pub victim_conversation: String,
    /// The victim request's runtime id.
    pub victim_request_id: Option<String>,
    /// The runtime instance (see [`instance_key`](super::instance_key)).
    pub instance: String,
    /// The model.
    pub model: Option<String>,
    /// Expected cached tokens `E`.
    pub expected_cached_tokens: u64,
    /// Reported cached tokens `C`.
    pub cached_tokens: u64,
    /// Start of the window: the end of turn n.
    pub window_start: UnixNanos,
    /// End of the window: the arrival of turn n+1.
    pub window_end: UnixNanos,
    /// The tenant with the largest KV demand in the window (`self` when it is the victim's
    /// own tenant), or `None` when nothing else ran (`inferwatch.noisy_neighbour.tenant`).
    pub neighbour_tenant: Option<String>,
    /// The neighbour's share of the demand (`inferwatch.noisy_neighbour.share`).
    pub neighbour_share: f64,
    /// The three largest shares.
    pub top_tenants: Vec<TenantShare>,
    /// The neighbour's request spans in the window, largest demand first (span links).
    pub neighbour_links: Vec<SpanLink>,
    /// Turn n+1's time to first token, in nanoseconds.
    pub ttft_ns: Option<u64>,
    /// How much of it the eviction cost: the prefill of the `E - C` lost tokens at the
    /// instance's recent prefill rate, at most the TTFT.
    pub ttft_penalty_ns: Option<u64>,
    /// Where the attribution came from.
    pub method: KvEvidence,
    /// With KV events: the victim's blocks removed in the window.
    pub victim_blocks_removed: Option<u64>,
    /// How the miss was established.
    #[serde(default)]
    pub evidence: MissEvidence,
}

/// Counters of the KV-eviction detection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEvictionStats {
    /// Requests with a conversation key seen.
    pub conversation_turns: u64,
    /// Conversations dropped because the table was full.
    pub conversations_dropped: u64,
    /// Conversations forgotten after `conversation_idle_ms`.
    pub conversations_expired: u64,
    /// Turns seen on another instance than the previous turn (no finding).
    pub conversations_moved: u64,
    /// Findings made.
    pub findings: u64,
    /// Findings attributed from KV events.
    pub findings_kv_events: u64,
    /// KV event batches received.
    pub kv_batches: u64,
    /// KV event batches missing, from gaps in the sequence numbers.
    pub kv_batches_missing: u64,
    /// KV event batches whose sequence number went backwards (publisher restart or replay).
    pub kv_sequence_resets: u64,
    /// Tenants beyond `max_tenants` (named `other`).
    pub tenants_overflowed: u64,
    /// Instances beyond `max_instances` (not tracked).
    pub instances_overflowed: u64,
    /// Findings whose miss was established from the conversation's block hashes.
    pub findings_evidence_kv_events: u64,
    /// Findings whose miss was inferred from the prefill time.
    pub findings_evidence_prefill_time: u64,
    /// Block hashes dropped from an instance's KV log by `max_kv_blocks_per_instance`.
    pub kv_blocks_dropped: u64,
    /// `BlockStored` events in a conversation turn's prefill window that another request's
    /// prefill also covered and that no hash chain tied to either: not used as evidence.
    pub kv_ambiguous_stores: u64,
    /// Turns without a cached-token count whose KV evidence was incomplete (no chain of the
    /// conversation's blocks kept, a re-stored block with no removal seen, or a sequence gap
    /// or cache clear in between): no finding.
    pub kv_turns_undecided: u64,
    /// Evictor batches' stores that several requests' prefills covered (split between them by
    /// uncached prompt tokens).
    pub kv_shared_evictor_stores: u64,
    /// Turns without a cached-token count or KV events whose prefill time fell between a hit
    /// and a miss, overlapped another prefill, or came before the rate was known: no finding.
    pub prefill_time_undecided: u64,
}

/// How full the KV-eviction tables are (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvictionSizes {
    /// Conversations tracked.
    pub conversations: usize,
    /// Requests in the instances' logs.
    pub logged_requests: usize,
    /// Block hashes in the instances' KV event logs.
    pub logged_kv_blocks: usize,
    /// Findings waiting for their attribution.
    pub pending_findings: usize,
}
