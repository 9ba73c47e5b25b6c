//! Deciding a miss that the span does not report (no cached-token count): from the instance's
//! KV events (its own blocks stored again, each removed since), else from its prefill time
//! against the instance's clean prefill rate.

use std::collections::{HashMap, HashSet};

use super::finding::{KvEvictionStats, MissEvidence};
use super::log::{
    InstanceLog, KvLogged, LoggedRequest, PREFILL_MIN_SAMPLES, decode_per_token, in_prefill,
};
use super::{KvTracker, NANOS_PER_MILLI, Pending, Undecided};
use crate::model::UnixNanos;

/// A miss established from KV events or the prefill time.
#[derive(Debug)]
pub(super) struct KvMiss {
    pub(super) expected: u64,
    pub(super) cached: u64,
    pub(super) evidence: MissEvidence,
    /// The conversation's blocks stored again.
    pub(super) blocks_lost: u64,
    /// Timestamps of the batches that removed them, sorted.
    pub(super) evictor_batches: Vec<UnixNanos>,
}

/// A prefill longer than this many times the whole prompt's at the instance's rate was slowed
/// by more than a miss.
const SLOWED: f64 = 1.5;
/// A decode slower per token than this many times the instance's median: slowed around the turn.
const SLOWED_DECODE: f64 = 3.0;

impl KvTracker {
    /// The TTFT penalty of `expected - cached` lost tokens at the instance's recent rate.
    pub(super) fn penalty(&self, p: &Pending, expected: u64, cached: u64) -> Option<u64> {
        let rate = self.logs.get(p.instance as usize)?.prefill_rate?;
        let ttft = p.finding.ttft_ns?;
        if rate <= 0.0 {
            return None;
        }
        let lost = expected.saturating_sub(cached) as f64;
        Some(((lost / rate * 1e9) as u64).min(ttft))
    }

    /// Decides a turn without a cached-token count: from the instance's KV events when it has
    /// them, else from the prefill time. `None`: no miss, or not established (counted).
    pub(super) fn decide(
        &self,
        p: &Pending,
        u: Undecided,
        stats: &mut KvEvictionStats,
    ) -> Option<KvMiss> {
        let log = self.logs.get(p.instance as usize)?;
        if log.kv_since.is_some() {
            return self.decide_kv(log, p, u, stats);
        }
        self.decide_prefill_time(log, p, u, stats)
    }

    pub(super) fn decide_kv(
        &self,
        log: &InstanceLog,
        p: &Pending,
        u: Undecided,
        stats: &mut KvEvictionStats,
    ) -> Option<KvMiss> {
        let slack = self
            .config
            .kv_store_slack_ms
            .saturating_mul(NANOS_PER_MILLI);
        let block = u64::from(log.kv_block_size.unwrap_or(self.config.block_size).max(1));
        let expected = u.history.min(u.prompt) / block * block;
        if expected < self.config.min_prefix_tokens {
            return None;
        }
        let w0 = p.finding.window_start;
        // The conversation's earlier turns still in the request log.
        let earlier: Vec<&LoggedRequest> = log
            .requests
            .iter()
            .filter(|r| r.conv == p.conv && r.end <= w0)
            .collect();
        let Some(t0) = earlier.iter().map(|r| r.prefill_start).min() else {
            stats.kv_turns_undecided += 1;
            return None;
        };
        let t1 = u.first_token.unwrap_or(p.victim_end).max(p.victim_end) + slack;
        let broken = log
            .kv
            .iter()
            .any(|e| matches!(e, KvLogged::Broken { ts } if *ts >= t0 && *ts <= t1));
        // Events since before the end of turn n at least: a subscription that began later
        // missed stores of the chain, which makes the answer a hit (conservative), never a
        // false miss.
        if log.kv_since.is_none_or(|since| since > w0) || broken {
            stats.kv_turns_undecided += 1;
            return None;
        }
        let start = log.kv.partition_point(|e| e.ts() < t0);
        // The conversation's chain: what its earlier turns stored, in order. A store chained
        // onto the chain is the conversation's whatever else ran; an unchained one is its only
        // when no other request was in prefill then.
        let mut chain: Vec<u64> = Vec::new();
        let mut in_chain: HashSet<u64> = HashSet::new();
        let mut restored: Vec<u64> = Vec::new();
        let mut removed: HashMap<u64, UnixNanos> = HashMap::new();
        for entry in log.kv.range(start..) {
            match entry {
                KvLogged::Stored {
                    ts, hashes, parent, ..
                } if *ts < u.prefill_start => {
                    let chained = parent.is_some_and(|h| in_chain.contains(&h));
                    if !chained {
                        let covering = log.requests.iter().filter(|r| in_prefill(r, *ts, slack));
                        let (mut mine, mut others) = (0, 0);
                        for r in covering {
                            if r.conv == p.conv && r.end <= w0 {
                                mine += 1;
                            } else {
                                others += 1;
                            }
                        }
                        if mine == 0 {
                            continue;
                        }
                        if others > 0 {
                            stats.kv_ambiguous_stores += 1;
                            continue;
                        }
                    }
                    for h in hashes {
                        if in_chain.insert(*h) {
                            chain.push(*h);
                        }
                    }
                }
                KvLogged::Stored { ts, hashes, .. } if *ts <= t1 => {
                    restored.extend(hashes.iter().filter(|h| in_chain.contains(h)));
                }
                KvLogged::Removed { ts, hashes } if *ts <= t1 => {
                    for h in hashes.iter().filter(|h| in_chain.contains(h)) {
                        removed.insert(*h, *ts);
                    }
                }
                _ => {}
            }
            if entry.ts() > t1 {
                break;
            }
        }
        if chain.is_empty() {
            stats.kv_turns_undecided += 1;
            return None;
        }
        if restored.is_empty() {
            return None;
        }
        // Stored again only after its removal: a block re-stored with no removal seen is
        // evidence missing, not an eviction.
        let mut evictor_batches = Vec::new();
        for h in &restored {
            match removed.get(h) {
                Some(ts) => evictor_batches.push(*ts),
                None => {
                    stats.kv_turns_undecided += 1;
                    return None;
                }
            }
        }
        evictor_batches.sort_unstable();
        evictor_batches.dedup();
        // The blocks stored again are lost for certain; whether a runtime also recomputed (without
        // storing again) chain blocks after the first lost one depends on it: counting only the
        // ones stored again never overstates the loss.
        restored.sort_unstable();
        restored.dedup();
        let cached = expected.saturating_sub(restored.len() as u64 * block);
        if cached.saturating_mul(2) >= expected {
            return None;
        }
        Some(KvMiss {
            expected,
            cached,
            evidence: MissEvidence::KvEvents,
            blocks_lost: restored.len() as u64,
            evictor_batches,
        })
    }

    /// The prefill-time evidence: the turn's prefill, at the instance's clean rate, took as long
    /// as its whole prompt, not only the part past the expected prefix. Conservative: it needs
    /// a settled rate, no other prefill overlapping the turn's, and a clear margin both ways.
    pub(super) fn decide_prefill_time(
        &self,
        log: &InstanceLog,
        p: &Pending,
        u: Undecided,
        stats: &mut KvEvictionStats,
    ) -> Option<KvMiss> {
        let block = u64::from(self.config.block_size.max(1));
        let expected = u.history.min(u.prompt) / block * block;
        if expected < self.config.min_prefix_tokens {
            return None;
        }
        // The rate for this prompt's length, from clean prefills of half to twice its length:
        // the third quartile (nearest rank). Slow, so that fast samples (a first turn that hit a
        // shared system prompt) do not make a hit look slow; not the slowest, so that one first
        // turn slowed by contention does not hide every miss after it. The margins below keep
        // a hit from a finding.
        let mut per_token: Vec<f64> = log
            .clean
            .iter()
            .filter(|(tokens, _)| *tokens * 2 >= u.prompt && *tokens <= u.prompt * 2)
            .map(|(tokens, ns)| *ns as f64 / *tokens as f64)
            .collect();
        per_token.sort_by(f64::total_cmp);
        let rate = per_token
            .get((per_token.len() * 3).div_ceil(4).saturating_sub(1))
            .filter(|_| per_token.len() >= PREFILL_MIN_SAMPLES)
            .map(|ns| 1e9 / ns);
        let (Some(rate), Some(first)) = (rate, u.first_token) else {
            stats.prefill_time_undecided += 1;
            return None;
        };
        if !rate.is_finite() || rate <= 0.0 || first <= u.prefill_start {
            stats.prefill_time_undecided += 1;
            return None;
        }
        let overlapped = log.requests.iter().any(|r| {
            r.span_id != p.finding.parent_span_id
                && r.prefill_start < first
                && r.first_token.unwrap_or(r.end) > u.prefill_start
        });
        if overlapped {
            stats.prefill_time_undecided += 1;
            return None;
        }
        let observed_s = (first - u.prefill_start) as f64 / 1e9;
        // Slowed by something else than a miss: the timing cannot tell a miss from a hit.
        // A prefill far longer than the whole prompt's at the instance's rate (a miss
        // recomputes the prompt, no more), or a decode far slower than the instance's usual
        // one (the CPU or GPU was busy around the turn, and a slowed hit looks like a miss).
        let slowed_prefill = observed_s > SLOWED * u.prompt as f64 / rate;
        let slowed_decode = decode_per_token(u.first_token, u.end, u.output).is_some_and(|d| {
            let mut usual: Vec<f64> = log
                .requests
                .iter()
                .filter(|r| r.span_id != p.finding.parent_span_id)
                .filter_map(LoggedRequest::decode_per_token)
                .collect();
            usual.sort_by(f64::total_cmp);
            usual.len() >= PREFILL_MIN_SAMPLES && d > SLOWED_DECODE * usual[usual.len() / 2]
        });
        if slowed_prefill || slowed_decode {
            stats.prefill_time_undecided += 1;
            return None;
        }
        let beyond_prefix = u.prompt.saturating_sub(expected) as f64;
        // Tokens the prefill had time for beyond the part past the prefix.
        let lost = observed_s * rate - beyond_prefix;
        let hit_s = beyond_prefix / rate;
        if lost >= 0.75 * expected as f64 && observed_s >= 2.0 * hit_s {
            let cached = expected.saturating_sub(lost.min(expected as f64) as u64);
            return Some(KvMiss {
                expected,
                cached,
                evidence: MissEvidence::PrefillTime,
                blocks_lost: 0,
                evictor_batches: Vec::new(),
            });
        }
        if lost > 0.25 * expected as f64 {
            stats.prefill_time_undecided += 1;
        }
        None
    }
}
