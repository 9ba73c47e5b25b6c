//! Settling: a runtime span, joined or not, into its `Joined` output with the client abort
//! it shows; a head no span claimed into a client abort found from the kernel alone, or a
//! request lost in flight (contract §3.1, §3.5). The gateway's two-head case is in
//! `gateway.rs`.

use super::abort::{self, AbortFinding, ClientAbort, TokenCountMethod};
use super::join::{Claims, ConnectionFacts, JoinRule, JoinedRequest};
use super::lost::LostInFlightFinding;
use super::tables::{ConnKey, Head, HeadKey, PeerClose};
use super::{Correlator, Output};
use crate::model::{CloseHow, ConnId, RuntimeRequest, UnixNanos};

impl Correlator {
    /// Emits a settled span: joined to the head `matched` names, else as `unjoined`
    /// ([`JoinRule::Unjoined`] or [`JoinRule::Ambiguous`]); with the client abort it shows,
    /// and its finding when it makes one.
    pub(super) fn finish_span(
        &mut self,
        span: Box<RuntimeRequest>,
        matched: Option<(JoinRule, HeadKey)>,
        unjoined: JoinRule,
        early: bool,
        out: &mut Vec<Output>,
    ) {
        let joined = matched.and_then(|(rule, hk)| {
            let client = self.client_of(hk);
            let (conn, _) = self.tables.head_ref(hk)?;
            let facts = conn.abort_facts(hk.0);
            let (local, peer, conn_pid) = (conn.local, conn.peer, conn.pid);
            let head = self.tables.take_head(hk)?;
            // Through a watched gateway, the client's own request on it (SPEC 2.1).
            let client = client.and_then(|ck| {
                let cfacts = self.tables.conns.get(&ck.1)?.abort_facts(ck.0);
                let chead = self.tables.take_head(ck)?;
                Some((ck, chead, cfacts))
            });
            Some((rule, hk, head, facts, local, peer, conn_pid, client))
        });
        let Some((rule, hk, head, facts, local, peer, conn_pid, client)) = joined else {
            self.stats.joins.record(unjoined);
            self.kv.on_request(&span, None, &mut self.stats.kv_eviction);
            out.push(Output::Joined(JoinedRequest {
                request: span,
                join: unjoined,
                connection: None,
                settled_early: early,
                client_trace: None,
            }));
            return;
        };
        self.stats.joins.record(rule);
        if let Some(pid) = head.pid.or(conn_pid) {
            self.procs.on_span_sender(
                pid,
                span.end,
                &self.config.lost_in_flight,
                &mut self.stats.lost_in_flight,
            );
        }
        // vLLM's span names no model: the request body's `"model"` stands in (contract §1.2).
        let mut span = span;
        if span.model.is_none() {
            span.model = head.head.model.clone();
        }
        if let Some(port) = local.map(|l| l.port()) {
            self.note_span_port(port);
        }
        let lag_threshold = self.config.abort_lag_finding();
        // A root runtime span in a trace of its own behind a gateway that dropped the client's
        // traceparent moves into the client's trace, under the client's span.
        let client_trace = client
            .as_ref()
            .and_then(|(_, chead, _)| chead.head.traceparent)
            .filter(|tp| span.parent_span_id.is_none() && tp.trace_id != span.trace_id);
        let through_gateway = client
            .as_ref()
            .and_then(|(ck, chead, cfacts)| cfacts.close.map(|close| (ck, chead, close)));
        let measured = if let Some((ck, chead, (t_c, how))) = through_gateway {
            // The client left the gateway at t_c; the runtime saw its peer (the gateway) leave
            // at t_g, or never (a gateway that drains the stream). Tokens count from t_c: the
            // kernel's writes after t_g would miss those between, so events or interpolation.
            let t_g = facts.close.map(|c| c.0.max(t_c));
            abort::tokens_after_with_span(&span, t_c, 0).map(|(tokens_after, total, method)| {
                let lag_ns = span.end - t_c;
                let abort = ClientAbort {
                    conn: ck.1.id,
                    how,
                    model: span.model.clone(),
                    t_c,
                    t_g,
                    t_s: Some(span.end),
                    tokens_after,
                    finding: abort::makes_finding(tokens_after, lag_ns, lag_threshold),
                };
                // In the client's trace: the traceparent it sent the gateway, when any.
                let client_tp = chead.head.traceparent;
                let finding = abort.finding.then(|| AbortFinding {
                    trace_id: Some(client_tp.map_or(span.trace_id, |tp| tp.trace_id)),
                    // Under the runtime span, in the client's trace when it moves there; under
                    // the client's span when the runtime span stays in a trace of its own.
                    parent_span_id: Some(match client_tp {
                        Some(tp) if tp.trace_id != span.trace_id && client_trace.is_none() => {
                            tp.parent_id
                        }
                        _ => span.span_id,
                    }),
                    request_id: span.request_id.clone().or(head.head.request_id.clone()),
                    tokens_after,
                    tokens_total: Some(total),
                    method,
                    lag_ns,
                    how,
                    t_c,
                    t_s: span.end,
                    t_s_from_span: true,
                    conn: ck.1.id,
                    tenant: span
                        .tenant
                        .clone()
                        .or(chead.head.tenant.clone())
                        .or(head.head.tenant.clone()),
                    model: span.model.clone(),
                    join: rule,
                    t_g,
                    stalled_at: Some(abort::stalled_at(t_c, t_g, span.end)),
                });
                (abort, finding)
            })
        } else {
            facts.close.and_then(|(t_c, how)| {
                let (tokens_after, tokens_total, method) =
                    abort::tokens_after_with_span(&span, t_c, facts.token_writes)?;
                let lag_ns = span.end - t_c;
                let abort = ClientAbort {
                    conn: hk.1.id,
                    how,
                    model: span.model.clone(),
                    t_c,
                    t_g: None,
                    t_s: Some(span.end),
                    tokens_after,
                    finding: abort::makes_finding(tokens_after, lag_ns, lag_threshold),
                };
                let finding = abort.finding.then(|| AbortFinding {
                    trace_id: Some(span.trace_id),
                    parent_span_id: Some(span.span_id),
                    request_id: span.request_id.clone().or(head.head.request_id.clone()),
                    tokens_after,
                    tokens_total: Some(tokens_total),
                    method,
                    lag_ns: span.end - t_c,
                    how,
                    t_c,
                    t_s: span.end,
                    t_s_from_span: true,
                    conn: hk.1.id,
                    tenant: span.tenant.clone().or(head.head.tenant.clone()),
                    model: span.model.clone(),
                    join: rule,
                    t_g: None,
                    stalled_at: None,
                });
                Some((abort, finding))
            })
        };
        let connection = ConnectionFacts {
            conn: hk.1.id,
            local,
            peer,
            pid: head.pid.or(conn_pid),
            head_ts: hk.0,
            head: head.head,
            peer_closed: facts.close.map(|(ts, how)| PeerClose { ts, how }),
            token_writes_after_close: if facts.close.is_some() {
                facts.token_writes
            } else {
                0
            },
        };
        self.kv
            .on_request(&span, Some(&connection), &mut self.stats.kv_eviction);
        out.push(Output::Joined(JoinedRequest {
            request: span,
            join: rule,
            connection: Some(connection),
            settled_early: early,
            client_trace,
        }));
        if let Some((abort, finding)) = measured {
            self.stats.findings.record_client_abort(abort.finding);
            out.push(Output::ClientAbort(abort));
            if let Some(finding) = finding {
                self.stats
                    .findings
                    .record_abort(finding.how, finding.tokens_after, true);
                out.push(Output::Abort(finding));
            }
        }
    }

    /// Heads no span claimed: settle them `span_wait` after the kernel saw them end, or drop
    /// them when they never end.
    pub(super) fn settle_heads(
        &mut self,
        now: UnixNanos,
        claims: &mut Claims,
        out: &mut Vec<Output>,
    ) {
        let span_wait = self.config.span_wait();
        let max_age = self.config.max_request_age();
        let mut settle = Vec::new();
        let mut expire = Vec::new();
        // A head settles `span_wait` after the last thing the kernel saw of it, which is never
        // before the head itself, or expires `max_age` after it: the heads read since the
        // earlier of the two cannot be due, and are most of them.
        let newest_due = now.saturating_sub(span_wait.min(max_age));
        for hk in self.tables.heads.range(..=(newest_due, ConnKey::MAX)) {
            if claims.heads.contains_key(hk) {
                continue;
            }
            match self.tables.head_quiet(*hk) {
                Some(quiet) if now >= quiet.saturating_add(span_wait) => settle.push(*hk),
                _ if now >= hk.0.saturating_add(max_age) => expire.push(*hk),
                _ => {}
            }
        }
        if !claims.complete && (!settle.is_empty() || !expire.is_empty()) {
            // A head a waiting span names by an exact rule waits for that span.
            self.claim_rest(claims);
            settle.retain(|hk| !claims.heads.contains_key(hk));
            expire.retain(|hk| !claims.heads.contains_key(hk));
        }
        for hk in expire {
            self.stats.expired_heads += 1;
            self.tables.take_head(hk);
        }
        for hk in settle {
            // Through a watched gateway (SPEC 2.1) the request is two heads: the client's on
            // the gateway and the gateway's on the runtime. The client's settles both, once
            // both are due; the gateway's waits for it.
            if self.client_of(hk).is_some() {
                continue;
            }
            let upstream = self.upstream_of(hk);
            if let Some(uk) = upstream {
                let due = self
                    .tables
                    .head_quiet(uk)
                    .is_some_and(|quiet| now >= quiet.saturating_add(span_wait));
                if claims.heads.contains_key(&uk) || !due {
                    continue;
                }
            }
            let Some(conn) = self.tables.conns.get(&hk.1) else {
                continue;
            };
            let facts = conn.abort_facts(hk.0);
            let server_close = conn.server_closed.filter(|close| {
                close.ts >= hk.0
                    && conn
                        .requests
                        .next_key_after(&hk.0)
                        .is_none_or(|next| close.ts < next)
                    && conn.peer_closed.is_none_or(|p| p.ts > close.ts)
            });
            let (mut local, mut conn_pid) = (conn.local, conn.pid);
            let Some(head) = self.tables.take_head(hk) else {
                continue;
            };
            self.stats.unjoined_heads += 1;
            if let Some(close) = server_close {
                let pid = close.pid;
                match self.procs.cause(pid, close.ts, &self.config.lost_in_flight) {
                    Some((cause, exit_code, signal, lost_at)) => {
                        let tp = head.head.traceparent;
                        self.stats.lost_in_flight.findings += 1;
                        out.push(Output::LostInFlight(LostInFlightFinding {
                            trace_id: tp.map(|tp| tp.trace_id),
                            parent_span_id: tp.map(|tp| tp.parent_id),
                            request_id: head.head.request_id,
                            conn: hk.1.id,
                            pid,
                            cause,
                            exit_code,
                            signal,
                            started: hk.0,
                            lost_at: lost_at.max(hk.0),
                            // The response's sends less those that carried no token: one
                            // SSE write per token after them (the kernel_writes convention).
                            tokens_delivered: close
                                .response_sends
                                .map(|sends| u64::from(sends.saturating_sub(head.tokenless_sends))),
                            model: head.head.model,
                            tenant: head.head.tenant,
                        }));
                    }
                    None => self.stats.lost_in_flight.ambiguous += 1,
                }
                continue;
            }
            // The runtime side: the upstream's facts when there is one.
            let mut hop = None;
            if let Some(uk) = upstream
                && let Some(uconn) = self.tables.conns.get(&uk.1)
            {
                let ufacts = uconn.abort_facts(uk.0);
                (local, conn_pid) = (uconn.local, uconn.pid);
                if let Some(uhead) = self.tables.take_head(uk) {
                    self.stats.unjoined_heads += 1;
                    conn_pid = uhead.pid.or(conn_pid);
                    hop = Some(ufacts);
                }
            }
            let Some((t_c, how)) = facts.close else {
                continue;
            };
            if let Some(ufacts) = hop {
                self.settle_through_gateway(hk, head, t_c, how, ufacts, local, conn_pid, out);
                continue;
            }
            // Without a span, the request was in flight when the client left if the server
            // wrote token chunks after it, if no response byte had been written yet, or if
            // the runtime on this port exports spans and exported none for it (vLLM drops
            // the span of a request aborted because its client left). A client that hung up
            // after a complete response on a port with no spans at all is not an abort.
            let exports_spans = self.exports_spans(local, head.pid.or(conn_pid));
            if facts.token_writes == 0 && !facts.not_started && !exports_spans {
                continue;
            }
            // Runtime stop: the last write after the peer left, else the server's close. The
            // kernel reports a write only once the peer had left, but a write racing the FIN
            // can carry a timestamp a hair before the FIN's (the sender's clock read against
            // the softirq's): it is at t_c, not a reason to fall back to the server's close.
            let t_s = facts
                .last_write
                .map(|w| w.max(t_c))
                .or(facts.server_closed.filter(|c| *c >= t_c));
            let tokens_after = if facts.not_started {
                0
            } else {
                facts.token_writes
            };
            let abort = KernelAbort {
                conn: hk.1.id,
                how,
                t_c,
                t_g: None,
                t_s,
                tokens_after,
                through_gateway: false,
            };
            let request_id = head.head.request_id.clone();
            self.publish_kernel_abort(abort, head, request_id, out);
        }
    }

    /// Counts a client abort the kernel alone measured (no runtime span for it) and, when it
    /// makes one, its `kernel_writes` finding in the client's trace (its `traceparent`).
    pub(super) fn publish_kernel_abort(
        &mut self,
        a: KernelAbort,
        head: Head,
        request_id: Option<String>,
        out: &mut Vec<Output>,
    ) {
        let stop = a.t_s.or(a.t_g).unwrap_or(a.t_c);
        let lag_ns = stop.saturating_sub(a.t_c);
        let abort = ClientAbort {
            conn: a.conn,
            how: a.how,
            model: None,
            t_c: a.t_c,
            t_g: a.t_g,
            t_s: a.t_s,
            tokens_after: a.tokens_after,
            finding: abort::makes_finding(a.tokens_after, lag_ns, self.config.abort_lag_finding()),
        };
        self.stats.findings.record_client_abort(abort.finding);
        let finding = abort.finding.then(|| {
            let tp = head.head.traceparent;
            AbortFinding {
                trace_id: tp.map(|tp| tp.trace_id),
                parent_span_id: tp.map(|tp| tp.parent_id),
                request_id,
                tokens_after: a.tokens_after,
                tokens_total: None,
                method: TokenCountMethod::KernelWrites,
                lag_ns,
                how: a.how,
                t_c: a.t_c,
                t_s: stop,
                t_s_from_span: false,
                conn: a.conn,
                tenant: head.head.tenant,
                model: None,
                join: JoinRule::Unjoined,
                t_g: a.t_g,
                stalled_at: a
                    .through_gateway
                    .then(|| abort::stalled_at(a.t_c, a.t_g, stop)),
            }
        });
        out.push(Output::ClientAbort(abort));
        if let Some(finding) = finding {
            self.stats
                .findings
                .record_abort(a.how, finding.tokens_after, false);
            out.push(Output::Abort(finding));
        }
    }
}

/// A client abort as the kernel alone measured it.
pub(super) struct KernelAbort {
    pub(super) conn: ConnId,
    pub(super) how: CloseHow,
    /// The client's close.
    pub(super) t_c: UnixNanos,
    /// The gateway's close of its upstream, through a watched gateway.
    pub(super) t_g: Option<UnixNanos>,
    /// The runtime's stop: its last write after the peer left, else its close.
    pub(super) t_s: Option<UnixNanos>,
    pub(super) tokens_after: u64,
    /// Through a watched gateway: the finding names the boundary that held the cancel.
    pub(super) through_gateway: bool,
}
