//! Connection attempts that came before a runtime listened (contract §3.2): the kernel answered
//! their SYN with a reset because no socket held the watched port. Each is a client (often a
//! gateway retrying) that waited for the start; the cold start of the process that next listens
//! on the port counts them.
//!
//! An attempt is not a request: a gateway that retries one request ten times makes ten attempts,
//! and the kernel cannot tell them apart (each retry comes from a new client port). The finding
//! therefore reports attempts, and how long the earliest had been waiting when the port opened.

use std::collections::{BTreeMap, VecDeque};

use crate::correlator::config::GpuDetectionConfig;
use crate::model::UnixNanos;

const MS: u64 = 1_000_000;

/// Most attempts remembered per port; beyond it the oldest go (counted). 8 bytes each.
pub(crate) const MAX_ATTEMPTS_PER_PORT: usize = 4096;

/// Refused attempts per watched port, oldest first, until the port's next `Listen`.
#[derive(Debug, Default)]
pub(crate) struct RefusedAttempts {
    ports: BTreeMap<u16, VecDeque<UnixNanos>>,
    /// Attempts seen.
    pub(crate) seen: u64,
    /// Attempts forgotten before a `Listen` took them: a table full, or older than
    /// `refused_keep_ms`.
    pub(crate) dropped: u64,
}

impl RefusedAttempts {
    /// A SYN to `port` that no socket took, at `ts`.
    pub(crate) fn on_refused(&mut self, port: u16, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.seen += 1;
        if !self.ports.contains_key(&port) && self.ports.len() >= cfg.max_instances.max(1) {
            // The port whose latest attempt is the oldest: its runtime is the least likely
            // to be on its way.
            let stalest = self
                .ports
                .iter()
                .min_by_key(|(p, a)| (a.back().copied().unwrap_or(0), **p))
                .map(|(p, _)| *p);
            if let Some(attempts) = stalest.and_then(|p| self.ports.remove(&p)) {
                self.dropped += attempts.len() as u64;
            }
        }
        let attempts = self.ports.entry(port).or_default();
        attempts.push_back(ts);
        while attempts.len() > MAX_ATTEMPTS_PER_PORT {
            attempts.pop_front();
            self.dropped += 1;
        }
    }

    /// The attempts on `port` up to `listen` (when a process began to listen on it), oldest
    /// first; they are forgotten here.
    pub(crate) fn take_until(&mut self, port: u16, listen: UnixNanos) -> Vec<UnixNanos> {
        let Some(attempts) = self.ports.get_mut(&port) else {
            return Vec::new();
        };
        let until = attempts.partition_point(|t| *t <= listen);
        let taken: Vec<UnixNanos> = attempts.drain(..until).collect();
        if attempts.is_empty() {
            self.ports.remove(&port);
        }
        taken
    }

    /// Forgets attempts older than `refused_keep_ms`: no runtime started for them.
    pub(crate) fn on_tick(&mut self, now: UnixNanos, cfg: &GpuDetectionConfig) {
        let keep = cfg.refused_keep_ms.saturating_mul(MS);
        let mut dropped = 0;
        self.ports.retain(|_, attempts| {
            while attempts
                .front()
                .is_some_and(|t| now >= t.saturating_add(keep))
            {
                attempts.pop_front();
                dropped += 1;
            }
            !attempts.is_empty()
        });
        self.dropped += dropped;
    }

    /// Attempts held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ports.values().map(VecDeque::len).sum()
    }
}

/// What a cold start reports of the attempts refused before its listen: how many came after
/// `since` (the process start, when known), and how long the earliest of them had waited at
/// `listen`.
pub(crate) fn waited(
    attempts: &[UnixNanos],
    since: Option<UnixNanos>,
    listen: Option<UnixNanos>,
) -> (u64, Option<u64>) {
    let since = since.unwrap_or(0);
    let mut kept = attempts.iter().filter(|t| **t >= since);
    let first = kept.clone().min().copied();
    let count = kept.by_ref().count() as u64;
    let wait = first.zip(listen).map(|(f, l)| l.saturating_sub(f));
    (count, wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_listen_takes_the_attempts_before_it_and_leaves_later_ones() {
        let cfg = GpuDetectionConfig::default();
        let mut r = RefusedAttempts::default();
        for t in [1, 2, 3] {
            r.on_refused(8000, t * S, &cfg);
        }
        r.on_refused(9000, 2 * S, &cfg);
        r.on_refused(8000, 5 * S, &cfg);
        assert_eq!(r.take_until(8000, 4 * S), vec![S, 2 * S, 3 * S]);
        assert_eq!(r.take_until(8000, 4 * S), Vec::<u64>::new());
        assert_eq!(r.len(), 2, "port 9000's and the attempt after the listen");
        assert_eq!(r.take_until(7000, 4 * S), Vec::<u64>::new());
    }

    #[test]
    fn the_process_start_bounds_what_counts_and_the_earliest_sets_the_wait() {
        let attempts = [S, 3 * S, 4 * S];
        assert_eq!(
            waited(&attempts, Some(2 * S), Some(10 * S)),
            (2, Some(7 * S))
        );
        assert_eq!(waited(&attempts, None, Some(10 * S)), (3, Some(9 * S)));
        assert_eq!(waited(&attempts, Some(5 * S), Some(10 * S)), (0, None));
        assert_eq!(waited(&[], None, None), (0, None));
    }

    #[test]
    fn attempts_are_bounded_per_port_and_in_ports_and_forgotten_when_old() {
        let cfg = GpuDetectionConfig {
            max_instances: 2,
            ..GpuDetectionConfig::default()
        };
        let mut r = RefusedAttempts::default();
        for i in 0..(MAX_ATTEMPTS_PER_PORT as u64 + 10) {
            r.on_refused(8000, S + i, &cfg);
        }
        assert_eq!(r.len(), MAX_ATTEMPTS_PER_PORT);
        assert_eq!(r.dropped, 10);
        r.on_refused(8001, 2 * S, &cfg);
        // A third port: the one whose latest attempt is oldest (8000) goes.
        r.on_refused(8002, 3 * S, &cfg);
        assert_eq!(r.len(), 2);
        assert_eq!(r.dropped, 10 + MAX_ATTEMPTS_PER_PORT as u64);
        let keep = cfg.refused_keep_ms * MS;
        r.on_tick(2 * S + keep, &cfg);
        assert_eq!(r.len(), 1, "8001's attempt is as old as the keep time");
        assert_eq!(r.seen, MAX_ATTEMPTS_PER_PORT as u64 + 12);
    }
}
