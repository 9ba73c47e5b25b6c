//! The correlate stage: feeds kernel events and runtime spans to the sans-IO correlator, holds
//! each runtime span until the correlator has joined it, then forwards it enriched, together
//! with the finding spans, to the span sinks; updates the finding metrics.
//!
//! The stage's only I/O is the identity resolver it is given (procfs reads, cached per pid);
//! sending on a sink queue never waits. Tests drive it directly with a canned resolver;
//! `pipeline::run` owns the loop, the clock and the channels.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::correlator::{
    AbortFinding, ClientAbort, ColdStartFinding, ColdStartPhase, Correlator, GpuContentionFinding,
    Input, JoinRule, JoinedRequest, KvEvictionFinding, LostInFlightFinding, NoisyNeighbour, Output,
    RequestGpuFacts, StartKind,
};
use crate::internal_events::RuntimeSpanLabels;
use crate::model::{GpuSample, KernelEvent, KvEventBatch, ProcessIdentity, UnixNanos};
use crate::otlp_wire::batch::{
    EncodedGroup, EncodedSpan, SpanBatch, SpanGroup, finding_span, kv_f64, kv_i64, kv_str,
};
use crate::otlp_wire::read::{SpanView, rewrite_str_attributes};
use crate::privacy::TenantHasher;
use crate::sinks::SinkSender;
use crate::sinks::prometheus::findings::{
    AbortLabels, AbortLagLabels, ContentionLabels, FindingMetrics, GpuLabels, GpuProcessLabels,
    JoinLabels, KvEvictionLabels, KvUndecidedLabels, LostLabels, StartLabels, TableLabels,
    advance_to,
};
use crate::sources::otlp::RawTraceRequest;
use crate::sources::otlp::adapters::{
    AdapterOptions, RuntimeLabel, SpanAdapter, instance, runtime_of, runtime_of_resource,
    runtime_of_scope, startup,
};

/// A request span waiting for its join: encoded, since it waits a few hundred ms or more (see
/// [`EncodedSpan`]), with the resource and scope it shares with the spans it came with.
#[derive(Debug)]
struct Held {
    group: Arc<SpanGroup>,
    span: EncodedSpan,
}

/// A finding, summarised for logs and the demo.
#[derive(Debug, Clone, PartialEq)]
pub enum FindingSummary {
    /// Tokens billed after the client left.
    Abort(AbortFinding),
    /// Another process on the GPU slowed the runtime's decode.
    GpuContention(GpuContentionFinding),
    /// A runtime instance's cold-start floor.
    ColdStart(ColdStartFinding),
    /// A conversation's warm prefix was evicted.
    KvEviction(KvEvictionFinding),
    /// A request lost in flight.
    LostInFlight(LostInFlightFinding),
}

/// The stage's tables keyed by (trace id, span id), touched several times per span. SipHash (std's
/// default) was a visible share of the per-span cost; foldhash is several times cheaper and
/// still seeded per table, so span ids chosen by a client cannot be aimed at one bucket.
type SpanMap<V> = HashMap<([u8; 16], [u8; 8]), V, foldhash::fast::RandomState>;

/// The counters `on_joined` bumps for every span, kept instead of looked up (label allocation,
/// lock, hash) each time.
#[derive(Debug, Default)]
struct JoinCounters {
    /// `inferwatch_joins_total` per rule (a handful of entries).
    joins: Vec<(JoinRule, Counter)>,
    /// The last model name seen, and its `inferwatch_output_tokens_total` counter: spans come
    /// in runs from one runtime serving one model.
    output_tokens: Option<(Option<String>, Counter)>,
    /// `inferwatch_ttft_seconds` per start kind (cold, warm).
    ttft: Vec<(StartKind, Histogram)>,
}

/// The metric of `key` in a small cache of a label family's members, got from the family
/// (`make`: a label string built and hashed) only the first time.
fn cached_metric<K: PartialEq + Copy, M>(
    cache: &mut Vec<(K, M)>,
    key: K,
    make: impl FnOnce() -> M,
) -> &M {
    let at = match cache.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            cache.push((key, make()));
            cache.len() - 1
        }
    };
    &cache[at].1
}

/// Looks up the identities of a process and of its ancestors (the `PPid` chain that ties a GPU
/// worker to the front process of its runtime, contract §1.4), each once per pid: empty when
/// all are already known or unreadable.
pub type IdentityResolver = Box<dyn FnMut(u32) -> Vec<ProcessIdentity> + Send>;

/// The model a process serves, from its command line
/// ([`crate::sources::procfs::ServedModels`]).
pub type ServedModelResolver = Box<dyn FnMut(u32) -> Option<Arc<str>> + Send>;

/// The correlate stage.
pub struct CorrelateStage {
    correlator: Correlator,
    identities: IdentityResolver,
    adapter: SpanAdapter,
    /// `inferwatch_runtime_spans_total{runtime,adapted}`, by [`RuntimeLabel::ALL`] index and
    /// adapted (1) or not (0); counters resolved once so that a span costs one atomic add.
    runtime_spans: Option<[[Counter; 2]; 5]>,
    held: SpanMap<Held>,
    max_held: usize,
    sinks: Vec<SinkSender>,
    metrics: Arc<FindingMetrics>,
    outgoing: Vec<Held>,
    /// Position in `outgoing` by (trace id, span id): the GPU facts of a request follow its
    /// join and are added to the same span before it leaves.
    outgoing_index: SpanMap<usize>,
    counters: JoinCounters,
    findings: Vec<Span>,
    /// Spans forwarded without enrichment because the held table was full or a duplicate.
    pub held_overflow: u64,
    /// Every finding made, for the log / demo observers (drained by `take_summaries`).
    summaries: Vec<FindingSummary>,
    /// `[privacy] hash_tenants`: tenants are hashed as they leave (findings, forwarded spans).
    tenant_hasher: Option<TenantHasher>,
    /// Names a request head's model from the reading process's command line when the
    /// captured bytes ended before the body's `"model"`.
    served_models: Option<ServedModelResolver>,
}

impl std::fmt::Debug for CorrelateStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorrelateStage")
            .field("held", &self.held.len())
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl CorrelateStage {
    /// A stage around `correlator`, sending to `sinks`.
    pub fn new(
        correlator: Correlator,
        identities: IdentityResolver,
        adapter: AdapterOptions,
        sinks: Vec<SinkSender>,
        metrics: Arc<FindingMetrics>,
    ) -> Self {
        // The correlator settles early rather than grow past its span cap, so a little more
        // room here means a held span is only ever forwarded unenriched on duplicates.
        let max_held = correlator.config().max_pending_spans + 1024;
        Self {
            correlator,
            identities,
            adapter: SpanAdapter::new(adapter),
            runtime_spans: None,
            held: SpanMap::default(),
            max_held,
            sinks,
            metrics,
            outgoing: Vec::new(),
            outgoing_index: SpanMap::default(),
            counters: JoinCounters::default(),
            findings: Vec::new(),
            held_overflow: 0,
            summaries: Vec::new(),
            tenant_hasher: None,
            served_models: None,
        }
    }

    /// Names the model of request heads whose captured bytes did not reach the body's
    /// `"model"` by the reading process's served model (contract §1.2: vLLM's spans name none).
    pub fn with_served_models(mut self, resolver: ServedModelResolver) -> Self {
        self.served_models = Some(resolver);
        self
    }

    /// Counts every received span in `family` by the runtime it came from and whether an
    /// adapter read it (`inferwatch_runtime_spans_total{runtime,adapted}`).
    pub fn with_runtime_spans(mut self, family: &Family<RuntimeSpanLabels, Counter>) -> Self {
        self.runtime_spans = Some(RuntimeLabel::ALL.map(|runtime| {
            [false, true].map(|adapted| {
                family
                    .get_or_create(&RuntimeSpanLabels {
                        runtime: runtime.as_str(),
                        adapted: if adapted { "true" } else { "false" },
                    })
                    .clone()
            })
        }));
        self
    }

    fn count_runtime_span(&self, runtime: RuntimeLabel, adapted: bool) {
        if let Some(counters) = &self.runtime_spans {
            let row = RuntimeLabel::ALL
                .iter()
                .position(|l| *l == runtime)
                .unwrap_or(RuntimeLabel::ALL.len() - 1);
            counters[row][usize::from(adapted)].inc();
        }
    }

    /// Hashes every tenant this stage exports with `hasher` (`[privacy] hash_tenants`).
    pub fn with_tenant_hasher(mut self, hasher: Option<TenantHasher>) -> Self {
        self.tenant_hasher = hasher;
        self
    }

    /// A received span's bytes with the tenant attribute's value hashed (when hashing is on
    /// and the span has one). Runs after `adapt`, so the correlator still joins on the raw id.
    fn hash_tenant_in_span(&self, span: Vec<u8>) -> Vec<u8> {
        let Some(hasher) = &self.tenant_hasher else {
            return span;
        };
        let mut out = Vec::new();
        if rewrite_str_attributes(
            &span,
            &self.adapter.options().tenant_attribute,
            |tenant| hasher.hash(tenant),
            &mut out,
        ) {
            out
        } else {
            span
        }
    }

    /// Replaces the tenant attribute's string value by its hash (a decoded resource).
    fn hash_tenant_attributes(&self, attributes: &mut [KeyValue]) {
        let Some(hasher) = &self.tenant_hasher else {
            return;
        };
        for kv in attributes {
            if kv.key == self.adapter.options().tenant_attribute
                && let Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v)),
                }) = &mut kv.value
            {
                *v = hasher.hash(v);
            }
        }
    }

    /// The correlator, for its stats.
    pub fn correlator(&self) -> &Correlator {
        &self.correlator
    }

    /// Spans waiting for their join.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// A kernel event.
    pub fn on_kernel(&mut self, mut event: KernelEvent) {
        // The listener and the reader of request heads are front processes (contract §1.4):
        // their identity (start time) tells a reused pid and gives the cold start's `t_exec`.
        if let (
            crate::model::KernelEventKind::Listen { .. }
            | crate::model::KernelEventKind::RequestHead { .. },
            Some(pid),
        ) = (&event.kind, event.pid)
        {
            self.identify(pid);
        }
        if let (crate::model::KernelEventKind::RequestHead { head, .. }, Some(pid), Some(models)) =
            (&mut event.kind, event.pid, self.served_models.as_mut())
            && head.model.is_none()
        {
            head.model = models(pid).map(|m| m.to_string());
        }
        let outputs = self.correlator.on_event(Input::Kernel(event));
        self.handle(outputs);
    }

    /// One NVML poll.
    pub fn on_gpu(&mut self, sample: GpuSample) {
        let pids: Vec<u32> = sample.processes.iter().map(|p| p.pid).collect();
        for pid in pids {
            self.identify(pid);
        }
        let outputs = self.correlator.on_event(Input::Gpu(sample));
        self.handle(outputs);
    }

    /// A batch of a runtime's KV-cache events.
    pub fn on_kv_events(&mut self, batch: KvEventBatch) {
        let outputs = self.correlator.on_event(Input::KvEvents(batch));
        self.handle(outputs);
    }

    /// The identity of a process named by a later input.
    pub fn on_process(&mut self, identity: ProcessIdentity) {
        let outputs = self.correlator.on_event(Input::Process(identity));
        self.handle(outputs);
    }

    /// Sends a process's identity (and its ancestors') to the correlator the first time its
    /// pid is named.
    fn identify(&mut self, pid: u32) {
        for identity in (self.identities)(pid) {
            let outputs = self.correlator.on_event(Input::Process(identity));
            self.handle(outputs);
        }
    }

    /// A request from the OTLP receiver: each span the adapters recognise is held until its
    /// join (and given to the correlator), every other span forwarded as it came. Spans stay
    /// the bytes they arrived as (see [`crate::sources::otlp::request`]); only tenant hashing
    /// rewrites one.
    pub fn on_spans(&mut self, request: RawTraceRequest) {
        let mut outputs = Vec::new();
        let mut forwarded = SpanBatch::default();
        for rs in request.resource_spans {
            // The exporting process is looked up once per resource, not once per span: each
            // lookup reads /proc/<pid>/stat (to tell a reused pid), which at 10k spans/s was
            // a visible share of the agent's CPU. One request comes from one process.
            let mut identified: Option<u32> = None;
            let identity = instance(rs.resource.as_ref());
            let resource_runtime = runtime_of_resource(rs.resource.as_ref());
            let startup_process = startup::process(rs.resource.as_ref());
            // The resource as exported: its tenant hashed too.
            let mut exported_resource = rs.resource;
            if let Some(r) = exported_resource.as_mut() {
                self.hash_tenant_attributes(&mut r.attributes);
            }
            for ss in rs.scope_spans {
                let group = Arc::new(SpanGroup {
                    resource: exported_resource.clone(),
                    resource_schema_url: rs.schema_url.clone(),
                    scope: ss.scope,
                    scope_schema_url: ss.schema_url,
                });
                let scope_runtime = resource_runtime.or_else(|| {
                    group
                        .scope
                        .as_ref()
                        .and_then(|scope| runtime_of_scope(&scope.name))
                });
                let mut passed = Vec::new();
                for bytes in ss.spans {
                    // The receiver validated every span (`validate`), so only the top level
                    // is read here; a span that does not read is forwarded as it came.
                    let view = SpanView::read_validated(&bytes);
                    let adapted = view
                        .as_ref()
                        .and_then(|view| self.adapter.adapt(view, &identity));
                    if self.runtime_spans.is_some() {
                        let name = view.as_ref().map_or("", |v| v.name);
                        let runtime =
                            runtime_of(name, adapted.as_ref().map(|r| r.runtime), scope_runtime);
                        self.count_runtime_span(runtime, adapted.is_some());
                    }
                    // A runtime's start-up span goes on as it came, and to the correlator as
                    // its cold-start phase.
                    let started = match (&adapted, &view) {
                        (None, Some(view)) => startup::recognise(view, &startup_process),
                        _ => None,
                    };
                    let span = EncodedSpan::from_received(self.hash_tenant_in_span(bytes));
                    let Some(request) = adapted else {
                        if let Some(started) = started {
                            if let Some(pid) = started.process_pid
                                && identified != Some(pid)
                            {
                                identified = Some(pid);
                                for identity in (self.identities)(pid) {
                                    outputs
                                        .extend(self.correlator.on_event(Input::Process(identity)));
                                }
                            }
                            outputs.extend(self.correlator.on_event(Input::Startup(started)));
                        }
                        passed.push(span);
                        continue;
                    };
                    let key = (request.trace_id, request.span_id);
                    if self.held.len() >= self.max_held || self.held.contains_key(&key) {
                        self.held_overflow += 1;
                        passed.push(span);
                        continue;
                    }
                    self.held.insert(
                        key,
                        Held {
                            group: group.clone(),
                            span,
                        },
                    );
                    if let Some(pid) = request.instance.pid
                        && identified != Some(pid)
                    {
                        identified = Some(pid);
                        for identity in (self.identities)(pid) {
                            outputs.extend(self.correlator.on_event(Input::Process(identity)));
                        }
                    }
                    outputs.extend(self.correlator.on_event(Input::Runtime(request)));
                }
                if !passed.is_empty() {
                    forwarded.encoded.push(EncodedGroup {
                        group,
                        spans: passed,
                    });
                }
            }
        }
        if !forwarded.encoded.is_empty() {
            self.send(forwarded);
        }
        self.handle(outputs);
    }

    /// Advances the correlator's clock, then sends what settled.
    pub fn on_tick(&mut self, now: UnixNanos) {
        let outputs = self.correlator.on_tick(now);
        self.handle(outputs);
        self.sync_stats();
        self.flush();
    }

    /// Findings made since the last call.
    pub fn take_summaries(&mut self) -> Vec<FindingSummary> {
        std::mem::take(&mut self.summaries)
    }

    /// Forwards every held span (unenriched) and pending finding: used at shutdown.
    pub fn drain(&mut self) {
        let held: Vec<Held> = self.held.drain().map(|(_, h)| h).collect();
        self.outgoing.extend(held);
        self.flush();
    }

    fn handle(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Joined(joined) => self.on_joined(joined),
                Output::Abort(finding) => self.on_abort(finding),
                Output::ClientAbort(abort) => self.on_client_abort(abort),
                Output::RequestGpu(facts) => self.on_request_gpu(facts),
                Output::GpuContention(finding) => self.on_contention(finding),
                Output::ColdStart(finding) => self.on_cold_start(finding),
                Output::KvEviction(finding) => self.on_kv_eviction(finding),
                Output::LostInFlight(finding) => self.on_lost_in_flight(finding),
            }
        }
    }

    fn on_joined(&mut self, joined: JoinedRequest) {
        let request = &joined.request;
        let tokens = self.output_tokens_counter(request.model.as_deref());
        if let Some(n) = request.output_tokens {
            tokens.inc_by(n);
        }
        self.join_counter(joined.join).inc();
        let Some(mut held) = self.held.remove(&(request.trace_id, request.span_id)) else {
            return;
        };
        held.span
            .add_str_attribute("inferwatch.join", joined.join.as_str());
        if let Some(tp) = joined.client_trace {
            // Into the client's trace (SPEC 2.1); the trace it came in is kept as an attribute.
            held.span.add_str_attribute(
                "inferwatch.runtime_trace_id",
                &hex::encode(request.trace_id),
            );
            held.span.move_to_trace(&tp.trace_id, &tp.parent_id);
        }
        self.outgoing_index
            .insert((request.trace_id, request.span_id), self.outgoing.len());
        self.outgoing.push(held);
    }

    /// The output-token counter of `model`, looked up again only when the model changes.
    /// `FindingMetrics::model` registers the name in its bounded label set and then always
    /// answers the same for it, so skipping repeated calls changes nothing.
    fn output_tokens_counter(&mut self, model: Option<&str>) -> &Counter {
        let cached = &mut self.counters.output_tokens;
        if cached.as_ref().is_none_or(|(m, _)| m.as_deref() != model) {
            let labels = self.metrics.model(model);
            let counter = self.metrics.output_tokens.get_or_create(&labels).clone();
            *cached = Some((model.map(str::to_owned), counter));
        }
        let (_, counter) = cached.as_ref().expect("just filled");
        counter
    }

    fn join_counter(&mut self, rule: JoinRule) -> &Counter {
        let family = &self.metrics.joins;
        cached_metric(&mut self.counters.joins, rule, || {
            family
                .get_or_create(&JoinLabels {
                    rule: rule.as_str().to_owned(),
                })
                .clone()
        })
    }

    fn on_request_gpu(&mut self, facts: RequestGpuFacts) {
        if let Some(ttft) = facts.ttft_ns {
            self.ttft_histogram(facts.start).observe(ttft as f64 / 1e9);
        }
        let Some(&at) = self.outgoing_index.get(&(facts.trace_id, facts.span_id)) else {
            return;
        };
        let Some(held) = self.outgoing.get_mut(at) else {
            return;
        };
        held.span
            .add_str_attribute("inferwatch.start", facts.start.as_str());
        if let Some(wait) = facts.start_wait_ns {
            held.span
                .add_attributes([kv_f64("inferwatch.start.wait_ms", wait as f64 / 1e6)]);
        }
        if let Some(gpu) = facts.gpus.first() {
            held.span
                .add_str_attribute("inferwatch.gpu.uuid", &gpu.uuid);
            if let Some(sm) = gpu.sm_util {
                held.span
                    .add_attributes([kv_f64("inferwatch.gpu.sm_util", sm)]);
            }
        }
        if let Some(n) = &facts.neighbour {
            held.span.add_attributes(neighbour_attributes(n));
        }
    }

    /// `inferwatch_ttft_seconds{start}` of `start`, looked up in the family once per kind.
    fn ttft_histogram(&mut self, start: StartKind) -> &Histogram {
        let family = &self.metrics.ttft;
        cached_metric(&mut self.counters.ttft, start, || {
            family
                .get_or_create(&StartLabels {
                    start: start.as_str().to_owned(),
                })
                .clone()
        })
    }

    fn on_contention(&mut self, finding: GpuContentionFinding) {
        self.metrics
            .gpu_contention_seconds
            .get_or_create(&ContentionLabels {
                gpu: finding.gpu_uuid.clone(),
                neighbour: finding.neighbour.label(),
            })
            .inc_by(finding.seconds());
        let mut attributes = vec![
            kv_str("inferwatch.gpu.uuid", &finding.gpu_uuid),
            kv_f64("inferwatch.contention.tpot_inflation", finding.inflation),
            kv_f64(
                "inferwatch.contention.tpot_baseline_ms",
                finding.tpot_baseline_ns as f64 / 1e6,
            ),
            kv_f64(
                "inferwatch.contention.tpot_ms",
                finding.tpot_ns as f64 / 1e6,
            ),
            kv_f64("inferwatch.contention.others_sm_pct", finding.others_sm_pct),
            kv_i64("process.pid", i64::from(finding.runtime_pid)),
        ];
        attributes.extend(neighbour_attributes(&finding.neighbour));
        // One span in each affected request's trace, so the backend shows it inside the
        // request (contract §4.1); the list is bounded by the correlator.
        for affected in &finding.affected {
            self.findings.push(finding_span(
                "inferwatch.gpu_contention",
                affected.trace_id,
                affected.span_id,
                finding.start,
                finding.end,
                attributes.clone(),
            ));
        }
        if finding.affected.is_empty() {
            let mut span = finding_span(
                "inferwatch.gpu_contention",
                new_trace_id(),
                [0; 8],
                finding.start,
                finding.end,
                attributes,
            );
            span.parent_span_id.clear();
            self.findings.push(span);
        }
        self.summaries.push(FindingSummary::GpuContention(finding));
    }

    fn on_kv_eviction(&mut self, finding: KvEvictionFinding) {
        let mut attributes = vec![
            kv_str("inferwatch.kv_eviction.method", finding.method.as_str()),
            kv_str("inferwatch.kv.evidence", finding.evidence.as_str()),
            kv_i64(
                "inferwatch.kv_eviction.expected_cached_tokens",
                finding.expected_cached_tokens as i64,
            ),
            kv_i64(
                "inferwatch.kv_eviction.cached_tokens",
                finding.cached_tokens as i64,
            ),
            kv_f64("inferwatch.noisy_neighbour.share", finding.neighbour_share),
            kv_str("gen_ai.conversation.id", &finding.victim_conversation),
            kv_str(
                "inferwatch.kv_eviction.top_tenants",
                &finding
                    .top_tenants
                    .iter()
                    .map(|t| format!("{}={:.3}", t.tenant, t.share))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        if let Some(n) = &finding.neighbour_tenant {
            attributes.push(kv_str("inferwatch.noisy_neighbour.tenant", n));
        }
        if let Some(t) = &finding.victim_tenant {
            attributes.push(kv_str("tenant.id", t));
        }
        if let Some(id) = &finding.victim_request_id {
            attributes.push(kv_str("gen_ai.request.id", id));
        }
        if let Some(m) = &finding.model {
            attributes.push(kv_str("gen_ai.request.model", m));
        }
        if let Some(p) = finding.ttft_penalty_ns {
            attributes.push(kv_f64(
                "inferwatch.kv_eviction.ttft_penalty_ms",
                p as f64 / 1e6,
            ));
        }
        if let Some(t) = finding.ttft_ns {
            attributes.push(kv_f64("gen_ai.latency.time_to_first_token", t as f64 / 1e9));
        }
        if let Some(b) = finding.victim_blocks_removed {
            attributes.push(kv_i64(
                "inferwatch.kv_eviction.victim_blocks_removed",
                b as i64,
            ));
        }
        let mut span = finding_span(
            "inferwatch.kv_eviction",
            finding.trace_id,
            finding.parent_span_id,
            finding.window_start,
            finding.window_end,
            attributes,
        );
        // Links to the neighbour's requests in the window: the backend can jump to them.
        span.links = finding
            .neighbour_links
            .iter()
            .map(|l| opentelemetry_proto::tonic::trace::v1::span::Link {
                trace_id: l.trace_id.to_vec(),
                span_id: l.span_id.to_vec(),
                ..Default::default()
            })
            .collect();
        self.findings.push(span);
        self.summaries.push(FindingSummary::KvEviction(finding));
    }

    fn on_cold_start(&mut self, finding: ColdStartFinding) {
        self.metrics
            .cold_start_floor
            .observe(finding.floor_seconds());
        let mut attributes = vec![
            kv_f64(
                "inferwatch.cold_start.floor_ms",
                finding.floor_ns as f64 / 1e6,
            ),
            kv_str("inferwatch.cold_start.floor_from", &finding.floor_from),
            kv_i64(
                "inferwatch.cold_start.runtime_spans",
                finding.runtime_spans as i64,
            ),
            kv_i64("process.pid", i64::from(finding.pid)),
        ];
        if let Some(exe) = &finding.executable {
            attributes.push(kv_str("process.executable.name", exe));
        }
        if let Some(id) = &finding.container_id {
            attributes.push(kv_str("container.id", id));
        }
        if let Some(uid) = &finding.pod_uid {
            attributes.push(kv_str("k8s.pod.uid", uid));
        }
        if let Some(uuid) = finding.gpu_uuids.first() {
            attributes.push(kv_str("inferwatch.gpu.uuid", uuid));
        }
        if let Some(bytes) = finding.weights_bytes {
            attributes.push(kv_i64("inferwatch.cold_start.weights_bytes", bytes as i64));
        }
        let start = finding
            .t_exec
            .unwrap_or(finding.t_first_token.saturating_sub(finding.floor_ns));
        let root = finding_span(
            "inferwatch.cold_start",
            finding.trace_id,
            finding.span_id,
            start,
            finding.t_first_token,
            attributes,
        );
        let root_id: [u8; 8] = root.span_id.as_slice().try_into().unwrap_or([0; 8]);
        for phase in &finding.phases {
            self.findings.push(finding_span(
                &format!("inferwatch.cold_start.{}", phase.name),
                finding.trace_id,
                root_id,
                phase.start,
                phase.end,
                phase_attributes(phase),
            ));
        }
        self.findings.push(root);
        self.summaries.push(FindingSummary::ColdStart(finding));
    }

    fn on_lost_in_flight(&mut self, mut finding: LostInFlightFinding) {
        if let (Some(hasher), Some(tenant)) = (&self.tenant_hasher, finding.tenant.as_mut()) {
            *tenant = hasher.hash(tenant);
        }
        let model = self.metrics.model(finding.model.as_deref());
        self.metrics
            .lost_in_flight
            .get_or_create(&LostLabels {
                cause: finding.cause.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
        let mut attributes = vec![
            kv_str("inferwatch.lost.cause", finding.cause.as_str()),
            kv_f64("inferwatch.lost.ran_ms", finding.ran_ns() as f64 / 1e6),
            kv_i64("process.pid", i64::from(finding.pid)),
        ];
        if let Some(code) = finding.exit_code {
            attributes.push(kv_i64("inferwatch.lost.exit_code", i64::from(code)));
        }
        if let Some(signal) = finding.signal {
            attributes.push(kv_i64("inferwatch.lost.signal", i64::from(signal)));
        }
        if let Some(tokens) = finding.tokens_delivered {
            attributes.push(kv_i64("inferwatch.lost.tokens_delivered", tokens as i64));
        }
        if let Some(id) = &finding.request_id {
            attributes.push(kv_str("gen_ai.request.id", id));
        }
        if let Some(tenant) = &finding.tenant {
            attributes.push(kv_str("tenant.id", tenant));
        }
        if let Some(model) = &finding.model {
            attributes.push(kv_str("gen_ai.request.model", model));
        }
        let trace_id = finding.trace_id.unwrap_or_else(new_trace_id);
        let mut span = finding_span(
            "inferwatch.lost_in_flight",
            trace_id,
            finding.parent_span_id.unwrap_or([0; 8]),
            finding.started,
            finding.lost_at,
            attributes,
        );
        if finding.parent_span_id.is_none() {
            span.parent_span_id.clear();
        }
        self.findings.push(span);
        self.summaries.push(FindingSummary::LostInFlight(finding));
    }

    /// Every client abort: counted, and its lag to each boundary observed (contract §3.1).
    fn on_client_abort(&mut self, abort: ClientAbort) {
        let model = self.metrics.model(abort.model.as_deref());
        self.metrics
            .client_aborts
            .get_or_create(&AbortLabels {
                how: abort.how.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
        for (boundary, lag_ns) in abort.lags() {
            self.metrics
                .abort_lag
                .get_or_create(&AbortLagLabels {
                    boundary: boundary.as_str().to_owned(),
                    model: model.model.clone(),
                })
                .observe(lag_ns as f64 / 1e9);
        }
    }

    fn on_abort(&mut self, mut finding: AbortFinding) {
        // Hashed here, once, so the span, the summary and the log line all carry the hash.
        if let (Some(hasher), Some(tenant)) = (&self.tenant_hasher, finding.tenant.as_mut()) {
            *tenant = hasher.hash(tenant);
        }
        let model = self.metrics.model(finding.model.as_deref());
        self.metrics
            .billed_after_abort_tokens
            .get_or_create(&model)
            .inc_by(finding.tokens_after);
        self.metrics
            .aborts
            .get_or_create(&AbortLabels {
                how: finding.how.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
        let mut attributes = vec![
            kv_i64("inferwatch.abort.tokens_after", finding.tokens_after as i64),
            kv_str("inferwatch.abort.method", finding.method.as_str()),
            kv_f64("inferwatch.abort.lag_ms", finding.lag_ns as f64 / 1e6),
            kv_str("inferwatch.abort.how", finding.how.as_str()),
            kv_str("inferwatch.join", finding.join.as_str()),
        ];
        if let Some(total) = finding.tokens_total {
            attributes.push(kv_i64("inferwatch.abort.tokens_total", total as i64));
        }
        // The boundaries a cancel crossed (SPEC 2.1), as unix nanos; t_g only through a
        // watched gateway, with the boundary that held it.
        attributes.push(kv_i64("inferwatch.abort.t_c", finding.t_c as i64));
        attributes.push(kv_i64("inferwatch.abort.t_s", finding.t_s as i64));
        if let Some(t_g) = finding.t_g {
            attributes.push(kv_i64("inferwatch.abort.t_g", t_g as i64));
        }
        if let Some(stalled) = finding.stalled_at {
            attributes.push(kv_str("inferwatch.abort.stalled_at", stalled.as_str()));
        }
        if let Some(id) = &finding.request_id {
            attributes.push(kv_str("gen_ai.request.id", id));
        }
        if let Some(tenant) = &finding.tenant {
            attributes.push(kv_str("tenant.id", tenant));
        }
        if let Some(model) = &finding.model {
            attributes.push(kv_str("gen_ai.request.model", model));
        }
        // With neither a span nor a traceparent the finding starts its own trace.
        let trace_id = finding.trace_id.unwrap_or_else(new_trace_id);
        let parent = finding.parent_span_id.unwrap_or([0; 8]);
        let mut span = finding_span(
            "inferwatch.abort",
            trace_id,
            parent,
            finding.t_c,
            finding.t_s,
            attributes,
        );
        if finding.parent_span_id.is_none() {
            span.parent_span_id.clear();
        }
        self.findings.push(span);
        self.summaries.push(FindingSummary::Abort(finding));
    }

    /// Copies the GPU gauges (latest NVML sample) into the metrics; the process gauges are
    /// rebuilt so that processes that left the GPU disappear.
    pub fn sync_gpu_metrics(&self) {
        let gpu = self.correlator.gpu_metrics();
        let m = &self.metrics;
        advance_to(
            &m.gpu_requests_without_instance,
            gpu.requests_without_instance,
        );
        for g in &gpu.gpus {
            let labels = GpuLabels {
                gpu: g.uuid.clone(),
            };
            if let Some(sm) = g.sm_util {
                m.gpu_sm_util.get_or_create(&labels).set(i64::from(sm));
            }
            if let Some(used) = g.memory_used {
                m.gpu_memory_used.get_or_create(&labels).set(used as i64);
            }
            if let Some(total) = g.memory_total {
                m.gpu_memory_total.get_or_create(&labels).set(total as i64);
            }
        }
        m.gpu_process_sm_util.clear();
        m.gpu_process_memory.clear();
        for (p, identity) in &gpu.processes {
            let labels = GpuProcessLabels {
                gpu: p.gpu_uuid.clone(),
                pid: p.pid.to_string(),
                executable: identity
                    .as_ref()
                    .and_then(|i| i.executable.clone())
                    .unwrap_or_default(),
            };
            if let Some(sm) = p.sm_util {
                m.gpu_process_sm_util
                    .get_or_create(&labels)
                    .set(i64::from(sm));
            }
            if let Some(mem) = p.used_memory {
                m.gpu_process_memory.get_or_create(&labels).set(mem as i64);
            }
        }
    }

    fn sync_stats(&self) {
        let stats = self.correlator.stats();
        let m = &self.metrics;
        for ((victim, neighbour), total) in self.correlator.kv_eviction_counts() {
            advance_to(
                &m.kv_evictions.get_or_create(&KvEvictionLabels {
                    victim_tenant: victim.clone(),
                    neighbour_tenant: neighbour.clone(),
                }),
                *total,
            );
        }
        for (table, total) in [
            ("connections", stats.evictions.connections),
            ("heads", stats.evictions.heads),
            ("spans", stats.evictions.spans),
            ("listeners", stats.evictions.listeners),
            ("conversations", stats.kv_eviction.conversations_dropped),
            ("processes", stats.lost_in_flight.evictions),
            ("kv_blocks", stats.kv_eviction.kv_blocks_dropped),
        ] {
            advance_to(
                &m.correlator_evictions.get_or_create(&TableLabels {
                    table: table.to_owned(),
                }),
                total,
            );
        }
        advance_to(&m.lost_in_flight_ambiguous, stats.lost_in_flight.ambiguous);
        let kv = &stats.kv_eviction;
        for (reason, total) in [
            ("kv_ambiguous_store", kv.kv_ambiguous_stores),
            ("kv_incomplete", kv.kv_turns_undecided),
            ("kv_shared_evictor_store", kv.kv_shared_evictor_stores),
            ("prefill_time", kv.prefill_time_undecided),
        ] {
            advance_to(
                &m.kv_eviction_undecided.get_or_create(&KvUndecidedLabels {
                    reason: reason.to_owned(),
                }),
                total,
            );
        }
    }

    /// Sends the enriched spans and findings gathered since the last flush as one batch.
    fn flush(&mut self) {
        if self.outgoing.is_empty() && self.findings.is_empty() {
            return;
        }
        self.outgoing_index.clear();
        let mut batch = SpanBatch::default();
        // One group per received (resource, scope).
        for held in self.outgoing.drain(..) {
            match batch
                .encoded
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g.group, &held.group))
            {
                Some(g) => g.spans.push(held.span),
                None => batch.encoded.push(EncodedGroup {
                    group: held.group,
                    spans: vec![held.span],
                }),
            }
        }
        for span in self.findings.drain(..) {
            batch.push_finding(span);
        }
        self.send(batch);
    }

    fn send(&self, batch: SpanBatch) {
        match self.sinks.split_last() {
            None => {}
            Some((last, rest)) => {
                for sink in rest {
                    sink.send(batch.clone());
                }
                last.send(batch);
            }
        }
    }
}

/// `inferwatch.noisy_neighbour.*` for a process neighbour.
/// The attributes of one `inferwatch.cold_start.<phase>` span.
fn phase_attributes(phase: &ColdStartPhase) -> Vec<KeyValue> {
    let mut attributes = vec![
        kv_f64(
            "inferwatch.cold_start.phase_ms",
            phase.duration_ns() as f64 / 1e6,
        ),
        kv_str("inferwatch.cold_start.phase_source", phase.source.as_str()),
    ];
    if let Some(name) = &phase.runtime_span {
        attributes.push(kv_str("inferwatch.cold_start.runtime_span", name));
    }
    attributes
}

fn neighbour_attributes(n: &NoisyNeighbour) -> Vec<KeyValue> {
    let mut out = vec![
        kv_i64("inferwatch.noisy_neighbour.pid", i64::from(n.pid)),
        // The correlator keeps SM shares in percent (as NVML reports them); the attribute is a
        // share in 0..1, like the KV-eviction one.
        kv_f64("inferwatch.noisy_neighbour.share", n.sm_share / 100.0),
    ];
    if let Some(exe) = &n.executable {
        out.push(kv_str("inferwatch.noisy_neighbour.executable", exe));
    }
    if let Some(id) = &n.container_id {
        out.push(kv_str("inferwatch.noisy_neighbour.container_id", id));
    }
    if let Some(uid) = &n.pod_uid {
        out.push(kv_str("inferwatch.noisy_neighbour.pod_uid", uid));
    }
    out
}

/// A random, non-zero trace id for findings that have no trace of their own.
fn new_trace_id() -> [u8; 16] {
    let a = crate::otlp_wire::batch::new_span_id();
    let b = crate::otlp_wire::batch::new_span_id();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a);
    id[8..].copy_from_slice(&b);
    id
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::correlator::CorrelatorConfig;
    use crate::internal_events::AgentMetrics;
    use crate::sinks::otlp::ExportConfig;
    use crate::sources::otlp::sample::vllm_request;

    #[test]
    fn the_exporting_process_is_looked_up_once_per_resource() {
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let finding_metrics = Arc::new(FindingMetrics::register(&mut registry));
        let (tx, _queue) = ExportConfig::default().queue(metrics);
        let lookups = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&lookups);
        let mut stage = CorrelateStage::new(
            Correlator::new(CorrelatorConfig::default()),
            Box::new(move |pid| {
                counted.fetch_add(1, Ordering::Relaxed);
                vec![ProcessIdentity {
                    pid,
                    executable: Some("vllm".into()),
                    container_id: None,
                    pod_uid: None,
                    start_time: None,
                    parent_pid: None,
                }]
            }),
            AdapterOptions::default(),
            vec![tx],
            finding_metrics,
        );
        // Two requests (resources) of 64 spans each, from the same process.
        stage.on_spans(RawTraceRequest::from(vllm_request(0, 64)));
        stage.on_spans(RawTraceRequest::from(vllm_request(64, 64)));
        assert_eq!(stage.held_len(), 128);
        assert_eq!(lookups.load(Ordering::Relaxed), 2);
    }

    /// The tenant attribute of a decoded span.
    fn tenant_of(span: &Span) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key == "tenant.id")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
    }

    #[test]
    fn received_spans_leave_as_they_came_with_only_the_tenant_hashed() {
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let finding_metrics = Arc::new(FindingMetrics::register(&mut registry));
        let (tx, mut queue) = ExportConfig::default().queue(metrics);
        let hasher = TenantHasher::new("key");
        let mut stage = CorrelateStage::new(
            Correlator::new(CorrelatorConfig::default()),
            Box::new(|_| Vec::new()),
            AdapterOptions::default(),
            vec![tx],
            finding_metrics,
        )
        .with_tenant_hasher(Some(hasher));
        let mut request = vllm_request(0, 2);
        // A span no adapter reads, with a tenant, after the two request spans.
        let other = Span {
            trace_id: vec![7; 16],
            span_id: vec![8; 8],
            name: "db.query".into(),
            attributes: vec![kv_str("tenant.id", "acme"), kv_str("db.system", "pg")],
            ..Default::default()
        };
        request.resource_spans[0].scope_spans[0]
            .spans
            .push(other.clone());
        let received = request.resource_spans[0].scope_spans[0].spans.clone();
        stage.on_spans(RawTraceRequest::from(request));

        // The span no adapter reads leaves at once, its tenant hashed and nothing else changed.
        let now = queue
            .try_recv()
            .expect("the unknown span is forwarded at once");
        assert_eq!(now.span_count(), 1);
        let mut forwarded = now.encoded[0].spans[0].decode().expect("decodes");
        assert_eq!(tenant_of(&forwarded), Some(hasher.hash("acme")));
        forwarded.attributes[0] = kv_str("tenant.id", "acme");
        assert_eq!(forwarded, other);
        let group = &now.encoded[0].group;
        assert_eq!(
            group.scope.as_ref().map(|s| s.name.as_str()),
            Some("vllm.entrypoints.openai.api_server")
        );

        // The request spans leave once settled: their own attributes in order, the tenant
        // hashed, the agent's appended after them.
        stage.on_tick(1_760_000_100_000_000_000);
        let settled = queue.try_recv().expect("the request spans settle");
        let spans: Vec<Span> = settled
            .encoded
            .iter()
            .flat_map(|g| g.spans.iter())
            .map(|s| s.decode().expect("decodes"))
            .collect();
        assert_eq!(spans.len(), 2);
        for span in spans {
            let original = received
                .iter()
                .find(|r| r.span_id == span.span_id)
                .expect("one of the request spans");
            let n = original.attributes.len();
            assert_eq!(
                tenant_of(&span),
                tenant_of(original).map(|t| hasher.hash(&t))
            );
            let mut own = span.attributes[..n].to_vec();
            let at = own
                .iter()
                .position(|kv| kv.key == "tenant.id")
                .expect("tenant");
            own[at] = original.attributes[at].clone();
            assert_eq!(own, original.attributes);
            assert!(
                span.attributes[n..]
                    .iter()
                    .all(|kv| kv.key.starts_with("inferwatch."))
            );
            assert_eq!(
                Span {
                    attributes: Vec::new(),
                    ..span
                },
                Span {
                    attributes: Vec::new(),
                    ..original.clone()
                }
            );
        }
    }
}
