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
//!   left while it was in flight, that is a client abort found from the kernel alone, with a
//!   finding when the server kept writing token chunks or took over `abort_lag_finding_ms` to
//!   stop.
//! - Every client abort is emitted as a [`ClientAbort`] (counted, its lag observed), and as an
//!   [`AbortFinding`] only with tokens after the close or a long lag (SPEC §3.1).
//! - Through a watched gateway (`gateway.rs`), the client's head on the gateway is linked to the
//!   gateway's head on the runtime by an id both carry; the span joins the runtime's side and
//!   takes the client's with it, so the abort runs from the client's close (`t_c`) through the
//!   gateway's upstream close (`t_g`) to the runtime's stop (`t_s`).
//!
//! # Instance matching (temporal rule)
//! A span's instance is its `process.pid`. When a `Listen` event named that pid, only heads on
//! connections accepted by that pid or on one of its listening ports are candidates; when the
//! pid is unknown to the kernel side (no pid in the span, or a pid namespace the kernel does not
//! see), every head on the node is a candidate, which is right on a node with one runtime.
//! Client-address and temporal joins never take a head whose identifiers contradict the span
//! (another propagated trace, another vLLM request id, or a response id that is not the span's),
//! and the temporal rule leaves out heads whose connection shows the span cannot be theirs; it
//! joins only when one head is closer to the arrival than every other by `temporal_margin_ms`,
//! and otherwise marks the span `ambiguous` (no join, no finding).

mod abort;
mod config;
mod gateway;
mod gpu;
mod index;
mod join;
mod kv_eviction;
mod lost;
mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

pub use abort::{AbortBoundary, AbortFinding, ClientAbort, TokenCountMethod};
pub use config::{CorrelatorConfig, GpuDetectionConfig};
pub use gpu::cold_start::{ColdStartFinding, ColdStartPhase, PhaseSource, StartKind};
pub use gpu::contention::{AffectedRequest, GpuContentionFinding, NoisyNeighbour};
pub use gpu::{GpuMetrics, RequestGpu, RequestGpuFacts};
pub use join::{ConnectionFacts, JoinRule, JoinedRequest, PeerClose};
pub use kv_eviction::{
    ConversationRecord, ConversationTable, KvEvictionConfig, KvEvictionFinding, KvEvictionSizes,
    KvEvictionStats, KvEvidence, MissEvidence, OTHER_TENANT, SELF_TENANT, SpanLink, TenantLabels,
    TenantShare, conversation_key, instance_key,
};
pub use lost::{LostCause, LostInFlightConfig, LostInFlightFinding, LostInFlightStats};
pub use stats::{CorrelatorStats, EvictionCounts, FindingCounts, JoinCounts, StateSizes};

use crate::model::{
    ConnId, GpuSample, KernelEvent, KernelEventKind, KvEventBatch, ProcessIdentity, RequestHead,
    RuntimeKind, RuntimeRequest, StartupSpan, UnixNanos,
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
    /// A runtime's start-up span (vLLM's `Overall Loading`, `Load weights`, ...): its own
    /// cold-start phases (contract §3.2).
    Startup(StartupSpan),
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
    /// A client left while its request was in flight, finding or not (contract §3.1):
    /// counted and its lag observed. Comes right before the request's `Abort` finding when it
    /// makes one.
    ClientAbort(ClientAbort),
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
    /// A request lost in flight: the runtime exited or closed the connection mid-response
    /// (contract §3.5).
    LostInFlight(LostInFlightFinding),
}

impl From<gpu::GpuFinding> for Output {
    fn from(finding: gpu::GpuFinding) -> Self {
        match finding {
            gpu::GpuFinding::Contention(f) => Output::GpuContention(f),
            gpu::GpuFinding::ColdStart(f) => Output::ColdStart(f),
        }
    }
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
    /// The response's own ids read from the server's first response bytes (at most
    /// [`MAX_RESPONSE_IDS`]: a response header and a body id).
    response_ids: Vec<String>,
}

/// Response ids kept per request: an `x-request-id` response header and the body's `"id"`.
const MAX_RESPONSE_IDS: usize = 2;

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
    /// The server's own close (its FIN, or its release of a socket it reset) and the closing
    /// process, when it came before the peer left.
    server_closed: Option<(UnixNanos, u32)>,
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
            server_closed: None,
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
                    not_started: !self.writes_are_tokens,
                    server_closed: self.closed,
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
    by_response_id: FastMap<String, KeySet<HeadKey>>,
    by_peer: FastMap<SocketAddr, KeySet<ConnKey>>,
    spans: BTreeMap<SpanKey, Box<RuntimeRequest>>,
    span_ids: FastSet<([u8; 16], [u8; 8])>,
    /// Listening port -> the pid that listens.
    listeners: BTreeMap<u16, Option<u32>>,
    /// Local ports whose runtime exports spans (a span joined a request read there, or came
    /// from the pid listening there), at most `max_listeners`: on these, a request the client
    /// left and that never got a span was dropped by the runtime (vLLM exports no span for a
    /// request aborted because its client left), so it counts as a client abort.
    span_ports: BTreeSet<u16>,
    /// Runtime pids that exported spans, at most `max_listeners`: their listening ports and
    /// the connections they read count as exporting spans too.
    span_pids: BTreeSet<u32>,
    /// Conversations and per-instance request / KV event logs (contract §3.3).
    kv: kv_eviction::KvTracker,
    /// GPU samples, process identities, contention and cold starts.
    gpu: gpu::GpuView,
    /// Process exits and OOM victims, for requests lost in flight (contract §3.5).
    procs: lost::ProcessTracker,
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
            by_response_id: FastMap::default(),
            by_peer: FastMap::default(),
            spans: BTreeMap::new(),
            span_ids: FastSet::default(),
            listeners: BTreeMap::new(),
            span_ports: BTreeSet::new(),
            span_pids: BTreeSet::new(),
            gpu: gpu::GpuView::default(),
            procs: lost::ProcessTracker::default(),
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
            processes: self.procs.sizes(),
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
                    .on_span(&request, request.arrival, &self.config.gpu);
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
            Input::Startup(span) => self
                .gpu
                .on_startup(span, &self.config.gpu)
                .map(Output::ColdStart)
                .into_iter()
                .collect(),
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
                    joined.connection.as_ref().and_then(|c| c.pid),
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
            with.extend(findings.into_iter().map(Output::from));
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
        let first = span.first_token?;
        // Before the join only the aliases tell the instance; a span without one may be any
        // instance's (contract §1.4), so every other such span counts.
        let instance = self.gpu.instance_of(None, span);
        if self.gpu.cold_decided_for(instance) {
            return None;
        }
        let pending = self.spans.values().map(|pending| &**pending);
        let later_in_tick = settling.iter().filter_map(|o| match o {
            Output::Joined(joined) => Some(&*joined.request),
            _ => None,
        });
        pending
            .chain(later_in_tick)
            .filter(|other| {
                instance.is_none() || {
                    let of = self.gpu.instance_of(None, other);
                    of.is_none() || of == instance
                }
            })
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
        let mut ambiguous: BTreeSet<SpanKey> = BTreeSet::new();
        for (_, key) in guessing {
            let Some(span) = self.spans.get(&key) else {
                continue;
            };
            match self.best_temporal(span, &claims.heads) {
                Some(Guess::One(head)) => {
                    claims.heads.insert(head, key);
                    matches.insert(key, (JoinRule::Temporal, head));
                }
                Some(Guess::Ambiguous) => {
                    ambiguous.insert(key);
                }
                None => {}
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
                let unjoined = if ambiguous.contains(&key) {
                    JoinRule::Ambiguous
                } else {
                    JoinRule::Unjoined
                };
                self.finish_span(span, matched, unjoined, false, &mut out);
            }
        }

        self.settle_heads(now, &mut claims, &mut out);
        self.expire_connections(now);
        let keep = self.config.connection_idle().max(
            self.config.span_wait().saturating_add(
                self.config
                    .lost_in_flight
                    .oom_child_window_ms
                    .saturating_mul(1_000_000),
            ),
        );
        self.procs.on_tick(
            now,
            keep,
            self.config.settle_delay(),
            &mut self.stats.lost_in_flight,
        );
        let mut out = self.gpu_facts(out);
        out.extend(
            self.gpu
                .on_tick(now, &self.config.gpu)
                .into_iter()
                .map(Output::from),
        );
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
        let cfg = &self.config.lost_in_flight;
        let stats = &mut self.stats.lost_in_flight;
        match (&event.kind, event.pid) {
            (
                KernelEventKind::ProcessExit {
                    exit_code,
                    parent_pid,
                },
                Some(pid),
            ) => {
                self.procs
                    .on_exit(pid, *parent_pid, *exit_code, ts, cfg, stats);
                return;
            }
            (KernelEventKind::OomVictim, Some(pid)) => {
                self.procs.on_oom_victim(pid, ts, cfg, stats);
                return;
            }
            (KernelEventKind::ProcessExit { .. } | KernelEventKind::OomVictim, None) => return,
            (
                KernelEventKind::Listen { .. }
                | KernelEventKind::RequestHead { .. }
                | KernelEventKind::LocalClosed { .. },
                Some(pid),
            ) => self.procs.on_server(pid, ts, cfg, stats),
            _ => {}
        }
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
            KernelEventKind::ProcessExit { .. } | KernelEventKind::OomVictim => {}
            KernelEventKind::ResponseId { conn, id } => {
                let key = self.conn_for(conn, ts);
                self.add_response_id(key, ts, id);
            }
            KernelEventKind::LocalClosed { conn } | KernelEventKind::Closed { conn } => {
                let key = self.conn_for(conn, ts);
                let local = matches!(event.kind, KernelEventKind::LocalClosed { .. });
                if let Some(c) = self.conns.get_mut(&key) {
                    if local
                        && let Some(pid) = event.pid
                        && c.peer_closed.is_none_or(|p| p.ts > ts)
                        && c.server_closed.is_none_or(|(at, _)| ts < at)
                    {
                        c.server_closed = Some((ts, pid));
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
            let guess = self.best_exact(&oldest, &none).map(Ok).or_else(|| {
                self.best_temporal(&oldest, &none).map(|guess| match guess {
                    Guess::One(h) => Ok((JoinRule::Temporal, h)),
                    Guess::Ambiguous => Err(JoinRule::Ambiguous),
                })
            });
            let (matched, unjoined) = match guess {
                Some(Ok(matched)) => (Some(matched), JoinRule::Unjoined),
                Some(Err(rule)) => (None, rule),
                None => (None, JoinRule::Unjoined),
            };
            self.finish_span(oldest, matched, unjoined, true, &mut out);
        }
        // Every head an exact rule can give this span was read before its end, so the exact
        // rules can decide once the kernel events up to the end have arrived; a span they do
        // not join then waits on to `guess_at` (`on_tick`).
        if let Some(pid) = request.instance.pid
            && (self.span_pids.len() < self.config.max_listeners.max(1)
                || self.span_pids.contains(&pid))
        {
            self.span_pids.insert(pid);
        }
        let settle_at = request.end.saturating_add(self.config.settle_delay());
        self.span_ids.insert(ids);
        self.spans.insert(
            (settle_at, request.trace_id, request.span_id),
            Box::new(request),
        );
        out
    }

    /// Whether the runtime serving a connection on `local`, read by `pid`, exports spans:
    /// decided when a request settles, from everything received by then, so that the order
    /// of the inputs does not matter.
    fn exports_spans(&self, local: Option<SocketAddr>, pid: Option<u32>) -> bool {
        let port = local.map(|l| l.port());
        port.is_some_and(|port| {
            self.span_ports.contains(&port)
                || self
                    .listeners
                    .get(&port)
                    .copied()
                    .flatten()
                    .is_some_and(|p| self.span_pids.contains(&p))
        }) || pid.is_some_and(|p| self.span_pids.contains(&p))
    }

    /// Remembers that the runtime on `port` exports spans, within `max_listeners` ports.
    fn note_span_port(&mut self, port: u16) {
        if self.span_ports.len() < self.config.max_listeners.max(1)
            || self.span_ports.contains(&port)
        {
            self.span_ports.insert(port);
        }
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
        conn.requests.insert(
            ts,
            Some(Head {
                pid,
                head,
                response_ids: Vec::new(),
            }),
        );
        self.heads.insert(hk);
    }

    /// Gives the request current on `key` at `ts` (the last head read before it) the response
    /// id the server sent, while it waits to settle.
    fn add_response_id(&mut self, key: ConnKey, ts: UnixNanos, id: String) {
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
        for id in &head.response_ids {
            if let Some(set) = self.by_response_id.get_mut(id)
                && set.remove(&hk)
            {
                self.by_response_id.remove(id);
            }
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
            let candidates = join::request_id_keys(id, &self.config.request_id_prefixes)
                .into_iter()
                .filter_map(|k| self.by_response_id.get(k))
                .flat_map(KeySet::iter)
                .filter(usable);
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::ResponseId, hk));
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
                    self.head_ref(*hk).is_some_and(|(_, head)| {
                        !self.contradicts(span, &head.head) && !self.other_response(span, head)
                    })
                });
            if let Some(hk) = closest(span.arrival, candidates) {
                return Some((JoinRule::ClientAddr, hk));
            }
        }
        None
    }

    /// The unreserved head on the span's instance read closest to its arrival, within the
    /// temporal window, when it fits clearly better than any other: closer to the arrival than
    /// every other candidate by `temporal_margin_ms`. Candidates whose connection shows the
    /// span cannot be theirs are left out first ([`Correlator::cannot_own`]).
    fn best_temporal(
        &self,
        span: &RuntimeRequest,
        reserved: &FastMap<HeadKey, SpanKey>,
    ) -> Option<Guess> {
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
                self.head_ref(*hk).is_some_and(|(conn, head)| {
                    !self.contradicts(span, &head.head)
                        && !self.other_response(span, head)
                        && !Self::cannot_own(span, conn, hk.0)
                })
            })
            .filter(|hk| match (&instance_ports, self.conns.get(&hk.1)) {
                (None, _) => true,
                (Some(ports), Some(conn)) => {
                    conn.pid.is_some() && conn.pid == span.instance.pid
                        || conn.local.is_some_and(|l| ports.contains(&l.port()))
                }
                (Some(_), None) => false,
            });
        let mut by_distance: Vec<(UnixNanos, HeadKey)> = candidates
            .map(|hk| (hk.0.abs_diff(span.arrival), hk))
            .collect();
        by_distance.sort_unstable();
        match by_distance.as_slice() {
            [] => None,
            [(_, only)] => Some(Guess::One(*only)),
            [(best, head), (second, _), ..] => {
                if *second >= best.saturating_add(self.config.temporal_margin()) {
                    Some(Guess::One(*head))
                } else {
                    Some(Guess::Ambiguous)
                }
            }
        }
    }

    /// Whether what the kernel saw of the request read at `head_ts` on `conn` rules `span`
    /// out, whatever the time says: the connection carried more token chunks after its peer
    /// left than the span has output tokens, or the server stopped writing when the peer left
    /// and closed the connection while the span went on decoding to its limit (or, with
    /// per-token times, past that close).
    fn cannot_own(span: &RuntimeRequest, conn: &Conn, head_ts: UnixNanos) -> bool {
        let facts = conn.abort_facts(head_ts);
        let Some((t_c, _)) = facts.close else {
            return false;
        };
        if t_c >= span.end {
            return false;
        }
        let more_writes_than_tokens = !facts.not_started
            && span
                .output_tokens
                .is_some_and(|n| facts.token_writes > n.saturating_add(NON_TOKEN_CHUNKS_MAX));
        let stopped_at_close = facts.last_write.is_none()
            && facts.server_closed.is_some_and(|closed| {
                closed < span.end
                    && (span.finish_reason.as_deref() == Some("length")
                        || span.token_times.iter().any(|t| *t > closed))
            });
        more_writes_than_tokens || stopped_at_close
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

    /// Whether the ids the server sent back on a request rule `span` out: the runtime's own
    /// id came back on the connection and it is not the span's.
    fn other_response(&self, span: &RuntimeRequest, head: &Head) -> bool {
        match &span.request_id {
            Some(id) if !head.response_ids.is_empty() => {
                let keys = join::request_id_keys(id, &self.config.request_id_prefixes);
                !head.response_ids.iter().any(|r| keys.contains(&r.as_str()))
            }
            _ => false,
        }
    }

    /// Emits a settled span: joined to the head `matched` names, else as `unjoined`
    /// ([`JoinRule::Unjoined`] or [`JoinRule::Ambiguous`]); with the client abort it shows,
    /// and its finding when it makes one.
    fn finish_span(
        &mut self,
        span: Box<RuntimeRequest>,
        matched: Option<(JoinRule, HeadKey)>,
        unjoined: JoinRule,
        early: bool,
        out: &mut Vec<Output>,
    ) {
        let joined = matched.and_then(|(rule, hk)| {
            let client = self.client_of(hk);
            let (conn, _) = self.head_ref(hk)?;
            let facts = conn.abort_facts(hk.0);
            let (local, peer, conn_pid) = (conn.local, conn.peer, conn.pid);
            let head = self.take_head(hk)?;
            // Through a watched gateway, the client's own request on it (SPEC 2.1).
            let client = client.and_then(|ck| {
                let cfacts = self.conns.get(&ck.1)?.abort_facts(ck.0);
                let chead = self.take_head(ck)?;
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
            match self.head_quiet(*hk) {
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
            // Through a watched gateway (SPEC 2.1) the request is two heads: the client's on
            // the gateway and the gateway's on the runtime. The client's settles both, once
            // both are due; the gateway's waits for it.
            if self.client_of(hk).is_some() {
                continue;
            }
            let upstream = self.upstream_of(hk);
            if let Some(uk) = upstream {
                let due = self
                    .head_quiet(uk)
                    .is_some_and(|quiet| now >= quiet.saturating_add(span_wait));
                if claims.heads.contains_key(&uk) || !due {
                    continue;
                }
            }
            let Some(conn) = self.conns.get(&hk.1) else {
                continue;
            };
            let facts = conn.abort_facts(hk.0);
            let server_close = conn.server_closed.filter(|(t, _)| {
                *t >= hk.0
                    && conn
                        .requests
                        .next_key_after(&hk.0)
                        .is_none_or(|next| *t < next)
                    && conn.peer_closed.is_none_or(|p| p.ts > *t)
            });
            let (mut local, mut conn_pid) = (conn.local, conn.pid);
            let Some(head) = self.take_head(hk) else {
                continue;
            };
            self.stats.unjoined_heads += 1;
            if let Some((t_close, pid)) = server_close {
                match self.procs.cause(pid, t_close, &self.config.lost_in_flight) {
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
                            tokens_delivered: None,
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
                && let Some(uconn) = self.conns.get(&uk.1)
            {
                let ufacts = uconn.abort_facts(uk.0);
                (local, conn_pid) = (uconn.local, uconn.pid);
                if let Some(uhead) = self.take_head(uk) {
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
            let lag_ns = t_s.map_or(0, |t_s| t_s - t_c);
            let tokens_after = if facts.not_started {
                0
            } else {
                facts.token_writes
            };
            let abort = ClientAbort {
                conn: hk.1.id,
                how,
                model: None,
                t_c,
                t_g: None,
                t_s,
                tokens_after,
                finding: abort::makes_finding(
                    tokens_after,
                    lag_ns,
                    self.config.abort_lag_finding(),
                ),
            };
            self.stats.findings.record_client_abort(abort.finding);
            let finding = abort.finding.then(|| {
                let tp = head.head.traceparent;
                AbortFinding {
                    trace_id: tp.map(|tp| tp.trace_id),
                    parent_span_id: tp.map(|tp| tp.parent_id),
                    request_id: head.head.request_id,
                    tokens_after,
                    tokens_total: None,
                    method: TokenCountMethod::KernelWrites,
                    lag_ns,
                    how,
                    t_c,
                    t_s: t_s.unwrap_or(t_c),
                    t_s_from_span: false,
                    conn: hk.1.id,
                    tenant: head.head.tenant,
                    model: None,
                    join: JoinRule::Unjoined,
                    t_g: None,
                    stalled_at: None,
                }
            });
            out.push(Output::ClientAbort(abort));
            if let Some(finding) = finding {
                self.stats
                    .findings
                    .record_abort(how, finding.tokens_after, false);
                out.push(Output::Abort(finding));
            }
        }
    }

    /// The last thing the kernel saw of the request read at `hk` (its end, the peer's close,
    /// the last write after it), never before the head itself.
    fn head_quiet(&self, hk: HeadKey) -> Option<UnixNanos> {
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

/// Chunks of an OpenAI-compatible stream that carry no token: the first (the role), the last
/// (the finish reason) and the usage chunk.
const NON_TOKEN_CHUNKS_MAX: u64 = 3;

/// What the temporal rule made of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guess {
    /// One head fits clearly best.
    One(HeadKey),
    /// Several heads fit as well as each other: no join, no finding.
    Ambiguous,
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

#[cfg(test)]
mod instance_tests;
