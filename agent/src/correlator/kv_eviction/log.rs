//! Per runtime instance: the log of its recent requests and of its KV events, the evidence
//! the detection and the attribution read.

use std::collections::VecDeque;

use crate::model::UnixNanos;

/// A request as the instance's log keeps it.
#[derive(Debug, Clone)]
pub(super) struct LoggedRequest {
    pub(super) trace_id: [u8; 16],
    pub(super) span_id: [u8; 8],
    /// Conversation key (0: none).
    pub(super) conv: u64,
    pub(super) tenant: u32,
    pub(super) arrival: UnixNanos,
    pub(super) prefill_start: UnixNanos,
    pub(super) first_token: Option<UnixNanos>,
    pub(super) end: UnixNanos,
    pub(super) prompt: u64,
    pub(super) cached: u64,
    pub(super) output: u64,
}

impl LoggedRequest {
    pub(super) fn uncached(&self) -> u64 {
        self.prompt.saturating_sub(self.cached)
    }

    /// Nanoseconds per output token after the first (first token to end), when it decoded
    /// at least two.
    pub(super) fn decode_per_token(&self) -> Option<f64> {
        decode_per_token(self.first_token, self.end, self.output)
    }

    /// KV tokens this request allocated in `[w0, w1)`.
    pub(super) fn demand(&self, w0: UnixNanos, w1: UnixNanos) -> f64 {
        let mut d = 0.0;
        if self.prefill_start >= w0 && self.prefill_start < w1 {
            d += self.uncached() as f64;
        }
        let decode_start = self.first_token.unwrap_or(self.end);
        if self.output > 0 {
            let lo = decode_start.max(w0);
            let hi = self.end.min(w1);
            if self.end > decode_start {
                if hi > lo {
                    d += self.output as f64 * (hi - lo) as f64 / (self.end - decode_start) as f64;
                }
            } else if decode_start >= w0 && decode_start < w1 {
                d += self.output as f64;
            }
        }
        d
    }
}

#[derive(Debug, Clone)]
pub(super) enum KvLogged {
    Stored {
        ts: UnixNanos,
        hashes: Vec<u64>,
        parent: Option<u64>,
    },
    Removed {
        ts: UnixNanos,
        hashes: Vec<u64>,
    },
    /// Everything cleared, or batches lost: block evidence is incomplete around `ts`.
    Broken {
        ts: UnixNanos,
    },
}

impl KvLogged {
    pub(super) fn ts(&self) -> UnixNanos {
        match self {
            KvLogged::Stored { ts, .. }
            | KvLogged::Removed { ts, .. }
            | KvLogged::Broken { ts } => *ts,
        }
    }
    pub(super) fn blocks(&self) -> usize {
        match self {
            KvLogged::Stored { hashes, .. } | KvLogged::Removed { hashes, .. } => hashes.len(),
            KvLogged::Broken { .. } => 0,
        }
    }
}

/// Clean prefills of a similar length needed before the prefill-time evidence is used.
pub(super) const PREFILL_MIN_SAMPLES: usize = 3;
/// Clean prefills kept per instance.
pub(super) const CLEAN_SAMPLES: usize = 64;

/// Nanoseconds per output token after the first, from the first token to the end.
pub(super) fn decode_per_token(
    first_token: Option<UnixNanos>,
    end: UnixNanos,
    output: u64,
) -> Option<f64> {
    let first = first_token?;
    (output >= 2 && end > first).then(|| (end - first) as f64 / (output - 1) as f64)
}

/// Whether `ts` falls in the request's prefill (from its start to its first token, plus the
/// store slack).
pub(super) fn in_prefill(r: &LoggedRequest, ts: UnixNanos, slack: u64) -> bool {
    r.prefill_start <= ts && ts <= r.first_token.unwrap_or(r.end).saturating_add(slack)
}

#[derive(Debug, Default)]
pub(super) struct InstanceLog {
    pub(super) requests: VecDeque<LoggedRequest>,
    pub(super) kv: VecDeque<KvLogged>,
    pub(super) kv_blocks: usize,
    /// Earliest KV event ever logged for this instance (evidence starts there).
    pub(super) kv_since: Option<UnixNanos>,
    pub(super) last_seq: Option<u64>,
    /// Recent prefill rate, tokens per second (EWMA).
    pub(super) prefill_rate: Option<f64>,
    /// Recent prefills of requests that cannot have hit a conversation's prefix (a first turn,
    /// no conversation, or a known cached count): `(uncached tokens, prefill ns)`, at most
    /// `CLEAN_SAMPLES`. The reference of the prefill-time evidence, by prompt length (a CPU's or
    /// GPU's rate depends on it), which a hit's short prefill must not inflate.
    pub(super) clean: VecDeque<(u64, u64)>,
    /// The runtime's block size, from its `BlockStored` events.
    pub(super) kv_block_size: Option<u32>,
}
