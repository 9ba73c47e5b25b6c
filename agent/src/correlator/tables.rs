//! The connection and request-head tables with their indexes: every connection the kernel
//! showed (by kernel address and generation), the request heads read on it, and the indexes
//! the join and the ticks search (by time, trace id, request id, response id, peer, close,
//! first sighting), each bounded. What a table at its cap drops is counted in
//! [`EvictionCounts`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::config::CorrelatorConfig;
use super::index::{KeySet, SortedVecMap};
use crate::model::{CloseHow, ConnId, KernelEvent, KernelEventKind, RequestHead, UnixNanos};

/// The sockets the kernel has had at one address (it reuses them): the latest one's generation
/// and how many generations are still tracked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Generations {
    latest: u32,
    live: u32,
}

/// A connection, told apart from an earlier socket at the same kernel address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ConnKey {
    pub(super) id: ConnId,
    pub(super) generation: u32,
}

impl ConnKey {
    pub(super) const MIN: ConnKey = ConnKey {
        id: ConnId(0),
        generation: 0,
    };
    pub(super) const MAX: ConnKey = ConnKey {
        id: ConnId(u64::MAX),
        generation: u32::MAX,
    };
}

/// A request head: when it was read, and on which connection.
pub(super) type HeadKey = (UnixNanos, ConnKey);

/// A span waiting to settle: when it is due, then its ids (unique).
pub(super) type SpanKey = (UnixNanos, [u8; 16], [u8; 8]);

/// Hash tables keyed by what the network sends (addresses, request ids, trace ids): foldhash,
/// several times cheaper than SipHash per lookup and still seeded per process. Nothing the
/// correlator decides depends on their iteration order.
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// The set of the same kind.
pub(super) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A peer close seen by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClose {
    /// When the peer's FIN or RST arrived.
    pub ts: UnixNanos,
    /// FIN or RST.
    pub how: CloseHow,
}

/// Evictions from full tables, by table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvictionCounts {
    /// Connections evicted (`max_connections`).
    pub connections: u64,
    /// Pending request heads evicted (`max_pending_heads`, `max_heads_per_connection`, or with
    /// their evicted connection).
    pub heads: u64,
    /// Spans settled early because `max_pending_spans` was reached.
    pub spans: u64,
    /// Listening ports not remembered (`max_listeners`).
    pub listeners: u64,
}

/// What the kernel saw of a request's connection after the peer left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KernelAbortFacts {
    /// The first peer close inside the request's interval on the connection.
    pub close: Option<(UnixNanos, CloseHow)>,
    /// Writes after the peer left that look like token chunks.
    pub token_writes: u64,
    /// The last write after the peer left (token or framing).
    pub last_write: Option<UnixNanos>,
    /// The kernel said no response byte had been written when the peer left: the request
    /// was certainly in flight.
    pub not_started: bool,
    /// When the server closed its side of the connection (or the socket closed).
    pub server_closed: Option<UnixNanos>,
}

/// The server closing a connection before its peer left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ServerClose {
    pub(super) ts: UnixNanos,
    /// The closing process.
    pub(super) pid: u32,
    /// Its sends of the response under way, when the kernel counted them.
    pub(super) response_sends: Option<u32>,
}

#[derive(Debug)]
pub(super) struct Head {
    pub(super) pid: Option<u32>,
    pub(super) head: RequestHead,
    /// The response's own ids read from the server's first response bytes (at most
    /// [`MAX_RESPONSE_IDS`]: a response header and a body id).
    pub(super) response_ids: Vec<String>,
    /// Of the response's first sends the kernel read, those that carried no token (its head,
    /// a role-only chunk).
    pub(super) tokenless_sends: u32,
}

/// Response ids kept per request: an `x-request-id` response header and the body's `"id"`.
pub(super) const MAX_RESPONSE_IDS: usize = 2;

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) first_seen: UnixNanos,
    pub(super) last_seen: UnixNanos,
    pub(super) accepted: bool,
    pub(super) local: Option<SocketAddr>,
    pub(super) peer: Option<SocketAddr>,
    pub(super) pid: Option<u32>,
    /// Request boundaries by head time; `Some` while the request waits to settle. Settled
    /// entries stay while an older request still needs them as its end.
    pub(super) requests: SortedVecMap<UnixNanos, Option<Head>>,
    pub(super) peer_closed: Option<PeerClose>,
    /// The server's own close (its FIN, or its release of a socket it reset), when it came
    /// before the peer left.
    pub(super) server_closed: Option<ServerClose>,
    /// The time and send sequence of the latest request head that carried one.
    pub(super) head_send_seq: Option<(UnixNanos, u32)>,
    /// `false` when the kernel said the response had not started when the peer left: the
    /// writes after the close are then a non-streaming body, not one chunk per token.
    pub(super) writes_are_tokens: bool,
    pub(super) token_writes: u64,
    pub(super) last_write: Option<UnixNanos>,
    pub(super) closed: Option<UnixNanos>,
}

impl Conn {
    pub(super) fn new(ts: UnixNanos) -> Self {
        Self {
            first_seen: ts,
            last_seen: ts,
            accepted: false,
            local: None,
            peer: None,
            pid: None,
            requests: SortedVecMap::default(),
            peer_closed: None,
            server_closed: None,
            head_send_seq: None,
            writes_are_tokens: true,
            token_writes: 0,
            last_write: None,
            closed: None,
        }
    }

    pub(super) fn has_pending(&self) -> bool {
        self.requests.values().any(Option::is_some)
    }

    /// The kernel-side end of the request read at `head_ts`: the next head, else the close.
    pub(super) fn request_end(&self, head_ts: UnixNanos) -> Option<UnixNanos> {
        self.requests.next_key_after(&head_ts).or(self.closed)
    }

    /// The peer close and writes after it, when the close fell in this request's interval.
    pub(super) fn abort_facts(&self, head_ts: UnixNanos) -> KernelAbortFacts {
        let end = self.requests.next_key_after(&head_ts);
        match self.peer_closed {
            Some(close) if close.ts >= head_ts && end.is_none_or(|end| close.ts < end) => {
                KernelAbortFacts {
                    close: Some((close.ts, close.how)),
                    token_writes: self.token_writes,
                    last_write: self.last_write,
                    not_started: !self.writes_are_tokens,
                    server_closed: self.closed,
                }
            }
            _ => KernelAbortFacts::default(),
        }
    }

    /// Forgets settled boundaries no pending request needs any more.
    pub(super) fn prune(&mut self) {
        self.requests.remove_leading(Option::is_none);
    }
}

/// The connection and head tables and their indexes.
#[derive(Debug)]
pub(super) struct Tables {
    max_connections: usize,
    max_pending_heads: usize,
    max_heads_per_connection: usize,
    /// Boxed: a connection lives about a second past its close (until its requests settle), so
    /// at 10k requests/s the table holds ~10k of them, and hashbrown's buckets (up to twice
    /// the entries) are pointers instead of ~190-byte connections.
    pub(super) conns: FastMap<ConnKey, Box<Conn>>,
    /// The generation of the socket now at each kernel address, and how many generations at
    /// that address are still in `conns`.
    pub(super) current: FastMap<ConnId, Generations>,
    /// Connections by first sighting, for evicting the oldest, and the candidates for the
    /// idle time-out (a connection first seen within it cannot have been idle that long).
    pub(super) conn_order: BTreeSet<(UnixNanos, ConnKey)>,
    /// Closed connections by close time: the candidates for removal, so that a tick looks at
    /// the connections whose time may have come instead of at all of them (at 10k requests/s
    /// ~10k, each a pointer chase, ten times a second).
    pub(super) closed: BTreeSet<(UnixNanos, ConnKey)>,
    /// Pending heads, by time: the temporal index and the eviction order.
    pub(super) heads: BTreeSet<HeadKey>,
    pub(super) by_trace: FastMap<[u8; 16], KeySet<HeadKey>>,
    pub(super) by_request_id: FastMap<String, KeySet<HeadKey>>,
    pub(super) by_response_id: FastMap<String, KeySet<HeadKey>>,
    pub(super) by_peer: FastMap<SocketAddr, KeySet<ConnKey>>,
    /// Listening port -> the pid that listens.
    pub(super) listeners: BTreeMap<u16, Option<u32>>,
}

impl Tables {
    /// Empty tables with the caps of `config`.
    pub(super) fn new(config: &CorrelatorConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            max_pending_heads: config.max_pending_heads,
            max_heads_per_connection: config.max_heads_per_connection,
            conns: FastMap::default(),
            current: FastMap::default(),
            conn_order: BTreeSet::new(),
            closed: BTreeSet::new(),
            heads: BTreeSet::new(),
            by_trace: FastMap::default(),
            by_request_id: FastMap::default(),
            by_response_id: FastMap::default(),
            by_peer: FastMap::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// Applies what the kernel saw to the connection and head tables: listens, accepts, request
    /// heads, peer closes, writes after them, response ids and closes.
    pub(super) fn on_kernel(
        &mut self,
        event: KernelEvent,
        cfg: &CorrelatorConfig,
        evictions: &mut EvictionCounts,
    ) {
        let ts = event.ts;
        match event.kind {
            KernelEventKind::Listen { port, .. } => {
                if self.listeners.len() >= cfg.max_listeners && !self.listeners.contains_key(&port)
                {
                    evictions.listeners += 1;
                } else {
                    self.listeners.insert(port, event.pid);
                }
            }
            KernelEventKind::Accepted {
                conn, local, peer, ..
            } => {
                let key = self.conn_for_accept(conn, ts, evictions);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.accepted = true;
                    c.local = Some(local);
                    c.peer = Some(peer);
                    c.pid = event.pid.or(c.pid);
                    self.by_peer
                        .entry(peer)
                        .and_modify(|set| set.insert(key))
                        .or_insert(KeySet::One(key));
                }
            }
            KernelEventKind::RequestHead {
                conn,
                head,
                send_seq,
                ..
            } => {
                let key = self.conn_for(conn, ts, evictions);
                if let Some(seq) = send_seq
                    && let Some(c) = self.conns.get_mut(&key)
                    && c.head_send_seq.is_none_or(|(at, _)| at <= ts)
                {
                    c.head_send_seq = Some((ts, seq));
                }
                self.insert_head(key, ts, event.pid, head, evictions);
            }
            KernelEventKind::PeerClosed {
                conn,
                how,
                send_seq,
            } => {
                let key = self.conn_for(conn, ts, evictions);
                if let Some(c) = self.conns.get_mut(&key)
                    && c.peer_closed.is_none_or(|first| ts < first.ts)
                {
                    c.peer_closed = Some(PeerClose { ts, how });
                    // Nothing written since the request's head: the response had not started.
                    let not_started = matches!(
                        (send_seq, c.head_send_seq),
                        (Some(now), Some((head_ts, at_head))) if head_ts <= ts && now == at_head
                    );
                    c.writes_are_tokens = !not_started;
                }
            }
            KernelEventKind::WriteAfterPeerClose { conn, bytes, errno } => {
                let key = self.conn_for(conn, ts, evictions);
                let framing = errno == 0 && cfg.framing_write_bytes.contains(&bytes);
                if let Some(c) = self.conns.get_mut(&key)
                    && (bytes > 0 || errno != 0)
                {
                    if !framing && c.writes_are_tokens {
                        c.token_writes += 1;
                    }
                    c.last_write = Some(c.last_write.map_or(ts, |last| last.max(ts)));
                }
            }
            KernelEventKind::Refused { .. }
            | KernelEventKind::ProcessExit { .. }
            | KernelEventKind::OomVictim => {}
            KernelEventKind::ResponseId {
                conn,
                id,
                tokenless,
            } => {
                let key = self.conn_for(conn, ts, evictions);
                self.on_response_send(key, ts, id, tokenless);
            }
            KernelEventKind::LocalClosed {
                conn,
                response_sends,
            } => {
                let key = self.conn_for(conn, ts, evictions);
                let server = event.pid.map(|pid| ServerClose {
                    ts,
                    pid,
                    response_sends,
                });
                self.on_close(key, ts, server);
            }
            KernelEventKind::Closed { conn } => {
                let key = self.conn_for(conn, ts, evictions);
                self.on_close(key, ts, None);
            }
        }
    }

    /// A close of `key` at `ts`: the socket's, or the server's own (`server`, in the closing
    /// process), which counts as the server closing first when the peer had not left.
    fn on_close(&mut self, key: ConnKey, ts: UnixNanos, server: Option<ServerClose>) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(close) = server
            && c.peer_closed.is_none_or(|p| p.ts > ts)
            && c.server_closed.is_none_or(|earlier| ts < earlier.ts)
        {
            c.server_closed = Some(close);
        }
        let earlier = c.closed;
        if earlier.is_none_or(|earlier| ts < earlier) {
            c.closed = Some(ts);
            if let Some(earlier) = earlier {
                self.closed.remove(&(earlier, key));
            }
            self.closed.insert((ts, key));
        }
    }

    /// The connection now at `id`, created when first seen.
    pub(super) fn conn_for(
        &mut self,
        id: ConnId,
        ts: UnixNanos,
        evictions: &mut EvictionCounts,
    ) -> ConnKey {
        let generation = self.current.get(&id).map_or(0, |g| g.latest);
        let key = ConnKey { id, generation };
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_seen = c.last_seen.max(ts);
        } else {
            self.insert_conn(key, ts, evictions);
        }
        key
    }

    /// An accept at `id`: a new socket when the one known there was already accepted or closed
    /// (the kernel reuses socket addresses).
    pub(super) fn conn_for_accept(
        &mut self,
        id: ConnId,
        ts: UnixNanos,
        evictions: &mut EvictionCounts,
    ) -> ConnKey {
        let key = self.conn_for(id, ts, evictions);
        let reused = self
            .conns
            .get(&key)
            .is_some_and(|c| c.accepted || c.closed.is_some());
        if !reused {
            return key;
        }
        // Older generations may still wait for their requests to settle: the next one is
        // above every generation in the table.
        let next = ConnKey {
            id,
            generation: key.generation.wrapping_add(1),
        };
        if let Some(g) = self.current.get_mut(&id) {
            g.latest = next.generation;
        }
        if !self.conns.contains_key(&next) {
            self.insert_conn(next, ts, evictions);
        }
        next
    }

    pub(super) fn insert_conn(
        &mut self,
        key: ConnKey,
        ts: UnixNanos,
        evictions: &mut EvictionCounts,
    ) {
        while self.conns.len() >= self.max_connections.max(1) {
            let Some((_, oldest)) = self.conn_order.first().copied() else {
                break;
            };
            evictions.connections += 1;
            self.remove_conn(oldest, Some(&mut *evictions));
        }
        self.conns.insert(key, Box::new(Conn::new(ts)));
        self.conn_order.insert((ts, key));
        let g = self.current.entry(key.id).or_insert(Generations {
            latest: key.generation,
            live: 0,
        });
        g.live += 1;
    }

    /// Forgets a connection and its pending heads; `evictions` counts the heads when the
    /// connection was evicted.
    pub(super) fn remove_conn(&mut self, key: ConnKey, mut evictions: Option<&mut EvictionCounts>) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.conn_order.remove(&(conn.first_seen, key));
        if let Some(closed) = conn.closed {
            self.closed.remove(&(closed, key));
        }
        if let Some(peer) = conn.peer
            && let Some(set) = self.by_peer.get_mut(&peer)
            && set.remove(&key)
        {
            self.by_peer.remove(&peer);
        }
        // The address is forgotten with its last generation, not with its current one: a
        // later socket there must not be numbered as an older one still waiting to settle.
        if let Some(g) = self.current.get_mut(&key.id) {
            g.live = g.live.saturating_sub(1);
            if g.live == 0 {
                self.current.remove(&key.id);
            }
        }
        for (ts, head) in conn.requests {
            if let Some(head) = head {
                if let Some(evictions) = evictions.as_deref_mut() {
                    evictions.heads += 1;
                }
                self.unindex_head((ts, key), &head);
            }
        }
    }

    pub(super) fn insert_head(
        &mut self,
        key: ConnKey,
        ts: UnixNanos,
        pid: Option<u32>,
        head: RequestHead,
        evictions: &mut EvictionCounts,
    ) {
        // Per-connection cap: the oldest request on the connection goes first.
        let cap = self.max_heads_per_connection.max(1);
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if conn.requests.len() < cap || conn.requests.contains_key(&ts) {
                break;
            }
            if let Some((old_ts, Some(old))) = conn.requests.pop_first() {
                evictions.heads += 1;
                self.unindex_head((old_ts, key), &old);
            }
        }
        while self.heads.len() >= self.max_pending_heads.max(1) {
            let Some(oldest) = self.heads.first().copied() else {
                break;
            };
            evictions.heads += 1;
            self.take_head(oldest);
        }
        let hk = (ts, key);
        // The same head twice (a replayed event): the later one replaces the earlier.
        let previous = self
            .conns
            .get_mut(&key)
            .and_then(|c| c.requests.get_mut(&ts))
            .and_then(Option::take);
        if let Some(previous) = previous {
            self.unindex_head(hk, &previous);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.pid = conn.pid.or(pid);
        if let Some(tp) = head.traceparent {
            self.by_trace
                .entry(tp.trace_id)
                .and_modify(|set| set.insert(hk))
                .or_insert(KeySet::One(hk));
        }
        if let Some(id) = &head.request_id {
            match self.by_request_id.get_mut(id.as_str()) {
                Some(set) => set.insert(hk),
                None => {
                    self.by_request_id.insert(id.clone(), KeySet::One(hk));
                }
            }
        }
        conn.requests.insert(
            ts,
            Some(Head {
                pid,
                head,
                response_ids: Vec::new(),
                tokenless_sends: 0,
            }),
        );
        self.heads.insert(hk);
    }

    /// Gives the request current on `key` at `ts` (the last head read before it) the response
    /// id the server sent, while it waits to settle.
    /// One of the first sends of the response to the request current on `key` at `ts`: its
    /// id, and whether it carried no token.
    pub(super) fn on_response_send(
        &mut self,
        key: ConnKey,
        ts: UnixNanos,
        id: Option<String>,
        tokenless: bool,
    ) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(head_ts) = conn
            .requests
            .iter()
            .map(|(at, _)| *at)
            .take_while(|at| *at <= ts)
            .last()
        else {
            return;
        };
        let Some(Some(head)) = conn.requests.get_mut(&head_ts) else {
            return;
        };
        head.tokenless_sends += u32::from(tokenless);
        let Some(id) = id else {
            return;
        };
        if head.response_ids.len() >= MAX_RESPONSE_IDS || head.response_ids.contains(&id) {
            return;
        }
        head.response_ids.push(id.clone());
        let hk = (head_ts, key);
        match self.by_response_id.get_mut(id.as_str()) {
            Some(set) => set.insert(hk),
            None => {
                self.by_response_id.insert(id, KeySet::One(hk));
            }
        }
    }

    pub(super) fn unindex_head(&mut self, hk: HeadKey, head: &Head) {
        self.heads.remove(&hk);
        if let Some(tp) = head.head.traceparent
            && let Some(set) = self.by_trace.get_mut(&tp.trace_id)
            && set.remove(&hk)
        {
            self.by_trace.remove(&tp.trace_id);
        }
        if let Some(id) = &head.head.request_id
            && let Some(set) = self.by_request_id.get_mut(id)
            && set.remove(&hk)
        {
            self.by_request_id.remove(id);
        }
        for id in &head.response_ids {
            if let Some(set) = self.by_response_id.get_mut(id)
                && set.remove(&hk)
            {
                self.by_response_id.remove(id);
            }
        }
    }

    /// Removes a pending head from every index and marks it settled on its connection.
    pub(super) fn take_head(&mut self, hk: HeadKey) -> Option<Head> {
        let head = self
            .conns
            .get_mut(&hk.1)
            .and_then(|c| c.requests.get_mut(&hk.0))
            .and_then(Option::take);
        match &head {
            Some(h) => self.unindex_head(hk, h),
            None => {
                self.heads.remove(&hk);
            }
        }
        if let Some(conn) = self.conns.get_mut(&hk.1) {
            conn.prune();
        }
        head
    }

    pub(super) fn head_ref(&self, hk: HeadKey) -> Option<(&Conn, &Head)> {
        let conn = self.conns.get(&hk.1)?;
        let head = conn.requests.get(&hk.0)?.as_ref()?;
        Some((conn, head))
    }

    /// The last thing the kernel saw of the request read at `hk` (its end, the peer's close,
    /// the last write after it), never before the head itself.
    pub(super) fn head_quiet(&self, hk: HeadKey) -> Option<UnixNanos> {
        let conn = self.conns.get(&hk.1)?;
        let facts = conn.abort_facts(hk.0);
        [
            conn.request_end(hk.0),
            facts.close.map(|c| c.0),
            facts.last_write,
        ]
        .into_iter()
        .flatten()
        .max()
        .map(|quiet| quiet.max(hk.0))
    }

    /// Forgets the connections with nothing pending that closed `settle_delay` ago or saw no
    /// event for `idle`. The candidates come from the two time-ordered indexes; a
    /// closed connection that still has a request pending stays a candidate until it settles.
    pub(super) fn expire_connections(
        &mut self,
        now: UnixNanos,
        settle_delay: UnixNanos,
        idle: UnixNanos,
    ) {
        let closed_before = now.checked_sub(settle_delay);
        let idle_since = now.checked_sub(idle);
        let closed = closed_before
            .into_iter()
            .flat_map(|before| self.closed.range(..=(before, ConnKey::MAX)));
        let conns = &self.conns;
        let idle = idle_since.into_iter().flat_map(|since| {
            self.conn_order
                .range(..=(since, ConnKey::MAX))
                .filter(move |(_, key)| conns.get(key).is_some_and(|c| c.last_seen <= since))
        });
        let done: Vec<ConnKey> = closed
            .chain(idle)
            .map(|(_, key)| *key)
            .filter(|key| conns.get(key).is_some_and(|c| !c.has_pending()))
            .collect();
        for key in done {
            self.remove_conn(key, None);
        }
    }
}
