//! The correlator's own counters, exported by the pipeline as metrics.

use serde::{Deserialize, Serialize};

use super::join::JoinRule;
use super::kv_eviction::finding::KvEvictionStats;
use super::lost::LostInFlightStats;
use super::tables::EvictionCounts;
use crate::model::CloseHow;

/// Counters of everything the correlator decided; monotonic, read with
/// [`Correlator::stats`](super::Correlator::stats).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CorrelatorStats {
    /// Kernel events received.
    pub kernel_events: u64,
    /// Runtime spans received (duplicates included).
    pub spans: u64,
    /// Spans received a second time (same trace and span id while the first still waited);
    /// dropped.
    pub duplicate_spans: u64,
    /// Spans settled, by join rule (`unjoined` included).
    pub joins: JoinCounts,
    /// Request heads that settled without any span (runtime never exported one, or lost).
    pub unjoined_heads: u64,
    /// Request heads dropped because the kernel never saw them end within
    /// `max_request_age_ms`.
    pub expired_heads: u64,
    /// Entries dropped because a table was full, by table.
    pub evictions: EvictionCounts,
    /// Findings made, by kind.
    pub findings: FindingCounts,
    /// Conversation tracking and KV-eviction findings.
    pub kv_eviction: KvEvictionStats,
    /// Requests lost in flight, process exits and OOM victims.
    pub lost_in_flight: LostInFlightStats,
}

/// Settled spans by join rule (`inferwatch.join`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JoinCounts {
    /// Joined by `traceparent`.
    pub traceparent: u64,
    /// Joined by `x-request-id`.
    pub request_id: u64,
    /// Joined by the response's own id read from the server's first response bytes.
    pub response_id: u64,
    /// Joined by `client.address` / `client.port`.
    pub client_addr: u64,
    /// Joined by time on the same instance.
    pub temporal: u64,
    /// Not joined because several heads fit by time as well as each other.
    pub ambiguous: u64,
    /// Not joined.
    pub unjoined: u64,
}

impl JoinCounts {
    pub(crate) fn record(&mut self, rule: JoinRule) {
        let counter = match rule {
            JoinRule::Traceparent => &mut self.traceparent,
            JoinRule::RequestId => &mut self.request_id,
            JoinRule::ResponseId => &mut self.response_id,
            JoinRule::ClientAddr => &mut self.client_addr,
            JoinRule::Temporal => &mut self.temporal,
            JoinRule::Ambiguous => &mut self.ambiguous,
            JoinRule::Unjoined => &mut self.unjoined,
        };
        *counter += 1;
    }
}

/// Findings by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FindingCounts {
    /// Billed-after-abort findings where the client sent FIN.
    pub abort_fin: u64,
    /// Billed-after-abort findings where the client sent RST.
    pub abort_rst: u64,
    /// Billed-after-abort findings made without a runtime span (kernel writes only).
    pub abort_without_span: u64,
    /// Sum of `tokens_after` over billed-after-abort findings.
    pub billed_after_abort_tokens: u64,
    /// Client aborts measured (SPEC §3.1), finding or not: the client left while its request
    /// was in flight.
    pub client_aborts: u64,
    /// Client aborts that made no finding: no token after the close and a short lag.
    pub client_aborts_without_finding: u64,
}

impl FindingCounts {
    pub(crate) fn record_client_abort(&mut self, finding: bool) {
        self.client_aborts += 1;
        if !finding {
            self.client_aborts_without_finding += 1;
        }
    }

    pub(crate) fn record_abort(&mut self, how: CloseHow, tokens_after: u64, with_span: bool) {
        match how {
            CloseHow::Fin => self.abort_fin += 1,
            CloseHow::Rst => self.abort_rst += 1,
        }
        if !with_span {
            self.abort_without_span += 1;
        }
        self.billed_after_abort_tokens =
            self.billed_after_abort_tokens.saturating_add(tokens_after);
    }
}

/// How full each table is now (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSizes {
    /// Connections tracked.
    pub connections: usize,
    /// Request heads waiting for a span or a time-out.
    pub pending_heads: usize,
    /// Runtime spans waiting to settle.
    pub pending_spans: usize,
    /// Listening ports remembered.
    pub listeners: usize,
    /// Request boundaries remembered across all connections (pending or settled).
    pub requests: usize,
    /// Process exits, OOM victims and server processes remembered (lost in flight).
    #[serde(default)]
    pub processes: usize,
}
