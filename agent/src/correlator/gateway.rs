//! Gateways (SPEC 2.1): the client's request on a watched gateway and the gateway's request to
//! the runtime are two heads on two connections; they are linked by an id both carry, so that
//! an abort is measured from the client's close and says which boundary held the cancel.

use std::net::SocketAddr;

use super::settle::KernelAbort;
use super::tables::{Head, HeadKey, KernelAbortFacts};
use super::{Correlator, Output};
use crate::model::{CloseHow, UnixNanos};

impl Correlator {
    /// Pending heads on other connections (on another local port, when both are known) that
    /// carry one of the head's ids: the same `traceparent` (trace and parent, as a proxy
    /// forwards it), the same `x-request-id`, or a response id in common (SPEC 2 rules 1-3).
    pub(super) fn linked(&self, hk: HeadKey) -> Vec<HeadKey> {
        let Some((conn, head)) = self.tables.head_ref(hk) else {
            return Vec::new();
        };
        let port = conn.local.map(|l| l.port());
        let mut found: Vec<HeadKey> = Vec::new();
        let sets = [
            head.head
                .traceparent
                .and_then(|tp| self.tables.by_trace.get(&tp.trace_id)),
            head.head
                .request_id
                .as_ref()
                .and_then(|id| self.tables.by_request_id.get(id)),
        ]
        .into_iter()
        .flatten()
        .chain(
            head.response_ids
                .iter()
                .filter_map(|id| self.tables.by_response_id.get(id)),
        );
        for set in sets {
            for other in set.iter() {
                if other.1 == hk.1 || found.contains(&other) {
                    continue;
                }
                let Some((oconn, ohead)) = self.tables.head_ref(other) else {
                    continue;
                };
                let other_port = oconn.local.map(|l| l.port());
                if port.is_some() && other_port.is_some() && port == other_port {
                    continue;
                }
                let same_trace = matches!(
                    (head.head.traceparent, ohead.head.traceparent),
                    (Some(a), Some(b)) if a.trace_id == b.trace_id && a.parent_id == b.parent_id
                );
                let same_request_id =
                    head.head.request_id.is_some() && head.head.request_id == ohead.head.request_id;
                let same_response = head
                    .response_ids
                    .iter()
                    .any(|id| ohead.response_ids.contains(id));
                if same_trace || same_request_id || same_response {
                    found.push(other);
                }
            }
        }
        found
    }

    /// The client's request on a gateway that `hk` (read on the runtime) forwards: a linked
    /// head read before it, whose request was still current on its connection when `hk` was
    /// read; the latest such.
    pub(super) fn client_of(&self, hk: HeadKey) -> Option<HeadKey> {
        self.linked(hk)
            .into_iter()
            .filter(|ck| ck.0 <= hk.0 && self.current_at(*ck, hk.0) && self.forwards(*ck, hk))
            .max()
    }

    /// The gateway's request to the runtime that forwards the client's request `hk`.
    pub(super) fn upstream_of(&self, hk: HeadKey) -> Option<HeadKey> {
        self.linked(hk)
            .into_iter()
            .filter(|uk| uk.0 >= hk.0 && self.current_at(hk, uk.0) && self.forwards(hk, *uk))
            .min()
    }

    /// Whether `upstream`'s connection can come from the gateway that read `client`: its peer
    /// is the address the client reached the gateway at (or both are loopback), when the
    /// kernel saw both accepts. Two requests an application sends under one span to two
    /// runtimes carry the same `traceparent`, but come from the application's address, not
    /// from the gateway's.
    fn forwards(&self, client: HeadKey, upstream: HeadKey) -> bool {
        let gateway = self.tables.conns.get(&client.1).and_then(|c| c.local);
        let from = self.tables.conns.get(&upstream.1).and_then(|c| c.peer);
        match (gateway, from) {
            (Some(gateway), Some(from)) => {
                gateway.ip() == from.ip() || (gateway.ip().is_loopback() && from.ip().is_loopback())
            }
            _ => true,
        }
    }

    /// Whether the request read at `hk` was still its connection's current one at `ts`.
    fn current_at(&self, hk: HeadKey, ts: UnixNanos) -> bool {
        self.tables.conns.get(&hk.1).is_some_and(|c| {
            c.requests
                .next_key_after(&hk.0)
                .is_none_or(|next| ts < next)
        })
    }

    /// A client abort through a watched gateway with no runtime span: `t_c` from the client's
    /// connection, `t_g` when the gateway closed its upstream (the runtime saw its peer
    /// leave), `t_s` the runtime's last write after that, else its close.
    #[allow(
        clippy::too_many_arguments,
        reason = "the two sides of one request, taken apart by the caller"
    )]
    pub(super) fn settle_through_gateway(
        &mut self,
        hk: HeadKey,
        head: Head,
        t_c: UnixNanos,
        how: CloseHow,
        upstream: KernelAbortFacts,
        runtime_local: Option<SocketAddr>,
        runtime_pid: Option<u32>,
        out: &mut Vec<Output>,
    ) {
        let t_g = upstream.close.map(|c| c.0.max(t_c));
        let t_s = t_g.and_then(|t_g| {
            upstream
                .last_write
                .filter(|w| *w >= t_g)
                .or(upstream.server_closed.filter(|c| *c >= t_g))
        });
        let tokens_after = if upstream.not_started {
            0
        } else {
            upstream.token_writes
        };
        let in_flight = tokens_after > 0
            || upstream.not_started
            || t_g.is_none()
            || self.exports_spans(runtime_local, runtime_pid);
        if !in_flight {
            return;
        }
        let abort = KernelAbort {
            conn: hk.1.id,
            how,
            t_c,
            t_g,
            t_s,
            tokens_after,
            through_gateway: true,
        };
        let request_id = head
            .head
            .request_id
            .clone()
            .or(head.response_ids.first().cloned());
        self.publish_kernel_abort(abort, head, request_id, out);
    }
}
