//! Open-loop load at a fixed request rate (`iw-testbed load`), for the agent's load benchmark.
//!
//! Unlike [`crate::traffic`], nothing is planned ahead: request `n` is due at `n / rate`
//! seconds and is built when it is due, so a 10-minute run at 10k requests/s holds only the
//! requests in flight. Each request is one connection (`connection: close`), a tiny streaming
//! completion, read to the end, through the same raw HTTP client as the scenarios; a share of
//! them close (FIN) after a few tokens while the runtime is still decoding. When the runtime
//! falls behind, requests beyond `max_in_flight` are not sent and are counted as `skipped`, so
//! the achieved rate is what the summary says, never the offered one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::tokens;
use crate::traffic::{AbortHow, PlannedConversation, PlannedTurn, TrafficOptions, one_request};
use crate::truth::JsonlWriter;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `host:port` of the runtime.
    pub target: String,
    /// Model name to send.
    pub model: String,
    /// Requests per second offered.
    pub rate: f64,
    /// How long to offer them.
    pub duration: Duration,
    /// `max_tokens` of a request that reads to the end.
    pub max_tokens: u32,
    /// Share of requests that close (FIN) after `abort_after` tokens.
    pub abort_share: f64,
    /// `max_tokens` of an aborting request (more than `abort_after`: the runtime is still
    /// decoding when the client leaves).
    pub abort_max_tokens: u32,
    /// Tokens an aborting request reads before closing.
    pub abort_after: u64,
    /// Requests in flight at most; beyond, a due request is skipped (and counted).
    pub max_in_flight: u64,
    /// Seed of the trace ids.
    pub seed: u64,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadSummary {
    /// Requests due (rate x duration).
    pub offered: u64,
    /// Requests sent.
    pub sent: u64,
    /// Read to the end.
    pub completed: u64,
    /// Closed by plan after `abort_after` tokens.
    pub aborted: u64,
    /// Failed (connect, HTTP status, closed early).
    pub errors: u64,
    /// Due but not sent: `max_in_flight` were in flight.
    pub skipped: u64,
    /// Seconds from the first request due to the last one finished.
    pub elapsed_s: f64,
    /// Seconds over which requests were offered.
    pub offered_s: f64,
    /// `sent / offered_s`.
    pub sent_per_s: f64,
    /// `(completed + aborted) / offered_s`: requests served per second.
    pub achieved_per_s: f64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    completed: AtomicU64,
    aborted: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

/// Whether request `n` aborts (deterministic for a seed).
fn aborts(seed: u64, n: u64, share: f64) -> bool {
    share > 0.0
        && (tokens::mix(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as f64)
            < share * u64::MAX as f64
}

/// Offer `rate` requests/s for `duration`; write a [`crate::truth::ClientTruth`] for each
/// aborted request to `aborts_out`. Returns once every request sent has finished (or 30 s
/// after the last one was due).
pub async fn run(opts: LoadOptions, aborts_out: Arc<JsonlWriter>) -> LoadSummary {
    let counters = Arc::new(Counters::default());
    let traffic = Arc::new(TrafficOptions {
        target: opts.target.clone(),
        model: opts.model.clone(),
        duration_scale: 1.0,
        connect_timeout: Duration::from_secs(5),
    });
    let offered = (opts.rate * opts.duration.as_secs_f64()).round() as u64;
    let start = Instant::now();
    let mut skipped = 0u64;
    let mut n = 0u64;
    while n < offered {
        let due = start + Duration::from_secs_f64(n as f64 / opts.rate);
        tokio::time::sleep_until(due.into()).await;
        // Everything due by now (the timer's granularity is a millisecond or worse).
        let now = Instant::now();
        while n < offered && start + Duration::from_secs_f64(n as f64 / opts.rate) <= now {
            if counters.in_flight.load(Ordering::Relaxed) >= opts.max_in_flight {
                skipped += 1;
            } else {
                counters.in_flight.fetch_add(1, Ordering::Relaxed);
                counters.sent.fetch_add(1, Ordering::Relaxed);
                let abort = aborts(opts.seed, n, opts.abort_share);
                tokio::spawn(one(
                    n,
                    abort,
                    opts.clone(),
                    traffic.clone(),
                    counters.clone(),
                    aborts_out.clone(),
                ));
            }
            n += 1;
        }
    }
    let offered_s = start.elapsed().as_secs_f64();
    let drain_until = Instant::now() + Duration::from_secs(30);
    while counters.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (completed, aborted) = (get(&counters.completed), get(&counters.aborted));
    LoadSummary {
        offered,
        sent: get(&counters.sent),
        completed,
        aborted,
        errors: get(&counters.errors),
        skipped,
        elapsed_s: start.elapsed().as_secs_f64(),
        offered_s,
        sent_per_s: get(&counters.sent) as f64 / offered_s.max(1e-9),
        achieved_per_s: (completed + aborted) as f64 / offered_s.max(1e-9),
    }
}

async fn one(
    n: u64,
    abort: bool,
    opts: LoadOptions,
    traffic: Arc<TrafficOptions>,
    counters: Arc<Counters>,
    aborts_out: Arc<JsonlWriter>,
) {
    let id = format!("load-c{n}");
    let conv = PlannedConversation {
        tenant: format!("tenant-{}", n % 4),
        id: id.clone(),
        start_s: 0.0,
        system: String::new(),
        completions: true,
        turns: Vec::new(),
        traceparent: true,
    };
    let h = tokens::mix(opts.seed.wrapping_add(n));
    let max_tokens = if abort {
        opts.abort_max_tokens
    } else {
        opts.max_tokens
    };
    let turn = PlannedTurn {
        request_id: format!("{id}-t1"),
        user_text: "hello".into(),
        max_tokens,
        stream: true,
        abort: abort.then_some((opts.abort_after.max(1), AbortHow::Fin)),
        timeout_ms: None,
        think_ms: 0,
        trace_id: ((u128::from(h) << 64) | u128::from(tokens::mix(h ^ n))) | 1,
        span_id: tokens::mix(h) | 1,
    };
    let body = json!({"model": opts.model, "prompt": turn.user_text, "max_tokens": max_tokens,
        "stream": true, "temperature": 0.7, "top_p": 0.95});
    let (rec, _) = one_request(&conv, 1, &turn, body, &traffic).await;
    match rec.close.as_str() {
        "complete" => {
            counters.completed.fetch_add(1, Ordering::Relaxed);
        }
        "fin" | "rst" => {
            counters.aborted.fetch_add(1, Ordering::Relaxed);
            aborts_out.write(&rec);
        }
        _ => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    counters.in_flight.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_share_is_roughly_kept_and_deterministic() {
        let n = (0..100_000).filter(|&i| aborts(7, i, 0.05)).count();
        assert!((4_000..6_000).contains(&n), "{n}");
        assert_eq!(
            (0..1000)
                .filter(|&i| aborts(7, i, 0.05))
                .collect::<Vec<_>>(),
            (0..1000)
                .filter(|&i| aborts(7, i, 0.05))
                .collect::<Vec<_>>()
        );
        assert_eq!((0..1000).filter(|&i| aborts(7, i, 0.0)).count(), 0);
    }
}
