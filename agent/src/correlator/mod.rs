//! The sans-IO correlator: joins kernel events and runtime spans per request and returns
//! findings (contract §2, §3.1).
//!
//! No clock, socket, task or file inside: time comes from the events' timestamps and from
//! [`Correlator::on_tick`]. The same inputs give the same outputs whatever their order, as long
//! as the events of one connection keep their order and ticks come after the events they
//! settle: nothing is decided when an input arrives (except when a full table forces it), only
//! when a tick finds a span or a request due, and the decision is a function of the stored
//! state alone, taken in a fixed order.
//!
//! # How a request flows
//! - A `RequestHead` starts a request on its connection; a later head on the same connection
//!   (keep-alive) or the connection's close ends it. Peer closes and writes after the peer left
//!   belong to the request current at the peer close.
//! - A runtime span waits until `end + settle delay`, then the exact rules (traceparent,
//!   request id, client address) try to join it, each picking the candidate closest in time to
//!   the span's arrival: every head they can give it was read before its end. A span they do
//!   not join waits on until `max(end, arrival + temporal window) + settle delay` and then
//!   tries them again before the temporal rule. It is emitted as a [`JoinedRequest`], with an
//!   [`AbortFinding`] when the client left while the runtime worked. The spans of an instance
//!   whose cold start is undecided wait that long even when joined (see `on_tick`). Spans
//!   therefore settle in the order of their ends when exact rules join them; two turns of one
//!   conversation keep their order unless the earlier one waits for a guess and the later one
//!   does not.
//! - A head no span claimed settles `span_wait_ms` after the kernel saw it end: when the peer
//!   left and the server kept writing, that is an abort found from the kernel alone.
//!
//! # Instance matching (temporal rule)
//! A span's instance is its `process.pid`. When a `Listen` event named that pid, only heads on
//! connections accepted by that pid or on one of its listening ports are candidates; when the
//! pid is unknown to the kernel side (no pid in the span, or a pid namespace the kernel does not
//! see), every head on the node is a candidate, which is right on a node with one runtime.
//! Client-address and temporal joins never take a head whose identifiers contradict the span
//! (another propagated trace, or another vLLM request id).

mod abort;
mod cold_start;
mod config;
mod contention;
mod index;
mod join;
mod kv_eviction;
mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

pub use abort::{AbortFinding, TokenCountMethod};
pub use cold_start::{ColdStartFinding, ColdStartPhase, StartKind};
pub use config::CorrelatorConfig;
pub use contention::{
    AffectedRequest, GpuContentionFinding, GpuDetectionConfig, GpuMetrics, NoisyNeighbour,
    RequestGpu, RequestGpuFacts,
};
pub use join::{ConnectionFacts, JoinRule, JoinedRequest, PeerClose};
pub use kv_eviction::{
    ConversationRecord, ConversationTable, KvEvictionConfig, KvEvictionFinding, KvEvictionSizes,
    KvEvictionStats, KvEvidence, MissEvidence, OTHER_TENANT, SELF_TENANT, SpanLink, TenantLabels,
    TenantShare, conversation_key, instance_key, siphash24,
};
pub use stats::{CorrelatorStats, EvictionCounts, FindingCounts, JoinCounts, StateSizes};

use crate::model::{
    ConnId, GpuSample, KernelEvent, KernelEventKind, KvEventBatch, ProcessIdentity, RequestHead,
    RuntimeKind, RuntimeRequest, UnixNanos,
};
use abort::KernelAbortFacts;
use index::{KeySet, SortedVecMap};

/// One input to the correlator, from any source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "each input is moved once into the correlator; boxing would allocate per event"
)]
pub enum Input {
    /// An event from the kernel source.
    Kernel(KernelEvent),
    /// A request span from the OTLP receiver's runtime adapters.
    Runtime(RuntimeRequest),
    /// A batch of KV-cache events from a runtime's publisher (`sources::kvevents`).
    KvEvents(KvEventBatch),
    /// One poll of the NVML source.
    Gpu(GpuSample),
    /// The identity of a process (a runtime, a GPU process), sent by the pipeline once per
    /// pid (and again when the pid names a new process) before the inputs that name it.
    Process(ProcessIdentity),
}

/// One output of the correlator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "output", rename_all = "snake_case")]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "each output is moved once to the exporter; boxing would allocate per span"
)]
pub enum Output {
    /// A runtime span settled, joined or not; exactly one per span received.
    Joined(JoinedRequest),
    /// Tokens billed after the client aborted.
    Abort(AbortFinding),
    /// A conversation's warm prefix was evicted between two turns (contract §3.3).
    KvEviction(KvEvictionFinding),
    /// The GPU side of a settled request: `inferwatch.start`, its GPUs and their SM
    /// utilisation, and the noisy neighbour when it was decoded during contention. Emitted
    /// right after the request's `Joined` (same trace and span id), once the correlator has
    /// received any `Gpu` or `Process` input.
    RequestGpu(RequestGpuFacts),
    /// Another process on the runtime's GPU slowed its decode (contract §3.4).
    GpuContention(GpuContentionFinding),
    /// A runtime instance's cold-start floor and its phases (contract §3.2).
    ColdStart(ColdStartFinding),
}

/// A connection, told apart from an earlier socket at the same kernel address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ConnKey {
    id: ConnId,
    generation: u32,
}

impl ConnKey {
    const MIN: ConnKey = ConnKey {
        id: ConnId(0),
        generation: 0,
    };
    const MAX: ConnKey = ConnKey {
        id: ConnId(u64::MAX),
        generation: u32::MAX,
    };
}

/// A request head: when it was read, and on which connection.
type HeadKey = (UnixNanos, ConnKey);

/// A span waiting to settle: when it is due, then its ids (unique).
type SpanKey = (UnixNanos, [u8; 16], [u8; 8]);

/// Hash tables keyed by what the network sends (addresses, request ids, trace ids): foldhash,
/// several times cheaper than SipHash per lookup and still seeded per process. Nothing the
/// correlator decides depends on their iteration order.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// The heads claimed during one tick, by the span that claims them.
#[derive(Debug)]
struct Claims {
    heads: FastMap<HeadKey, SpanKey>,
    /// The last key a span due at this tick can have.
    due_end: SpanKey,
    /// Whether every waiting span's exact claim is in `heads`, not only the due spans'.
    complete: bool,
}

impl Claims {
    fn at(now: UnixNanos) -> Self {
        Self {
            heads: FastMap::default(),
            due_end: (now, [u8::MAX; 16], [u8::MAX; 8]),
            complete: false,
        }
    }
}

#[derive(Debug)]
struct Head {
    pid: Option<u32>,
    head: RequestHead,
}

#[derive(Debug)]
struct Conn {
    first_seen: UnixNanos,
    last_seen: UnixNanos,
    accepted: bool,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    pid: Option<u32>,
    /// Request boundaries by head time; `Some` while the request waits to settle. Settled
    /// entries stay while an older request still needs them as its end.
    requests: SortedVecMap<UnixNanos, Option<Head>>,
    peer_closed: Option<PeerClose>,
    /// The time and send sequence of the latest request head that carried one.
    head_send_seq: Option<(UnixNanos, u32)>,
    /// `false` when the kernel said the response had not started when the peer left: the
    /// writes after the close are then a non-streaming body, not one chunk per token.
    writes_are_tokens: bool,
    token_writes: u64,
    last_write: Option<UnixNanos>,
    closed: Option<UnixNanos>,
}

impl Conn {
    fn new(ts: UnixNanos) -> Self {
        Self {
            first_seen: ts,
            last_seen: ts,
            accepted: false,
            local: None,
            peer: None,
            pid: None,
            requests: SortedVecMap::default(),
            peer_closed: None,
            head_send_seq: None,
            writes_are_tokens: true,
            token_writes: 0,
            last_write: None,
            closed: None,
        }
    }

    fn has_pending(&self) -> bool {
        self.requests.values().any(Option::is_some)
    }

    /// The kernel-side end of the request read at `head_ts`: the next head, else the close.
    fn request_end(&self, head_ts: UnixNanos) -> Option<UnixNanos> {
        self.requests.next_key_after(&head_ts).or(self.closed)
    }

    /// The peer close and writes after it, when the close fell in this request's interval.
    fn abort_facts(&self, head_ts: UnixNanos) -> KernelAbortFacts {
        let end = self.requests.next_key_after(&head_ts);
        match self.peer_closed {
            Some(close) if close.ts >= head_ts && end.is_none_or(|end| close.ts < end) => {
                KernelAbortFacts {
                    close: Some((close.ts, close.how)),
                    token_writes: self.token_writes,
                    last_write: self.last_write,
                }
            }
            _ => KernelAbortFacts::default(),
        }
    }

    /// Forgets settled boundaries no pending request needs any more.
    fn prune(&mut self) {
        self.requests.remove_leading(Option::is_none);
    }
}

/// The correlator. Build it with [`Correlator::new`], feed it with [`Correlator::on_event`],
/// and call [`Correlator::on_tick`] periodically (every 100 ms or so) with the current time.
#[derive(Debug)]
pub struct Correlator {
    config: CorrelatorConfig,
    stats: CorrelatorStats,
    /// Boxed: a connection lives about a second past its close (until its requests settle), so
    /// at 10k requests/s the table holds ~10k of them, and hashbrown's buckets (up to twice
    /// the entries) are pointers instead of ~190-byte connections.
    conns: FastMap<ConnKey, Box<Conn>>,
    /// The generation of the socket now at each kernel address.
    current: FastMap<ConnId, u32>,
    /// Connections by first sighting, for evicting the oldest, and the candidates for the
    /// idle time-out (a connection first seen within it cannot have been idle that long).
    conn_order: BTreeSet<(UnixNanos, ConnKey)>,
    /// Closed connections by close time: the candidates for removal, so that a tick looks at
    /// the connections whose time may have come instead of at all of them (at 10k requests/s
    /// ~10k, each a pointer chase, ten times a second).
    closed: BTreeSet<(UnixNanos, ConnKey)>,
    /// Pending heads, by time: the temporal index and the eviction order.
    heads: BTreeSet<HeadKey>,
    by_trace: FastMap<[u8; 16], KeySet<HeadKey>>,
    by_request_id: FastMap<String, KeySet<HeadKey>>,
    by_peer: FastMap<SocketAddr, KeySet<ConnKey>>,
    spans: BTreeMap<SpanKey, Box<RuntimeRequest>>,
    span_ids: FastSet<([u8; 16], [u8; 8])>,
    /// Listening port -> the pid that listens.
    listeners: BTreeMap<u16, Option<u32>>,
    /// Conversations and per-instance request / KV event logs (contract §3.3).
    kv: kv_eviction::KvTracker,
    /// GPU samples, process identities, contention and cold starts.
    gpu: contention::GpuView,
}

impl Correlator {
    /// A correlator with empty state.
    pub fn new(config: CorrelatorConfig) -> Self {
        Self {
            kv: kv_eviction::KvTracker::new(config.kv_eviction.clone()),
            config,
            stats: CorrelatorStats::default(),
            conns: FastMap::default(),
            current: FastMap::default(),
            conn_order: BTreeSet::new(),
            closed: BTreeSet::new(),
            heads: BTreeSet::new(),
            by_trace: FastMap::default(),
            by_request_id: FastMap::default(),
            by_peer: FastMap::default(),
            spans: BTreeMap::new(),
            span_ids: FastSet::default(),
            listeners: BTreeMap::new(),
            gpu: contention::GpuView::default(),
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &CorrelatorConfig {
        &self.config
    }

    /// Its counters so far.
    pub fn stats(&self) -> &CorrelatorStats {
        &self.stats
    }

    /// KV evictions found so far by `(victim_tenant, neighbour_tenant)` label pair, with tenant
    /// labels bounded by [`TenantLabels`] (`metric_tenant_labels` tenants, the rest `other`;
    /// `self` when the victim's own tenant evicted it, `unknown` when no tenant was known).
    /// Monotonic: the metrics sink reads it as `inferwatch_kv_evictions_total`.
    pub fn kv_eviction_counts(&self) -> &BTreeMap<(String, String), u64> {
        self.kv.counts()
    }

    /// How full the KV-eviction tables are now.
    pub fn kv_eviction_sizes(&self) -> KvEvictionSizes {
        self.kv.sizes()
    }

    /// How full its tables are now.
    pub fn state_sizes(&self) -> StateSizes {
        StateSizes {
            connections: self.conns.len(),
            pending_heads: self.heads.len(),
            pending_spans: self.spans.len(),
            listeners: self.listeners.len(),
            requests: self.conns.values().map(|c| c.requests.len()).sum(),
        }
    }

    /// The GPU gauges and counters for the metrics sink.
    pub fn gpu_metrics(&self) -> GpuMetrics {
        self.gpu.metrics()
    }

    /// How full the GPU tables are: (NVML snapshots, identities, runtime instances, open
    /// contention intervals, cold-start GPU processes, cold-start runtimes).
    pub fn gpu_state_sizes(&self) -> (usize, usize, usize, usize, usize, usize) {
        let (snaps, ids, instances, open) = self.gpu.sizes();
        let (procs, runtimes) = self.gpu.cold.sizes();
        (snaps, ids, instances, open, procs, runtimes)
    }

    /// Takes one input. Usually returns nothing: decisions wait for [`Correlator::on_tick`] so
    /// that they do not depend on arrival order; a span table at its cap settles its oldest
    /// span at once, and those outputs are returned here.
    pub fn on_event(&mut self, input: Input) -> Vec<Output> {
        match input {
            Input::Kernel(event) => {
                if let Some(pid) = event.pid {
                    match event.kind {
                        KernelEventKind::Listen { .. } => {
                            self.gpu.on_listen(pid, event.ts, &self.config.gpu)
                        }
                        KernelEventKind::RequestHead { .. } => {
                            self.gpu.on_head(pid, event.ts, &self.config.gpu)
                        }
                        _ => {}
                    }
                }
                self.on_kernel(event);
                Vec::new()
            }
            Input::Runtime(request) => {
                self.gpu
                    .on_span(request.instance.pid, request.arrival, &self.config.gpu);
                let out = self.on_span(request);
                self.gpu_facts(out)
            }
            Input::Gpu(sample) => {
                self.gpu.on_sample(sample, &self.config.gpu);
                Vec::new()
            }
            Input::Process(identity) => {
                self.gpu.on_process(identity, &self.config.gpu);
                Vec::new()
            }
            Input::KvEvents(batch) => {
                self.kv.on_kv_events(&batch, &mut self.stats.kv_eviction);
                Vec::new()
            }
        }
    }

    /// Adds the GPU facts after each settled span, with the findings they complete.
    fn gpu_facts(&mut self, out: Vec<Output>) -> Vec<Output> {
        if !self.gpu.active() {
            return out;
        }
        let earlier: Vec<Option<UnixNanos>> = out
            .iter()
            .enumerate()
            .map(|(i, output)| match output {
                Output::Joined(joined) => {
                    self.earlier_first_token_pending(&joined.request, &out[i + 1..])
                }
                _ => None,
            })
            .collect();
        let mut with = Vec::with_capacity(out.len() * 2);
        for (output, earlier) in out.into_iter().zip(earlier) {
            let mut findings = Vec::new();
            let facts = match &output {
                Output::Joined(joined) => Some(self.gpu.on_request(
                    &joined.request,
                    earlier,
                    &self.config.gpu,
                    &mut findings,
                )),
                _ => None,
            };
            with.push(output);
            if let Some(facts) = facts {
                with.push(Output::RequestGpu(facts));
            }
            with.extend(findings);
        }
        with
    }

    /// The earliest first token of the spans not settled yet (still waiting, or later in this
    /// tick's `settling`) from the same runtime instance, when before `span`'s, while that
    /// instance's cold start is undecided. Spans settle in the order of their ends (exact
    /// joins) or later (guesses), not of their first tokens, and the cold start belongs to the
    /// request that got the first token: the decision waits for it. A span the runtime has not
    /// exported yet cannot be waited for. Scans only until the instance is decided.
    fn earlier_first_token_pending(
        &self,
        span: &RuntimeRequest,
        settling: &[Output],
    ) -> Option<UnixNanos> {
        let (Some(pid), Some(first)) = (span.instance.pid, span.first_token) else {
            return None;
        };
        if self.gpu.cold.is_decided(pid) {
            return None;
        }
        let pending = self.spans.values().map(|pending| &**pending);
        let later_in_tick = settling.iter().filter_map(|o| match o {
            Output::Joined(joined) => Some(&*joined.request),
            _ => None,
        });
        pending
            .chain(later_in_tick)
            .filter(|other| other.instance.pid == Some(pid))
            .filter_map(|other| other.first_token)
            .filter(|ft| *ft < first)
            .min()
    }

    /// Settles what is due at `now` (unix nanos, the same clock as the events): spans whose
    /// settle time passed, heads that waited `span_wait_ms` for a span, and expired state.
    pub fn on_tick(&mut self, now: UnixNanos) -> Vec<Output> {
        let mut out = Vec::new();

        // Exact rules first for every waiting span, due or not, so that a head an exact rule
        // names is never taken by a guess. Spans claim heads in their key order, due ones
        // first, and a span's claim depends only on the claims before it: so the due spans'
        // claims are made here, and the later spans' only when a guess (the temporal rule) or
        // a head about to settle needs them. Most ticks need neither, and the exact rules
        // then run once per span instead of once per span per tick.
        let mut claims = Claims::at(now);
        let due_end = claims.due_end;
        let mut matches: BTreeMap<SpanKey, (JoinRule, HeadKey)> = BTreeMap::new();
        self.claim_exact(
            (Bound::Unbounded, Bound::Included(due_end)),
            &mut claims,
            Some(&mut matches),
        );
        let due: Vec<SpanKey> = self.spans.range(..=due_end).map(|(key, _)| *key).collect();
        // A due span no exact rule joins waits for its temporal time (`guess_at`): heads read
        // after its arrival, and other spans' exact claims, may still come. Those whose time
        // has come guess in the order of that time, so that the guesses of one tick do not
        // depend on which of them had waited. A span of an instance whose cold start is not
        // decided waits too, even when joined: settling by end would let a short request
        // decide (and tag the others) before the one that got the first token has arrived.
        let mut deferred: Vec<(SpanKey, UnixNanos)> = Vec::new();
        let mut guessing: Vec<(SpanKey, SpanKey)> = Vec::new();
        for key in &due {
            let Some(span) = self.spans.get(key) else {
                continue;
            };
            let joined = matches.contains_key(key);
            if joined && !self.cold_start_open(span) {
                continue;
            }
            let at = self.guess_at(span);
            if now < at {
                deferred.push((*key, at));
            } else if !joined {
                guessing.push(((at, key.1, key.2), *key));
            }
        }
        if !guessing.is_empty() {
            self.claim_rest(&mut claims);
            guessing.sort_unstable();
        }
        for (_, key) in guessing {
            let Some(span) = self.spans.get(&key) else {
                continue;
            };
            if let Some(head) = self.best_temporal(span, &claims.heads) {
                claims.heads.insert(head, key);
                matches.insert(key, (JoinRule::Temporal, head));
            }
        }
        for (key, at) in deferred {
            if let Some(span) = self.spans.remove(&key) {
                self.spans.insert((at, key.1, key.2), span);
            }
        }
        for key in due {
            if let Some(span) = self.spans.remove(&key) {
                self.span_ids.remove(&(span.trace_id, span.span_id));
                let matched = matches.get(&key).copied();
                self.finish_span(span, matched, false, &mut out);
            }
        }

        self.settle_heads(now, &mut claims, &mut out);
        self.expire_connections(now);
        let mut out = self.gpu_facts(out);
        out.extend(self.gpu.on_tick(now, &self.config.gpu));
        let mut evictions = Vec::new();
        self.kv
            .on_tick(now, &mut self.stats.kv_eviction, &mut evictions);
        out.extend(evictions.into_iter().map(Output::KvEviction));
        out
    }

    /// The exact rules' claims of the spans in `range`, in key order, added to `claims`
    /// (and their matches to `matches` when given).
    fn claim_exact(
        &self,
        range: (Bound<SpanKey>, Bound<SpanKey>),
        claims: &mut Claims,
        mut matches: Option<&mut BTreeMap<SpanKey, (JoinRule, HeadKey)>>,
    ) {
        for (key, span) in self.spans.range(range) {
            if let Some((rule, head)) = self.best_exact(span, &claims.heads) {
                claims.heads.insert(head, *key);
                if let Some(matches) = matches.as_deref_mut() {
                    matches.insert(*key, (rule, head));
                }
            }
        }
    }

    /// Completes `claims` with those of the spans not yet due, once per
    /// tick. Taking the due spans' heads in between changes nothing for them: a head a due
    /// span claimed was never theirs to take.
    fn claim_rest(&self, claims: &mut Claims) {
        if !claims.complete {
            let after_due = (Bound::Excluded(claims.due_end), Bound::Unbounded);
            self.claim_exact(after_due, claims, None);
            claims.complete = true;
        }
    }

    fn on_kernel(&mut self, event: KernelEvent) {
        self.stats.kernel_events += 1;
        let ts = event.ts;
        match event.kind {
            KernelEventKind::Listen { port, .. } => {
                if self.listeners.len() >= self.config.max_listeners
                    && !self.listeners.contains_key(&port)
                {
                    self.stats.evictions.listeners += 1;
                } else {
                    self.listeners.insert(port, event.pid);
                }
            }
            KernelEventKind::Accepted {
                conn, local, peer, ..
            } => {
                let key = self.conn_for_accept(conn, ts);
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
                let key = self.conn_for(conn, ts);
                if let Some(seq) = send_seq
                    && let Some(c) = self.conns.get_mut(&key)
                    && c.head_send_seq.is_none_or(|(at, _)| at <= ts)
                {
                    c.head_send_seq = Some((ts, seq));
                }
                self.insert_head(key, ts, event.pid, head);
            }
            KernelEventKind::PeerClosed {
                conn,
                how,
                send_seq,
            } => {
                let key = self.conn_for(conn, ts);
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
                let key = self.conn_for(conn, ts);
                let framing = errno == 0 && self.config.framing_write_bytes.contains(&bytes);
                if let Some(c) = self.conns.get_mut(&key)
                    && (bytes > 0 || errno != 0)
                {
                    if !framing && c.writes_are_tokens {
                        c.token_writes += 1;
                    }
                    c.last_write = Some(c.last_write.map_or(ts, |last| last.max(ts)));
                }
            }
            KernelEventKind::LocalClosed { conn } | KernelEventKind::Closed { conn } => {
                let key = self.conn_for(conn, ts);
                if let Some(c) = self.conns.get_mut(&key) {
                    let earlier = c.closed;
                    if earlier.is_none_or(|earlier| ts < earlier) {
                        c.closed = Some(ts);
                        if let Some(earlier) = earlier {
                            self.closed.remove(&(earlier, key));
                        }
                        self.closed.insert((ts, key));
                    }
                }
            }
        }
    }

    fn on_span(&mut self, request: RuntimeRequest) -> Vec<Output> {
        self.stats.spans += 1;
        let ids = (request.trace_id, request.span_id);
        if self.span_ids.contains(&ids) {
            self.stats.duplicate_spans += 1;
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.spans.len() >= self.config.max_pending_spans.max(1)
            && let Some((_, oldest)) = self.spans.pop_first()
        {
            // Settle the span due first with what is known now rather than drop it: the
            // exporter still gets exactly one `Joined` per span.
            self.stats.evictions.spans += 1;
            self.span_ids.remove(&(oldest.trace_id, oldest.span_id));
            let none = FastMap::default();
            let matched = self.best_exact(&oldest, &none).or_else(|| {
                self.best_temporal(&oldest, &none)
                    .map(|h| (JoinRule::Temporal, h))
            });
            self.finish_span(oldest, matched, true, &mut out);
        }
        // Every head an exact rule can give this span was read before its end, so the exact
        // rules can decide once the kernel events up to the end have arrived; a span they do
        // not join then waits on to `guess_at` (`on_tick`).
        let settle_at = request.end.saturating_add(self.config.settle_delay());
        self.span_ids.insert(ids);
        self.spans.insert(
            (settle_at, request.trace_id, request.span_id),
            Box::new(request),
        );
        out
    }

    /// Whether `span` may still decide its instance's cold start, and which request decides
    /// matters: GPU facts are computed and the instance's start, undecided, looks cold.
    fn cold_start_open(&self, span: &RuntimeRequest) -> bool {
        self.gpu.active() && self.gpu.cold_start_pending(span)
    }

    /// When a span no exact rule joins may take a head by the temporal rule: once every head
    /// within the window after its arrival, and the kernel events up to its end, have arrived.
    fn guess_at(&self, span: &RuntimeRequest) -> UnixNanos {
        span.end
            .max(span.arrival.saturating_add(self.config.temporal_window()))
            .saturating_add(self.config.settle_delay())
    }

    /// The connection now at `id`, created when first seen.
    fn conn_for(&mut self, id: ConnId, ts: UnixNanos) -> ConnKey {
        let generation = self.current.get(&id).copied().unwrap_or(0);
        let key = ConnKey { id, generation };
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_seen = c.last_seen.max(ts);
        } else {
            self.insert_conn(key, ts);
        }
        key
    }

    /// An accept at `id`: a new socket when the one known there was already accepted or closed
    /// (the kernel reuses socket addresses).
    fn conn_for_accept(&mut self, id: ConnId, ts: UnixNanos) -> ConnKey {
        let key = self.conn_for(id, ts);
        let reused = self
            .conns
            .get(&key)
            .is_some_and(|c| c.accepted || c.closed.is_some());
        if !reused {
            return key;
        }
        let next = ConnKey {
            id,
            generation: key.generation.wrapping_add(1),
        };
        self.current.insert(id, next.generation);
        if !self.conns.contains_key(&next) {
            self.insert_conn(next, ts);
        }
        next
    }

    fn insert_conn(&mut self, key: ConnKey, ts: UnixNanos) {
        while self.conns.len() >= self.config.max_connections.max(1) {
            let Some((_, oldest)) = self.conn_order.first().copied() else {
                break;
            };
            self.stats.evictions.connections += 1;
            self.remove_conn(oldest, true);
        }
        self.conns.insert(key, Box::new(Conn::new(ts)));
        self.conn_order.insert((ts, key));
        self.current.entry(key.id).or_insert(key.generation);
    }

    fn remove_conn(&mut self, key: ConnKey, evicted: bool) {
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
        if self.current.get(&key.id) == Some(&key.generation) {
            self.current.remove(&key.id);
        }
        for (ts, head) in conn.requests {
            if let Some(head) = head {
                if evicted {
                    self.stats.evictions.heads += 1;
                }
                self.unindex_head((ts, key), &head);
            }
        }
    }

    fn insert_head(&mut self, key: ConnKey, ts: UnixNanos, pid: Option<u32>, head: RequestHead) {
        // Per-connection cap: the oldest request on the connection goes first.
        let cap = self.config.max_heads_per_connection.max(1);
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if conn.requests.len() < cap || conn.requests.contains_key(&ts) {
                break;
            }
            if let Some((old_ts, Some(old))) = conn.requests.pop_first() {
                self.stats.evictions.heads += 1;
                self.unindex_head((old_ts, key), &old);
            }
        }
        while self.heads.len() >= self.config.max_pending_heads.max(1) {
            let Some(oldest) = self.heads.first().copied() else {
                break;
            };
            self.stats.evictions.heads += 1;
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
        conn.requests.insert(ts, Some(Head { pid, head }));
        self.heads.insert(hk);
    }

    fn unindex_head(&mut self, hk: HeadKey, head: &Head) {
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
    }

    /// Removes a pending head from every index and marks it settled on its connection.
    fn take_head(&mut self, hk: HeadKey) -> Option<Head> {
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

    fn head_ref(&self, hk: HeadKey) -> Option<(&Conn, &Head)> {
        let conn = self.conns.get(&hk.1)?;
        let head = conn.requests.get(&hk.0)?.as_ref()?;
        Some((conn, head))
    }

    /// The best head for `span` by the exact rules, in order of preference; among several
    /// candidates of one rule, the one read closest to the span's arrival.
    fn best_exact(
        &self,
        span: &RuntimeRequest,
        reserved: &FastMap<HeadKey, SpanKey>,
    ) -> Option<(JoinRule, HeadKey)> {
        let usable = |hk: &HeadKey| !reserved.contains_key(hk) && hk.0 <= span.end;
        // All 16 bytes: SGLang's own traces have 64-bit ids (upper half zero), which must never
        // match a 128-bit traceparent that only shares the low half.
        if let Some(set) = self.by_trace.get(&span.trace_id)
            && let Some(hk) = closest(span.arrival, set.iter().filter(usable))
        {
            return Some((JoinRule::Traceparent, hk));
        }
        if let Some(id) = &span.request_id {
            let candidates = join::request_id_keys(id, &self.config.request_id_prefixes)
                .into_iter()
                .filter_map(|k| self.by_request_id.get(k))
                .flat_map(KeySet::iter)
                .filter(usable);
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::RequestId, hk));
            }
        }
        if let Some(client) = span.client
            && let Some(conns) = self.by_peer.get(&client)
        {
            let candidates = conns
                .iter()
                .filter_map(|ck| self.conns.get(&ck).map(|c| (ck, c)))
                .flat_map(|(ck, c)| {
                    c.requests
                        .iter()
                        .filter(|(_, h)| h.is_some())
                        .map(move |(ts, _)| (*ts, ck))
                })
                .filter(usable)
                .filter(|hk| {
                    self.head_ref(*hk)
                        .is_some_and(|(_, head)| !self.contradicts(span, &head.head))
                });
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::ClientAddr, hk));
            }
        }
        None
    }

    /// The unreserved head on the span's instance read closest to its arrival, within the
    /// temporal window.
    fn best_temporal(
        &self,
        span: &RuntimeRequest,
        reserved: &FastMap<HeadKey, SpanKey>,
    ) -> Option<HeadKey> {
        let window = self.config.temporal_window();
        let lo = (span.arrival.saturating_sub(window), ConnKey::MIN);
        let hi = (span.arrival.saturating_add(window), ConnKey::MAX);
        let instance_ports: Option<Vec<u16>> = span.instance.pid.and_then(|pid| {
            let ports: Vec<u16> = self
                .listeners
                .iter()
                .filter(|(_, p)| **p == Some(pid))
                .map(|(port, _)| *port)
                .collect();
            (!ports.is_empty()).then_some(ports)
        });
        let candidates = self
            .heads
            .range(lo..=hi)
            .copied()
            .filter(|hk| !reserved.contains_key(hk) && hk.0 <= span.end)
            .filter(|hk| {
                self.head_ref(*hk)
                    .is_some_and(|(_, head)| !self.contradicts(span, &head.head))
            })
            .filter(|hk| match (&instance_ports, self.conns.get(&hk.1)) {
                (None, _) => true,
                (Some(ports), Some(conn)) => {
                    conn.pid.is_some() && conn.pid == span.instance.pid
                        || conn.local.is_some_and(|l| ports.contains(&l.port()))
                }
                (Some(_), None) => false,
            });
        closest(span.arrival, candidates)
    }

    /// Whether a head's identifiers rule out `span`, so that a guess never goes against
    /// evidence: the span continues a propagated trace (it has a parent) that is not the
    /// head's `traceparent`, or vLLM (which derives its id from `x-request-id`) reports an id
    /// the header does not give.
    fn contradicts(&self, span: &RuntimeRequest, head: &RequestHead) -> bool {
        let other_trace = span.parent_span_id.is_some()
            && head
                .traceparent
                .is_some_and(|tp| tp.trace_id != span.trace_id);
        let other_id = span.runtime == RuntimeKind::Vllm
            && match (&span.request_id, &head.request_id) {
                (Some(id), Some(header)) => {
                    !join::request_id_keys(id, &self.config.request_id_prefixes)
                        .contains(&header.as_str())
                }
                _ => false,
            };
        other_trace || other_id
    }

    fn finish_span(
        &mut self,
        span: Box<RuntimeRequest>,
        matched: Option<(JoinRule, HeadKey)>,
        early: bool,
        out: &mut Vec<Output>,
    ) {
        let joined = matched.and_then(|(rule, hk)| {
            let (conn, _) = self.head_ref(hk)?;
            let facts = conn.abort_facts(hk.0);
            let (local, peer, conn_pid) = (conn.local, conn.peer, conn.pid);
            let head = self.take_head(hk)?;
            Some((rule, hk, head, facts, local, peer, conn_pid))
        });
        let Some((rule, hk, head, facts, local, peer, conn_pid)) = joined else {
            self.stats.joins.record(JoinRule::Unjoined);
            self.kv.on_request(&span, None, &mut self.stats.kv_eviction);
            out.push(Output::Joined(JoinedRequest {
                request: span,
                join: JoinRule::Unjoined,
                connection: None,
                settled_early: early,
            }));
            return;
        };
        self.stats.joins.record(rule);
        // vLLM's span names no model: the request body's `"model"` stands in (contract §1.2).
        let mut span = span;
        if span.model.is_none() {
            span.model = head.head.model.clone();
        }
        let finding = facts.close.and_then(|(t_c, how)| {
            let (tokens_after, tokens_total, method) =
                abort::tokens_after_with_span(&span, t_c, facts.token_writes)?;
            Some(AbortFinding {
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
            })
        });
        let connection = ConnectionFacts {
            conn: hk.1.id,
            local,
            peer,
            pid: head.pid.or(conn_pid),
            head_ts: hk.0,
            method: head.head.method,
            path: head.head.path,
            request_id: head.head.request_id,
            traceparent: head.head.traceparent,
            tenant: head.head.tenant,
            conversation: head.head.conversation,
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
        }));
        if let Some(finding) = finding {
            self.stats
                .findings
                .record_abort(finding.how, finding.tokens_after, true);
            out.push(Output::Abort(finding));
        }
    }

    /// Heads no span claimed: settle them `span_wait` after the kernel saw them end, or drop
    /// them when they never end.
    fn settle_heads(&mut self, now: UnixNanos, claims: &mut Claims, out: &mut Vec<Output>) {
        let span_wait = self.config.span_wait();
        let max_age = self.config.max_request_age();
        let mut settle = Vec::new();
        let mut expire = Vec::new();
        // A head settles `span_wait` after the last thing the kernel saw of it, which is never
        // before the head itself, or expires `max_age` after it: the heads read since the
        // earlier of the two cannot be due, and are most of them.
        let newest_due = now.saturating_sub(span_wait.min(max_age));
        for hk in self.heads.range(..=(newest_due, ConnKey::MAX)) {
            if claims.heads.contains_key(hk) {
                continue;
            }
            let Some(conn) = self.conns.get(&hk.1) else {
                continue;
            };
            let facts = conn.abort_facts(hk.0);
            let end = conn.request_end(hk.0);
            let quiet = [end, facts.close.map(|c| c.0), facts.last_write]
                .into_iter()
                .flatten()
                .max()
                .map(|quiet| quiet.max(hk.0));
            match quiet {
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
            self.take_head(hk);
        }
        for hk in settle {
            let Some(conn) = self.conns.get(&hk.1) else {
                continue;
            };
            let facts = conn.abort_facts(hk.0);
            let Some(head) = self.take_head(hk) else {
                continue;
            };
            self.stats.unjoined_heads += 1;
            // Without a span, the server's writes after the peer left are the only evidence
            // that the runtime kept working; framing alone is not.
            let (Some((t_c, how)), Some(t_s)) = (facts.close, facts.last_write) else {
                continue;
            };
            if facts.token_writes == 0 || t_s <= t_c {
                continue;
            }
            let tp = head.head.traceparent;
            let finding = AbortFinding {
                trace_id: tp.map(|tp| tp.trace_id),
                parent_span_id: tp.map(|tp| tp.parent_id),
                request_id: head.head.request_id,
                tokens_after: facts.token_writes,
                tokens_total: None,
                method: TokenCountMethod::KernelWrites,
                lag_ns: t_s - t_c,
                how,
                t_c,
                t_s,
                t_s_from_span: false,
                conn: hk.1.id,
                tenant: head.head.tenant,
                model: head.head.model,
                join: JoinRule::Unjoined,
            };
            self.stats
                .findings
                .record_abort(how, finding.tokens_after, false);
            out.push(Output::Abort(finding));
        }
    }

    /// Forgets the connections with nothing pending that closed `settle_delay` ago or saw no
    /// event for `connection_idle`. The candidates come from the two time-ordered indexes; a
    /// closed connection that still has a request pending stays a candidate until it settles.
    fn expire_connections(&mut self, now: UnixNanos) {
        let closed_before = now.checked_sub(self.config.settle_delay());
        let idle_since = now.checked_sub(self.config.connection_idle());
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
            self.remove_conn(key, false);
        }
    }
}

/// The head read closest to `arrival`; ties go to the earlier head, then the lower connection,
/// so the choice never depends on iteration order.
fn closest(arrival: UnixNanos, candidates: impl Iterator<Item = HeadKey>) -> Option<HeadKey> {
    candidates.min_by_key(|hk| (hk.0.abs_diff(arrival), *hk))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod gpu_tests;
