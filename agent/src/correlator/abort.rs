//! The billed-after-abort finding (contract §3.1): the client left, the runtime kept decoding.

use serde::{Deserialize, Serialize};

use super::join::JoinRule;
use crate::model::{CloseHow, ConnId, RuntimeRequest, UnixNanos};

/// How `tokens_after` was counted, most exact first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountMethod {
    /// The runtime exported one span event per token: tokens with a time after `t_c`.
    Events,
    /// The kernel saw the server write after the peer left: one SSE write per token chunk,
    /// framing writes (`data: [DONE]`) left out.
    KernelWrites,
    /// Neither: `round(N_out * (t_s - max(t_c, t_first)) / (t_s - t_first))`, which assumes a
    /// steady decode rate.
    Interpolated,
}

impl TokenCountMethod {
    /// The value of `inferwatch.abort.method`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenCountMethod::Events => "events",
            TokenCountMethod::KernelWrites => "kernel_writes",
            TokenCountMethod::Interpolated => "interpolated",
        }
    }
}

/// Tokens the runtime generated (and billed) after the client closed its connection.
///
/// Exported as the `inferwatch.abort` span in the request's own trace, child of the runtime's
/// request span, and as the `inferwatch_billed_after_abort_tokens_total`,
/// `inferwatch_aborts_total{how}` and `inferwatch_abort_lag_seconds` metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortFinding {
    /// The request's trace: the runtime span's trace id, or, when the runtime exported no span,
    /// the trace id of the request's `traceparent` header; `None` when neither exists.
    pub trace_id: Option<[u8; 16]>,
    /// The parent of the finding span: the runtime's request span, or, with no runtime span,
    /// the client's span named by `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    /// The runtime's request id, else the `x-request-id` header.
    pub request_id: Option<String>,
    /// Output tokens generated after the client left (`inferwatch.abort.tokens_after`).
    pub tokens_after: u64,
    /// Output tokens of the whole request (`inferwatch.abort.tokens_total`); `None` when the
    /// runtime exported no span.
    pub tokens_total: Option<u64>,
    /// How `tokens_after` was counted (`inferwatch.abort.method`).
    pub method: TokenCountMethod,
    /// `t_s - t_c` in nanoseconds (`inferwatch.abort.lag_ms` once divided).
    pub lag_ns: u64,
    /// How the client left (`inferwatch.abort.how`).
    pub how: CloseHow,
    /// Client close: the first `PeerClosed` on the connection while the request was in flight.
    pub t_c: UnixNanos,
    /// Runtime stop: the span's end, or the last write after the peer left with no span.
    pub t_s: UnixNanos,
    /// Whether `t_s` came from the span (`true`) or from the kernel's last write (`false`).
    pub t_s_from_span: bool,
    /// The connection the request came on.
    pub conn: ConnId,
    /// The tenant: the span's, else the tenant header's.
    pub tenant: Option<String>,
    /// The model, from the span.
    pub model: Option<String>,
    /// How the runtime span was joined to the connection ([`JoinRule::Unjoined`] with no span).
    pub join: JoinRule,
    /// When the gateway closed or reset its upstream connection to the runtime, when the
    /// request crossed a watched gateway (SPEC §2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_g: Option<UnixNanos>,
    /// Which boundary held the cancel (`inferwatch.abort.stalled_at`), when the request
    /// crossed a watched gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_at: Option<AbortBoundary>,
}

/// A boundary a cancel crosses after the client left (SPEC §2.1), the label of
/// `inferwatch_abort_lag_seconds{boundary}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortBoundary {
    /// The gateway closed or reset its upstream connection (`t_g`).
    Gateway,
    /// The runtime stopped (`t_s`).
    Runtime,
}

impl AbortBoundary {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortBoundary::Gateway => "gateway",
            AbortBoundary::Runtime => "runtime",
        }
    }
}

/// One client abort, measured whatever followed (SPEC §3.1): the client left while its request
/// was in flight. Emitted for every abort, with a finding or not, so that a runtime that stops
/// at once shows up as aborts with a short lag (`inferwatch_client_aborts_total{how,model}`,
/// `inferwatch_abort_lag_seconds{boundary}`) rather than as nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAbort {
    /// The client's connection.
    pub conn: ConnId,
    /// How the client left.
    pub how: CloseHow,
    /// The model, from the span, when there was one.
    pub model: Option<String>,
    /// Client close.
    pub t_c: UnixNanos,
    /// The gateway closed its upstream, when the request crossed a watched gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_g: Option<UnixNanos>,
    /// Runtime stop (the span's end, else the last write or the server's close of the
    /// runtime's connection); `None` when the kernel saw neither.
    pub t_s: Option<UnixNanos>,
    /// Output tokens after `t_c`.
    pub tokens_after: u64,
    /// Whether an `inferwatch.abort` finding was made for it.
    pub finding: bool,
}

impl ClientAbort {
    /// The lag to each boundary the abort crossed, in nanoseconds.
    pub fn lags(&self) -> impl Iterator<Item = (AbortBoundary, u64)> + '_ {
        [
            (AbortBoundary::Gateway, self.t_g),
            (AbortBoundary::Runtime, self.t_s),
        ]
        .into_iter()
        .filter_map(|(boundary, t)| t.map(|t| (boundary, t.saturating_sub(self.t_c))))
    }
}

/// Which boundary held the cancel: the gateway when it never closed its upstream before the
/// runtime stopped, or took longer to close it than the runtime then took to stop; else the
/// runtime.
pub(crate) fn stalled_at(t_c: UnixNanos, t_g: Option<UnixNanos>, t_s: UnixNanos) -> AbortBoundary {
    match t_g {
        Some(t_g) if t_g < t_s => {
            if t_g.saturating_sub(t_c) >= t_s - t_g {
                AbortBoundary::Gateway
            } else {
                AbortBoundary::Runtime
            }
        }
        _ => AbortBoundary::Gateway,
    }
}

/// Whether an abort makes a finding span: a token after the close, or a runtime slower to
/// stop than `lag_threshold` (SPEC §3.1).
pub(crate) fn makes_finding(tokens_after: u64, lag_ns: u64, lag_threshold: UnixNanos) -> bool {
    tokens_after >= 1 || lag_ns > lag_threshold
}

/// Tokens after `t_c` for a request with a span; `None` when there is nothing to report
/// (the client did not leave while the runtime was working).
pub(crate) fn tokens_after_with_span(
    span: &RuntimeRequest,
    t_c: UnixNanos,
    kernel_token_writes: u64,
) -> Option<(u64, u64, TokenCountMethod)> {
    let t_s = span.end;
    if t_c >= t_s {
        return None;
    }
    let total = span.output_tokens.unwrap_or(span.token_times.len() as u64);
    if !span.token_times.is_empty() {
        let after = span.token_times.iter().filter(|&&t| t > t_c).count() as u64;
        return Some((after, total.max(after), TokenCountMethod::Events));
    }
    if kernel_token_writes > 0 {
        // A write after the last token (a usage chunk) would over-count; the span's total
        // bounds it.
        let after = if span.output_tokens.is_some() {
            kernel_token_writes.min(total)
        } else {
            kernel_token_writes
        };
        return Some((after, total.max(after), TokenCountMethod::KernelWrites));
    }
    Some((
        interpolate(total, span.first_token, span.arrival, t_c, t_s),
        total,
        TokenCountMethod::Interpolated,
    ))
}

/// `round(N * (t_s - max(t_c, t_first)) / (t_s - t_first))`, all tokens when the client left
/// before the first one. Without a first-token time the decode is assumed to start at arrival.
pub(crate) fn interpolate(
    total: u64,
    first_token: Option<UnixNanos>,
    arrival: UnixNanos,
    t_c: UnixNanos,
    t_s: UnixNanos,
) -> u64 {
    let t_first = first_token.unwrap_or(arrival);
    if t_c <= t_first {
        return total;
    }
    if t_s <= t_c || t_s <= t_first {
        return 0;
    }
    let decoding = u128::from(t_s - t_first);
    let after = u128::from(t_s - t_c);
    // Rounding to nearest in integers; N * nanos fits in u128 (both below 2^64).
    let product = u128::from(total) * after;
    let mut value = product / decoding;
    if (product % decoding) * 2 >= decoding {
        value += 1;
    }
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_rounds_and_bounds() {
        // 100 tokens from 1000 to 2000; client left at 1500: half the tokens.
        assert_eq!(interpolate(100, Some(1000), 0, 1500, 2000), 50);
        // Before the first token: all of them.
        assert_eq!(interpolate(100, Some(1000), 0, 900, 2000), 100);
        // Rounds to nearest: 3 * 1/3 = 1, 2 * 1/4 = 0.5 -> 1.
        assert_eq!(interpolate(3, Some(0), 0, 2, 3), 1);
        assert_eq!(interpolate(2, Some(0), 0, 3, 4), 1);
        // Client left after the stop: nothing.
        assert_eq!(interpolate(100, Some(1000), 0, 2000, 2000), 0);
        // Huge values do not overflow.
        assert_eq!(interpolate(u64::MAX, Some(0), 0, 1, u64::MAX), u64::MAX - 1);
    }
}
