//! The correlate stage: routes kernel events, GPU samples, KV events and adapted runtime spans
//! to the sans-IO correlator, and its outputs to where they go: each runtime request span is
//! held ([`held`](super::held)) until the correlator has joined it, then forwarded with the
//! attributes of its join ([`render`]), together with the finding spans, to the span sinks;
//! every output is counted ([`FindingMetrics::record`]).
//!
//! The stage's only I/O is the identity resolver it is given (procfs reads, cached per pid);
//! sending on a sink queue never waits. Tests drive it directly with a canned resolver;
//! `pipeline::run` owns the loop, the clock and the channels.

use std::sync::Arc;

use opentelemetry_proto::tonic::trace::v1::Span;

use super::held::HeldSpans;
use super::summary::FindingSummary;
use crate::correlator::{Correlator, Input, Output};
use crate::model::{GpuSample, KernelEvent, KvEventBatch, ProcessIdentity, UnixNanos};
use crate::otlp_wire::batch::{EncodedGroup, SpanBatch};
use crate::privacy::TenantHasher;
use crate::sinks::SinkSender;
use crate::sinks::otlp::render;
use crate::sinks::prometheus::findings::FindingMetrics;
use crate::sources::otlp::AdaptedRequest;
use crate::sources::otlp::adapted::{AdaptedSpan, SpanRole};

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
    held: HeldSpans,
    sinks: Vec<SinkSender>,
    metrics: Arc<FindingMetrics>,
    findings: Vec<Span>,
    /// Every finding made, for the log / demo observers (drained by `take_summaries`).
    summaries: Vec<FindingSummary>,
    /// `[privacy] hash_tenants`: the tenants of findings are hashed as they leave (the
    /// receiver hashes those of forwarded spans).
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
        sinks: Vec<SinkSender>,
        metrics: Arc<FindingMetrics>,
    ) -> Self {
        // The correlator settles early rather than grow past its span cap, so a little more
        // room here means a held span is only ever forwarded unenriched on duplicates.
        let max_held = correlator.config().max_pending_spans + 1024;
        Self {
            correlator,
            identities,
            held: HeldSpans::new(max_held),
            sinks,
            metrics,
            findings: Vec::new(),
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

    /// Hashes the tenant of every finding this stage exports with `hasher`
    /// (`[privacy] hash_tenants`).
    pub fn with_tenant_hasher(mut self, hasher: Option<TenantHasher>) -> Self {
        self.tenant_hasher = hasher;
        self
    }

    /// The correlator, for its stats.
    pub fn correlator(&self) -> &Correlator {
        &self.correlator
    }

    /// Spans waiting for their join.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Spans forwarded without enrichment because the held table was full or a duplicate.
    pub fn held_overflow(&self) -> u64 {
        self.held.overflow
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

    /// A request from the OTLP receiver, its spans adapted there: each request span is held
    /// until its join (and given to the correlator), every other span forwarded as it came,
    /// a start-up span also given to the correlator as a cold-start phase.
    pub fn on_spans(&mut self, request: AdaptedRequest) {
        let mut outputs = Vec::new();
        let mut forwarded = SpanBatch::default();
        for resource in request.resources {
            // The exporting process is looked up once per resource, not once per span: each
            // lookup reads /proc/<pid>/stat (to tell a reused pid), which at 10k spans/s was
            // a visible share of the agent's CPU. One request comes from one process.
            let mut identified: Option<u32> = None;
            for scope in resource.scopes {
                let mut passed = Vec::new();
                for AdaptedSpan { span, role } in scope.spans {
                    let pid = match &role {
                        SpanRole::Request(request) => request.instance.pid,
                        SpanRole::Startup(started) => started.process_pid,
                        SpanRole::Other => None,
                    };
                    let input = match role {
                        SpanRole::Other => {
                            passed.push(span);
                            continue;
                        }
                        SpanRole::Startup(started) => {
                            passed.push(span);
                            Input::Startup(started)
                        }
                        SpanRole::Request(request) => {
                            let key = (request.trace_id, request.span_id);
                            if let Err(span) = self.held.hold(key, &scope.group, span) {
                                passed.push(span);
                                continue;
                            }
                            Input::Runtime(request)
                        }
                    };
                    if let Some(pid) = pid
                        && identified != Some(pid)
                    {
                        identified = Some(pid);
                        for identity in (self.identities)(pid) {
                            outputs.extend(self.correlator.on_event(Input::Process(identity)));
                        }
                    }
                    outputs.extend(self.correlator.on_event(input));
                }
                if !passed.is_empty() {
                    forwarded.encoded.push(EncodedGroup {
                        group: scope.group,
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
        self.metrics.sync_correlator(&self.correlator);
        self.flush();
    }

    /// Findings made since the last call.
    pub fn take_summaries(&mut self) -> Vec<FindingSummary> {
        std::mem::take(&mut self.summaries)
    }

    /// Forwards every held span (unenriched) and pending finding: used at shutdown.
    pub fn drain(&mut self) {
        self.held.release_all();
        self.flush();
    }

    /// Routes each output: counted, a joined span's facts onto the held span, a finding
    /// rendered as spans and summarised.
    fn handle(&mut self, outputs: Vec<Output>) {
        for mut output in outputs {
            // Hashed here, once, so the span, the summary and the log line all carry the hash.
            self.hash_finding_tenant(&mut output);
            self.metrics.record(&output);
            match &output {
                Output::Joined(joined) => {
                    let key = (joined.request.trace_id, joined.request.span_id);
                    if let Some(span) = self.held.release(key) {
                        render::joined(span, joined);
                    }
                }
                Output::RequestGpu(facts) => {
                    if let Some(span) = self.held.outgoing_mut((facts.trace_id, facts.span_id)) {
                        render::request_gpu(span, facts);
                    }
                }
                _ => render::finding_spans(&output, &mut self.findings),
            }
            self.summaries.extend(FindingSummary::of(output));
        }
    }

    /// Replaces the tenant of an abort or lost-in-flight finding by its hash, when hashing is on.
    fn hash_finding_tenant(&self, output: &mut Output) {
        let Some(hasher) = &self.tenant_hasher else {
            return;
        };
        let tenant = match output {
            Output::Abort(finding) => finding.tenant.as_mut(),
            Output::LostInFlight(finding) => finding.tenant.as_mut(),
            _ => None,
        };
        if let Some(tenant) = tenant {
            *tenant = hasher.hash(tenant);
        }
    }

    /// Copies the GPU gauges (latest NVML sample) into the metrics.
    pub fn sync_gpu_metrics(&self) {
        self.metrics.sync_gpu(&self.correlator);
    }

    /// Sends the enriched spans and findings gathered since the last flush as one batch.
    fn flush(&mut self) {
        if let Some(batch) = self.held.take_batch(&mut self.findings) {
            self.send(batch);
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus_client::registry::Registry;

    use opentelemetry_proto::tonic::common::v1::any_value;

    use super::*;
    use crate::correlator::CorrelatorConfig;
    use crate::internal_events::AgentMetrics;
    use crate::otlp_wire::batch::kv_str;
    use crate::sinks::otlp::ExportConfig;
    use crate::sources::otlp::adapters::AdapterOptions;
    use crate::sources::otlp::sample::vllm_request;
    use crate::sources::otlp::{RawTraceRequest, RequestAdapter};

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
            vec![tx],
            finding_metrics,
        );
        let mut adapter = RequestAdapter::new(AdapterOptions::default());
        // Two requests (resources) of 64 spans each, from the same process.
        stage.on_spans(adapter.adapt(RawTraceRequest::from(vllm_request(0, 64))));
        stage.on_spans(adapter.adapt(RawTraceRequest::from(vllm_request(64, 64))));
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
            vec![tx],
            finding_metrics,
        )
        .with_tenant_hasher(Some(hasher));
        let mut adapter =
            RequestAdapter::new(AdapterOptions::default()).with_tenant_hasher(Some(hasher));
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
        stage.on_spans(adapter.adapt(RawTraceRequest::from(request)));

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
