//! Requests lost in flight (contract §3.5): the runtime's process exited, or the server closed
//! the client's connection, while a request on it was mid-response.
//!
//! # Evidence
//! - The server closed the connection first: a `LocalClosed` by the server's process (its FIN,
//!   or the release of a socket it reset) while the request was current on it and before the
//!   peer left. A client that leaves first is an abort (§3.1), never a loss.
//! - No runtime span claimed the request before it settled (`span_wait_ms` after its end): a
//!   span is the runtime saying it finished the request.
//! - The cause:
//!   - the closing process exited at most `exit_close_window_ms` before the close (the kernel
//!     closes a dying process's files right after `sched_process_exit`): `oom_kill` when the
//!     OOM killer had chosen it or one of its children, else `signal` when a signal killed it,
//!     else `exit`;
//!   - no such exit, and the process is a runtime that sends request spans (so the missing
//!     span means the runtime never finished the request): `oom_kill` when one of its
//!     children was an OOM victim within `oom_child_window_ms` before the close, else
//!     `server_close`.
//!   - otherwise the evidence is ambiguous (a runtime without spans that closes after a complete
//!     response, `Connection: close`, looks the same): no finding, counted.
//! - A graceful drain makes none: the runtime finishes its requests (their spans claim them)
//!   and closes before it exits, so no close follows an exit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{ConnId, UnixNanos};

const MS: u64 = 1_000_000;

/// Settings of the lost-in-flight detection (`[correlator.lost_in_flight]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LostInFlightConfig {
    /// A server-side close at most this long after its process's exit was caused by it.
    pub exit_close_window_ms: u64,
    /// An OOM kill of one of the server's children at most this long before the close or the
    /// exit is its cause (vLLM's engine core is the API server's child).
    pub oom_child_window_ms: u64,
    /// Most process exits, OOM victims and server processes remembered (each table).
    pub max_processes: usize,
}

impl Default for LostInFlightConfig {
    fn default() -> Self {
        Self {
            exit_close_window_ms: 1_000,
            oom_child_window_ms: 30_000,
            max_processes: 4096,
        }
    }
}

/// Why a request was lost (`inferwatch.lost.cause`, the `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostCause {
    /// The runtime's process exited (its own `exit()`).
    Exit,
    /// A signal killed it (SIGKILL, SIGTERM without a handler, ...).
    Signal,
    /// The kernel's OOM killer killed it or one of its children.
    OomKill,
    /// It closed or reset the connection while alive, without finishing the request.
    ServerClose,
}

impl LostCause {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LostCause::Exit => "exit",
            LostCause::Signal => "signal",
            LostCause::OomKill => "oom_kill",
            LostCause::ServerClose => "server_close",
        }
    }
}

/// One request lost in flight: the `inferwatch.lost_in_flight` span and one count of
/// `inferwatch_lost_in_flight_total{cause,model}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostInFlightFinding {
    /// The request's trace (its `traceparent`), when it had one.
    pub trace_id: Option<[u8; 16]>,
    /// The client's span, when known.
    pub parent_span_id: Option<[u8; 8]>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// The connection.
    pub conn: ConnId,
    /// The server process that closed it.
    pub pid: u32,
    /// Why.
    pub cause: LostCause,
    /// The process's exit status (wait status), for `exit`, `signal` and an `oom_kill` of the
    /// process itself.
    pub exit_code: Option<u32>,
    /// The signal that killed it, when one did.
    pub signal: Option<u32>,
    /// When the request's head was read.
    pub started: UnixNanos,
    /// When it was lost: the exit, else the server's close.
    pub lost_at: UnixNanos,
    /// Output tokens the server had sent the client, when the kernel counted the response's
    /// sends (a span never comes for a lost request): its sends while the client was there,
    /// less those of its first ones that carried no token (the response head, a role-only
    /// chunk); one SSE write per token after them. A runtime that puts several tokens in one
    /// chunk makes this a lower bound.
    pub tokens_delivered: Option<u64>,
    /// The model (request body), when read.
    pub model: Option<String>,
    /// The tenant header, when sent.
    pub tenant: Option<String>,
}

impl LostInFlightFinding {
    /// How long the request had run, nanoseconds.
    pub fn ran_ns(&self) -> u64 {
        self.lost_at.saturating_sub(self.started)
    }
}

/// Counters of the detection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LostInFlightStats {
    /// Findings, all causes.
    pub findings: u64,
    /// Requests the server closed first without a span, with no exit and from a process that
    /// sends no spans: no finding (ambiguous).
    pub ambiguous: u64,
    /// Process exits received.
    pub process_exits: u64,
    /// Of those, exits of processes that are neither a server nor a server's child: forgotten
    /// at the first tick `settle_delay_ms` after them.
    pub process_exits_ignored: u64,
    /// OOM victims received.
    pub oom_victims: u64,
    /// Entries dropped because a table was full.
    pub evictions: u64,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    ts: UnixNanos,
    exit_code: u32,
    parent: u32,
}

/// Process exits, OOM victims and the server processes they matter for.
#[derive(Debug, Default)]
pub(crate) struct ProcessTracker {
    exits: BTreeMap<u32, Exit>,
    oom: BTreeMap<u32, UnixNanos>,
    /// Processes that listen on or read from watched connections, by last sighting.
    servers: BTreeMap<u32, UnixNanos>,
    /// Servers whose request spans arrived (a missing span then means something).
    span_senders: BTreeMap<u32, UnixNanos>,
}

fn insert_bounded<V>(
    map: &mut BTreeMap<u32, V>,
    key: u32,
    value: V,
    max: usize,
    age: impl Fn(&V) -> UnixNanos,
    stats: &mut LostInFlightStats,
) {
    if !map.contains_key(&key) && map.len() >= max.max(1) {
        let oldest = map
            .iter()
            .min_by_key(|(k, v)| (age(v), **k))
            .map(|(k, _)| *k);
        if let Some(oldest) = oldest {
            map.remove(&oldest);
            stats.evictions += 1;
        }
    }
    map.insert(key, value);
}

impl ProcessTracker {
    /// A process seen serving a watched port (listen, request head, close).
    pub(crate) fn on_server(
        &mut self,
        pid: u32,
        ts: UnixNanos,
        cfg: &LostInFlightConfig,
        stats: &mut LostInFlightStats,
    ) {
        let last = self.servers.get(&pid).copied().unwrap_or(0).max(ts);
        insert_bounded(
            &mut self.servers,
            pid,
            last,
            cfg.max_processes,
            |t| *t,
            stats,
        );
    }

    /// A server whose request span was joined.
    pub(crate) fn on_span_sender(
        &mut self,
        pid: u32,
        ts: UnixNanos,
        cfg: &LostInFlightConfig,
        stats: &mut LostInFlightStats,
    ) {
        let last = self.span_senders.get(&pid).copied().unwrap_or(0).max(ts);
        insert_bounded(
            &mut self.span_senders,
            pid,
            last,
            cfg.max_processes,
            |t| *t,
            stats,
        );
    }

    pub(crate) fn on_exit(
        &mut self,
        pid: u32,
        parent: u32,
        exit_code: u32,
        ts: UnixNanos,
        cfg: &LostInFlightConfig,
        stats: &mut LostInFlightStats,
    ) {
        stats.process_exits += 1;
        let exit = Exit {
            ts,
            exit_code,
            parent,
        };
        insert_bounded(
            &mut self.exits,
            pid,
            exit,
            cfg.max_processes,
            |e| e.ts,
            stats,
        );
    }

    pub(crate) fn on_oom_victim(
        &mut self,
        pid: u32,
        ts: UnixNanos,
        cfg: &LostInFlightConfig,
        stats: &mut LostInFlightStats,
    ) {
        stats.oom_victims += 1;
        insert_bounded(&mut self.oom, pid, ts, cfg.max_processes, |t| *t, stats);
    }

    /// Whether the OOM killer chose `pid` itself, or one of its children, in `[from, to]`.
    fn oom_in(&self, pid: u32, from: UnixNanos, to: UnixNanos) -> bool {
        let within = |t: UnixNanos| from <= t && t <= to;
        self.oom.get(&pid).is_some_and(|t| within(*t))
            || self.oom.iter().any(|(victim, t)| {
                within(*t) && self.exits.get(victim).is_some_and(|e| e.parent == pid)
            })
    }

    /// The cause of a close of a connection by `pid` at `t_close`, with the exit status and
    /// signal and the time of the loss; `None` when the evidence does not say.
    pub(crate) fn cause(
        &self,
        pid: u32,
        t_close: UnixNanos,
        cfg: &LostInFlightConfig,
    ) -> Option<(LostCause, Option<u32>, Option<u32>, UnixNanos)> {
        let child_window = cfg.oom_child_window_ms.saturating_mul(MS);
        if let Some(exit) = self.exits.get(&pid).copied()
            && exit.ts <= t_close
            && t_close
                <= exit
                    .ts
                    .saturating_add(cfg.exit_close_window_ms.saturating_mul(MS))
        {
            let signal = exit.exit_code & 0x7f;
            let cause = if self.oom_in(pid, exit.ts.saturating_sub(child_window), exit.ts) {
                LostCause::OomKill
            } else if signal != 0 {
                LostCause::Signal
            } else {
                LostCause::Exit
            };
            return Some((
                cause,
                Some(exit.exit_code),
                (signal != 0).then_some(signal),
                exit.ts,
            ));
        }
        if !self.span_senders.contains_key(&pid) {
            return None;
        }
        let cause = if self.oom_in(pid, t_close.saturating_sub(child_window), t_close) {
            LostCause::OomKill
        } else {
            LostCause::ServerClose
        };
        Some((cause, None, None, t_close))
    }

    /// Forgets exits, victims and servers older than `keep_ns`, and the exits older than
    /// `settled_ns` of processes that are neither a server nor a server's child (the node's
    /// shells and probes; only servers and their children, such as an OOM-killed engine core,
    /// matter). Decided at a tick, when the events before it have arrived, not when the exit
    /// arrives: the exits come on their own ring, not in order with the socket events.
    pub(crate) fn on_tick(
        &mut self,
        now: UnixNanos,
        keep_ns: u64,
        settled_ns: u64,
        stats: &mut LostInFlightStats,
    ) {
        let fresh = |t: UnixNanos| now < t.saturating_add(keep_ns);
        let servers = &self.servers;
        self.exits.retain(|pid, e| {
            let unrelated = !servers.contains_key(pid) && !servers.contains_key(&e.parent);
            if unrelated && now >= e.ts.saturating_add(settled_ns) {
                stats.process_exits_ignored += 1;
                return false;
            }
            true
        });
        self.exits.retain(|_, e| fresh(e.ts));
        self.oom.retain(|_, t| fresh(*t));
        self.servers.retain(|_, t| fresh(*t));
        self.span_senders.retain(|_, t| fresh(*t));
    }

    pub(crate) fn sizes(&self) -> usize {
        self.exits.len() + self.oom.len() + self.servers.len() + self.span_senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn tracker() -> (ProcessTracker, LostInFlightConfig, LostInFlightStats) {
        let cfg = LostInFlightConfig::default();
        let mut stats = LostInFlightStats::default();
        let mut t = ProcessTracker::default();
        t.on_server(100, 0, &cfg, &mut stats);
        (t, cfg, stats)
    }

    #[test]
    fn a_close_right_after_the_exit_is_caused_by_it() {
        let (mut t, cfg, mut stats) = tracker();
        t.on_exit(100, 1, 9, 10 * S, &cfg, &mut stats);
        assert_eq!(
            t.cause(100, 10 * S + 1_000, &cfg),
            Some((LostCause::Signal, Some(9), Some(9), 10 * S))
        );
        // exit(1): status 1 << 8, no signal.
        t.on_exit(100, 1, 1 << 8, 20 * S, &cfg, &mut stats);
        assert_eq!(
            t.cause(100, 20 * S + 1_000, &cfg),
            Some((LostCause::Exit, Some(256), None, 20 * S))
        );
        // A signal with a core dump (0x80) is still that signal.
        t.on_exit(100, 1, 0x80 | 11, 30 * S, &cfg, &mut stats);
        assert_eq!(
            t.cause(100, 30 * S, &cfg).map(|c| (c.0, c.2)),
            Some((LostCause::Signal, Some(11)))
        );
    }

    #[test]
    fn a_close_before_the_exit_or_long_after_it_is_not_caused_by_it() {
        let (mut t, cfg, mut stats) = tracker();
        t.on_exit(100, 1, 0, 10 * S, &cfg, &mut stats);
        // A drain closes before it exits; the process sent no spans: ambiguous.
        assert_eq!(t.cause(100, 10 * S - 1, &cfg), None);
        let late = 10 * S + cfg.exit_close_window_ms * 1_000_000 + 1;
        assert_eq!(t.cause(100, late, &cfg), None);
        // The same close from a process that sends spans: the runtime closed it alive.
        t.on_span_sender(100, 0, &cfg, &mut stats);
        assert_eq!(
            t.cause(100, late, &cfg).map(|c| c.0),
            Some(LostCause::ServerClose)
        );
    }

    #[test]
    fn an_oom_kill_of_the_process_or_its_child_is_the_cause() {
        let (mut t, cfg, mut stats) = tracker();
        t.on_oom_victim(100, 10 * S, &cfg, &mut stats);
        t.on_exit(100, 1, 9, 10 * S + 1, &cfg, &mut stats);
        assert_eq!(
            t.cause(100, 10 * S + 2, &cfg).map(|c| c.0),
            Some(LostCause::OomKill)
        );
        // Instance 200: its child 201 (an engine core) is the victim; 200 then closes alive.
        t.on_server(200, 0, &cfg, &mut stats);
        t.on_span_sender(200, 0, &cfg, &mut stats);
        t.on_oom_victim(201, 20 * S, &cfg, &mut stats);
        t.on_exit(201, 200, 9, 20 * S + 1, &cfg, &mut stats);
        assert_eq!(
            t.cause(200, 21 * S, &cfg).map(|c| c.0),
            Some(LostCause::OomKill)
        );
        // Outside the window the child's OOM kill is not the cause.
        let later = 20 * S + cfg.oom_child_window_ms * 1_000_000 + 1;
        assert_eq!(
            t.cause(200, later, &cfg).map(|c| c.0),
            Some(LostCause::ServerClose)
        );
    }

    #[test]
    fn exits_of_unrelated_processes_are_forgotten_at_a_tick_and_tables_are_bounded() {
        let (mut t, mut cfg, mut stats) = tracker();
        t.on_exit(555, 1, 0, S, &cfg, &mut stats);
        t.on_exit(556, 100, 9, S, &cfg, &mut stats);
        t.on_tick(2 * S, u64::MAX, S / 4, &mut stats);
        assert_eq!(stats.process_exits, 2);
        assert_eq!(stats.process_exits_ignored, 1, "the server's child stays");
        cfg.max_processes = 2;
        for pid in 1000..1010 {
            t.on_oom_victim(pid, S + u64::from(pid), &cfg, &mut stats);
        }
        assert!(t.oom.len() <= 2);
        assert_eq!(stats.evictions, 8);
    }
}
