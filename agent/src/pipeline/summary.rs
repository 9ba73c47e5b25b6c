//! [`FindingSummary`]: the findings as the log and the demo see them, and the log line of each.

use super::correlate::CorrelateStage;
use crate::correlator::{
    AbortFinding, ColdStartFinding, GpuContentionFinding, KvEvictionFinding, LostInFlightFinding,
    Output,
};

/// A finding, summarised for logs and the demo.
#[derive(Debug, Clone, PartialEq)]
pub enum FindingSummary {
    /// Tokens billed after the client left.
    Abort(AbortFinding),
    /// Another process on the GPU slowed the runtime's decode.
    GpuContention(GpuContentionFinding),
    /// A runtime instance's cold-start floor.
    ColdStart(ColdStartFinding),
    /// A conversation's warm prefix was evicted.
    KvEviction(KvEvictionFinding),
    /// A request lost in flight.
    LostInFlight(LostInFlightFinding),
}

impl FindingSummary {
    /// The summary of a finding; `None` for the outputs that are not findings.
    pub(super) fn of(output: Output) -> Option<Self> {
        match output {
            Output::Abort(f) => Some(Self::Abort(f)),
            Output::GpuContention(f) => Some(Self::GpuContention(f)),
            Output::ColdStart(f) => Some(Self::ColdStart(f)),
            Output::KvEviction(f) => Some(Self::KvEviction(f)),
            Output::LostInFlight(f) => Some(Self::LostInFlight(f)),
            Output::Joined(_) | Output::ClientAbort(_) | Output::RequestGpu(_) => None,
        }
    }
}

/// Logs each finding the stage made since the last call, one line each (target
/// `inferwatch::finding`).
pub(super) fn log_findings(stage: &mut CorrelateStage) {
    for summary in stage.take_summaries() {
        match summary {
            FindingSummary::GpuContention(f) => tracing::info!(
                target: "inferwatch::finding",
                finding = "gpu_contention",
                gpu = %f.gpu_uuid,
                runtime_pid = f.runtime_pid,
                neighbour_pid = f.neighbour.pid,
                neighbour = f.neighbour.executable.as_deref().unwrap_or("-"),
                neighbour_share = f.neighbour.sm_share / 100.0,
                tpot_inflation = f.inflation,
                seconds = f.seconds(),
                "another process on the GPU slowed the runtime's decode"
            ),
            FindingSummary::KvEviction(f) => tracing::info!(
                target: "inferwatch::finding",
                finding = "kv_eviction",
                victim_tenant = f.victim_tenant.as_deref().unwrap_or("-"),
                conversation = %f.victim_conversation,
                expected_cached = f.expected_cached_tokens,
                cached = f.cached_tokens,
                neighbour = f.neighbour_tenant.as_deref().unwrap_or("-"),
                share = f.neighbour_share,
                ttft_penalty_ms = f.ttft_penalty_ns.map(|n| n / 1_000_000),
                method = f.method.as_str(),
                "a conversation's warm prefix was evicted"
            ),
            FindingSummary::ColdStart(f) => tracing::info!(
                target: "inferwatch::finding",
                finding = "cold_start",
                pid = f.pid,
                executable = f.executable.as_deref().unwrap_or("-"),
                floor_ms = f.floor_ns / 1_000_000,
                phases = ?f.phases.iter().map(|p| (p.name.as_str(), p.end.saturating_sub(p.start) / 1_000_000)).collect::<Vec<_>>(),
                "cold-start latency floor"
            ),
            FindingSummary::LostInFlight(f) => tracing::info!(
                target: "inferwatch::finding",
                finding = "lost_in_flight",
                cause = f.cause.as_str(),
                pid = f.pid,
                exit_code = ?f.exit_code,
                signal = ?f.signal,
                request_id = f.request_id.as_deref().unwrap_or("-"),
                ran_ms = f.ran_ns() / 1_000_000,
                "a request was lost in flight"
            ),
            FindingSummary::Abort(f) => tracing::info!(
                target: "inferwatch::finding",
                finding = "abort",
                request_id = f.request_id.as_deref().unwrap_or("-"),
                tenant = f.tenant.as_deref().unwrap_or("-"),
                tokens_after = f.tokens_after,
                tokens_total = ?f.tokens_total,
                method = f.method.as_str(),
                lag_ms = f.lag_ns / 1_000_000,
                how = f.how.as_str(),
                join = f.join.as_str(),
                "tokens billed after the client left"
            ),
        }
    }
}
