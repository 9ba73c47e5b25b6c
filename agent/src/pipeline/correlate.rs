//! The correlate stage: feeds kernel events and runtime spans to the sans-IO correlator, holds
//! each runtime span until the correlator has joined it, then forwards it enriched, together
//! with the finding spans, to the span sinks; updates the finding metrics.
//!
//! The stage does no I/O of its own (sending on a sink queue never waits), so it is driven
//! directly by tests; `pipeline::run` owns the loop, the clock and the channels.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

use crate::correlator::{AbortFinding, Correlator, Input, JoinedRequest, Output};
use crate::model::{KernelEvent, UnixNanos};
use crate::sinks::batch::{kv_f64, kv_i64, kv_str};
use crate::sinks::prometheus::findings::{
    AbortLabels, FindingMetrics, JoinLabels, TableLabels, advance_to,
};
use crate::sinks::{SinkSender, SpanBatch, finding_span};
use crate::sources::otlp::adapters::{AdapterOptions, adapt};

/// The resource and scope a held span came with, shared by the spans of one received group.
#[derive(Debug)]
struct Group {
    resource: Option<Resource>,
    resource_schema_url: String,
    scope: Option<InstrumentationScope>,
    scope_schema_url: String,
}

#[derive(Debug)]
struct Held {
    group: Arc<Group>,
    span: Span,
}

/// A finding, summarised for logs and the demo.
#[derive(Debug, Clone, PartialEq)]
pub enum FindingSummary {
    /// Tokens billed after the client left.
    Abort(AbortFinding),
}

/// The correlate stage.
pub struct CorrelateStage {
    correlator: Correlator,
    adapter: AdapterOptions,
    held: HashMap<([u8; 16], [u8; 8]), Held>,
    max_held: usize,
    sinks: Vec<SinkSender>,
    metrics: Arc<FindingMetrics>,
    outgoing: Vec<Held>,
    findings: Vec<Span>,
    /// Spans forwarded without enrichment because the held table was full or a duplicate.
    pub held_overflow: u64,
    /// Every finding made, for the log / demo observers (drained by `take_summaries`).
    summaries: Vec<FindingSummary>,
}

impl std::fmt::Debug for CorrelateStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorrelateStage")
            .field("held", &self.held.len())
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

/// Appends attributes to a span.
fn add(span: &mut Span, attributes: impl IntoIterator<Item = KeyValue>) {
    span.attributes.extend(attributes);
}

impl CorrelateStage {
    /// A stage around `correlator`, sending to `sinks`.
    pub fn new(
        correlator: Correlator,
        adapter: AdapterOptions,
        sinks: Vec<SinkSender>,
        metrics: Arc<FindingMetrics>,
    ) -> Self {
        // The correlator settles early rather than grow past its span cap, so a little more
        // room here means a held span is only ever forwarded unenriched on duplicates.
        let max_held = correlator.config().max_pending_spans + 1024;
        Self {
            correlator,
            adapter,
            held: HashMap::new(),
            max_held,
            sinks,
            metrics,
            outgoing: Vec::new(),
            findings: Vec::new(),
            held_overflow: 0,
            summaries: Vec::new(),
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
    pub fn on_kernel(&mut self, event: KernelEvent) {
        let outputs = self.correlator.on_event(Input::Kernel(event));
        self.handle(outputs);
    }

    /// A batch of received spans: runtime request spans are held for their join, everything
    /// else is forwarded at once.
    pub fn on_spans(&mut self, mut batch: SpanBatch) {
        let mut outputs = Vec::new();
        for rs in &mut batch.resource_spans {
            let resource = rs.resource.as_ref();
            for ss in &mut rs.scope_spans {
                let mut group: Option<Arc<Group>> = None;
                let spans = std::mem::take(&mut ss.spans);
                for span in spans {
                    let Some(request) = adapt(&span, resource, &self.adapter) else {
                        ss.spans.push(span);
                        continue;
                    };
                    let key = (request.trace_id, request.span_id);
                    if self.held.len() >= self.max_held || self.held.contains_key(&key) {
                        self.held_overflow += 1;
                        ss.spans.push(span);
                        continue;
                    }
                    let group = group
                        .get_or_insert_with(|| {
                            Arc::new(Group {
                                resource: rs.resource.clone(),
                                resource_schema_url: rs.schema_url.clone(),
                                scope: ss.scope.clone(),
                                scope_schema_url: ss.schema_url.clone(),
                            })
                        })
                        .clone();
                    self.held.insert(key, Held { group, span });
                    outputs.extend(self.correlator.on_event(Input::Runtime(request)));
                }
            }
            rs.scope_spans.retain(|ss| !ss.spans.is_empty());
        }
        batch.resource_spans.retain(|rs| !rs.scope_spans.is_empty());
        if !batch.resource_spans.is_empty() {
            self.send(batch);
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
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
    }

    fn on_joined(&mut self, joined: JoinedRequest) {
        let request = &joined.request;
        let model = self.metrics.model(request.model.as_deref());
        if let Some(n) = request.output_tokens {
            self.metrics.output_tokens.get_or_create(&model).inc_by(n);
        }
        self.metrics
            .joins
            .get_or_create(&JoinLabels {
                rule: joined.join.as_str().to_owned(),
            })
            .inc();
        let Some(mut held) = self.held.remove(&(request.trace_id, request.span_id)) else {
            return;
        };
        add(
            &mut held.span,
            [kv_str("inferwatch.join", joined.join.as_str())],
        );
        self.outgoing.push(held);
    }

    fn on_abort(&mut self, finding: AbortFinding) {
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
        self.metrics
            .abort_lag
            .get_or_create(&model)
            .observe(finding.lag_ns as f64 / 1e9);
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

    fn sync_stats(&self) {
        let stats = self.correlator.stats();
        let m = &self.metrics;
        for (table, total) in [
            ("connections", stats.evictions.connections),
            ("heads", stats.evictions.heads),
            ("spans", stats.evictions.spans),
            ("listeners", stats.evictions.listeners),
        ] {
            advance_to(
                &m.correlator_evictions.get_or_create(&TableLabels {
                    table: table.to_owned(),
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
        let mut batch = SpanBatch::default();
        // Rebuild one ResourceSpans per received group.
        let mut by_group: Vec<(Arc<Group>, Vec<Span>)> = Vec::new();
        for held in self.outgoing.drain(..) {
            match by_group
                .iter_mut()
                .find(|(g, _)| Arc::ptr_eq(g, &held.group))
            {
                Some((_, spans)) => spans.push(held.span),
                None => by_group.push((held.group, vec![held.span])),
            }
        }
        for (group, spans) in by_group {
            batch.resource_spans.push(ResourceSpans {
                resource: group.resource.clone(),
                schema_url: group.resource_schema_url.clone(),
                scope_spans: vec![ScopeSpans {
                    scope: group.scope.clone(),
                    spans,
                    schema_url: group.scope_schema_url.clone(),
                }],
            });
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

/// A random, non-zero trace id for findings that have no trace of their own.
fn new_trace_id() -> [u8; 16] {
    let a = crate::sinks::batch::new_span_id();
    let b = crate::sinks::batch::new_span_id();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a);
    id[8..].copy_from_slice(&b);
    id
}
