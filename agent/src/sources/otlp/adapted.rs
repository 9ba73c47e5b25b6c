//! [`AdaptedRequest`]: what the OTLP receiver sends the pipeline. Each span of an accepted
//! request is read once, here, by the runtime [`adapters`](super::adapters): a runtime's
//! request span comes with its [`RuntimeRequest`], a start-up span with its [`StartupSpan`],
//! every span with its bytes ready to export (the tenant hashed when `[privacy] hash_tenants`
//! is on) and the resource and scope it came with.
//!
//! Spans stay the bytes they arrived as (see [`super::request`]); only tenant hashing rewrites
//! one, after the adapters read it, so the correlator still joins on the raw tenant.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::RawTraceRequest;
use super::adapters::{
    AdapterOptions, RuntimeLabel, SpanAdapter, instance, runtime_of, runtime_of_resource,
    runtime_of_scope, startup,
};
use crate::internal_events::RuntimeSpanLabels;
use crate::model::{RuntimeRequest, StartupSpan};
use crate::otlp_wire::batch::{EncodedSpan, SpanGroup};
use crate::otlp_wire::read::SpanView;
use crate::privacy::TenantHasher;

/// A received request with every span adapted, grouped as it came.
#[derive(Debug, Default)]
pub struct AdaptedRequest {
    /// One entry per `ResourceSpans`: one exporting process each.
    pub resources: Vec<AdaptedResource>,
}

/// The spans of one resource (one exporting process).
#[derive(Debug, Default)]
pub struct AdaptedResource {
    /// One entry per `ScopeSpans`.
    pub scopes: Vec<AdaptedScope>,
}

/// The spans of one instrumentation scope, with the resource and scope they are exported with.
#[derive(Debug)]
pub struct AdaptedScope {
    /// The resource (its tenant hashed too) and the scope.
    pub group: Arc<SpanGroup>,
    /// The spans, in the order received.
    pub spans: Vec<AdaptedSpan>,
}

/// One received span: its bytes to export and what the adapters read in it.
#[derive(Debug)]
pub struct AdaptedSpan {
    /// The span as it will be exported.
    pub span: EncodedSpan,
    /// What it is to the correlator.
    pub role: SpanRole,
}

/// What a received span is to the correlator.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "moved once into the correlator's `Input`, unboxed like it: a box would be one \
              more allocation per request span"
)]
pub enum SpanRole {
    /// A runtime's request span: held until its join.
    Request(RuntimeRequest),
    /// A runtime's start-up span: forwarded at once, and a cold-start phase.
    Startup(StartupSpan),
    /// Any other span: forwarded at once, untouched.
    Other,
}

impl AdaptedRequest {
    /// The number of spans.
    pub fn span_count(&self) -> usize {
        self.resources
            .iter()
            .flat_map(|r| r.scopes.iter())
            .map(|s| s.spans.len())
            .sum()
    }
}

/// Adapts whole requests: the [`SpanAdapter`] (with its memory across spans), tenant hashing
/// for export, and `inferwatch_runtime_spans_total{runtime,adapted}`. One per receiver.
#[derive(Debug)]
pub struct RequestAdapter {
    adapter: SpanAdapter,
    /// `inferwatch_runtime_spans_total{runtime,adapted}`, by [`RuntimeLabel::ALL`] index and
    /// adapted (1) or not (0); counters resolved once so that a span costs one atomic add.
    runtime_spans: Option<[[Counter; 2]; 5]>,
    /// `[privacy] hash_tenants`: tenants are hashed as they leave.
    tenant_hasher: Option<TenantHasher>,
}

impl RequestAdapter {
    /// An adapter reading with `options`, hashing nothing and counting nothing.
    pub fn new(options: AdapterOptions) -> Self {
        Self {
            adapter: SpanAdapter::new(options),
            runtime_spans: None,
            tenant_hasher: None,
        }
    }

    /// Hashes the tenant of every span and resource with `hasher` (`[privacy] hash_tenants`).
    pub fn with_tenant_hasher(mut self, hasher: Option<TenantHasher>) -> Self {
        self.tenant_hasher = hasher;
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

    /// Reads every span of `request`, which passed [`super::validate`] (or was built from
    /// decoded spans).
    pub fn adapt(&mut self, request: RawTraceRequest) -> AdaptedRequest {
        let mut out = AdaptedRequest::default();
        for rs in request.resource_spans {
            let identity = instance(rs.resource.as_ref());
            let resource_runtime = runtime_of_resource(rs.resource.as_ref());
            let startup_process = startup::process(rs.resource.as_ref());
            // The resource as exported: its tenant hashed too.
            let mut exported_resource = rs.resource;
            if let (Some(hasher), Some(r)) = (&self.tenant_hasher, exported_resource.as_mut()) {
                hasher.hash_attributes(&self.adapter.options().tenant_attribute, &mut r.attributes);
            }
            let mut resource = AdaptedResource::default();
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
                let mut spans = Vec::with_capacity(ss.spans.len());
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
                    let role = match (adapted, started) {
                        (Some(request), _) => SpanRole::Request(request),
                        (None, Some(started)) => SpanRole::Startup(started),
                        (None, None) => SpanRole::Other,
                    };
                    let bytes = match &self.tenant_hasher {
                        Some(hasher) => {
                            hasher.hash_in_span(&self.adapter.options().tenant_attribute, bytes)
                        }
                        None => bytes,
                    };
                    spans.push(AdaptedSpan {
                        span: EncodedSpan::from_received(bytes),
                        role,
                    });
                }
                resource.scopes.push(AdaptedScope { group, spans });
            }
            out.resources.push(resource);
        }
        out
    }
}
