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
//!
//! # Modules
//! This file holds the inputs, the outputs and the orchestration (`on_event`, `on_tick`, the
//! pending spans). The modules below it import one another without cycles, and none imports
//! this file except `settle.rs` and `gateway.rs`, which add methods to [`Correlator`]:
//! - `settle.rs`, `gateway.rs`: a settled span or an unclaimed head into its outputs (the
//!   gateway's two-head case apart);
//! - `join.rs`: the join rules and the search for a span's head; `tables.rs`: connections and
//!   request heads with their indexes (`index.rs`: their small containers);
//! - `abort.rs`, `lost.rs`: client aborts and requests lost in flight;
//! - `kv_eviction/`: conversations, per-instance logs, miss detection and attribution;
//! - `gpu/`: the NVML sample store, process identities, contention and cold starts;
//! - `config.rs`, `stats.rs`: settings and counters.

mod abort;
mod config;
mod gateway;
mod gpu;
mod index;
mod join;
mod kv_eviction;
mod lost;
mod settle;
mod stats;
mod tables;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Bound;

use serde::{Deserialize, Serialize};

pub use abort::{AbortBoundary, AbortFinding, ClientAbort, TokenCountMethod};
pub use config::{CorrelatorConfig, GpuDetectionConfig};
pub use gpu::cold_start::{ColdStartFinding, ColdStartPhase, PhaseSource, StartKind};
pub use gpu::contention::{AffectedRequest, GpuContentionFinding, NoisyNeighbour};
pub use gpu::{GpuMetrics, RequestGpu, RequestGpuFacts};
pub use join::{ConnectionFacts, JoinRule, JoinedRequest};
pub use kv_eviction::{
    ConversationRecord, ConversationTable, KvEvictionConfig, KvEvictionFinding, KvEvictionSizes,
    KvEvictionStats, KvEvidence, MissEvidence, OTHER_TENANT, SELF_TENANT, SpanLink, TenantShare,
    conversation_key, instance_key,
};
pub use lost::{LostCause, LostInFlightConfig, LostInFlightFinding, LostInFlightStats};
pub use stats::{CorrelatorStats, FindingCounts, JoinCounts, StateSizes};
pub use tables::{EvictionCounts, PeerClose};

use crate::model::{
    GpuSample, KernelEvent, KernelEventKind, KvEventBatch, ProcessIdentity, RuntimeRequest,
    StartupSpan, UnixNanos,
};
use join::{Claims, Guess};
use tables::{FastMap, FastSet, HeadKey, SpanKey, Tables};

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

/// The correlator. Build it with [`Correlator::new`], feed it with [`Correlator::on_event`],
/// and call [`Correlator::on_tick`] periodically (every 100 ms or so) with the current time.
#[derive(Debug)]
pub struct Correlator {
    config: CorrelatorConfig,
    stats: CorrelatorStats,
    /// Connections and request heads with their indexes, and the listening ports.
    tables: Tables,
    spans: BTreeMap<SpanKey, Box<RuntimeRequest>>,
    span_ids: FastSet<([u8; 16], [u8; 8])>,
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
            tables: Tables::new(&config),
            config,
            stats: CorrelatorStats::default(),
            spans: BTreeMap::new(),
            span_ids: FastSet::default(),
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
    /// labels bounded by a sticky top-k [`BoundedLabel`](crate::labels::BoundedLabel) (`metric_tenant_labels` tenants, the rest `other`;
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
            connections: self.tables.conns.len(),
            pending_heads: self.tables.heads.len(),
            pending_spans: self.spans.len(),
            listeners: self.tables.listeners.len(),
            requests: self.tables.conns.values().map(|c| c.requests.len()).sum(),
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
                if let KernelEventKind::Refused { local, .. } = &event.kind {
                    self.gpu
                        .on_refused(local.port(), event.ts, &self.config.gpu);
                }
                if let Some(pid) = event.pid {
                    match event.kind {
                        KernelEventKind::Listen { port, .. } => {
                            self.gpu.on_listen(pid, port, event.ts, &self.config.gpu)
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
            match self.tables.best_temporal(span, &claims.heads, &self.config) {
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
        self.tables.expire_connections(
            now,
            self.config.settle_delay(),
            self.config.connection_idle(),
        );
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
            if let Some((rule, head)) = self.tables.best_exact(span, &claims.heads, &self.config) {
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
        self.tables
            .on_kernel(event, &self.config, &mut self.stats.evictions);
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
            let guess = self
                .tables
                .best_exact(&oldest, &none, &self.config)
                .map(Ok)
                .or_else(|| {
                    self.tables
                        .best_temporal(&oldest, &none, &self.config)
                        .map(|guess| match guess {
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
                    .tables
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
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod gpu_tests;

#[cfg(test)]
mod instance_tests;
