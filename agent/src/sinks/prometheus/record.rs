//! The correlator's outputs and state as metrics: [`FindingMetrics::record`] per output,
//! [`FindingMetrics::sync_correlator`] and [`FindingMetrics::sync_gpu`] from its stats.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::findings::{
    AbortLabels, AbortLagLabels, ContentionLabels, FindingMetrics, GpuLabels, GpuProcessLabels,
    JoinLabels, KvEvictionLabels, KvUndecidedLabels, LostLabels, StartLabels, TableLabels,
};
use crate::correlator::{
    AbortFinding, ClientAbort, ColdStartFinding, Correlator, GpuContentionFinding, JoinRule,
    JoinedRequest, LostInFlightFinding, Output, RequestGpuFacts, StartKind,
};
use crate::internal_events::advance_to;

/// The counters [`FindingMetrics::record`] bumps for every span, kept instead of looked up
/// (label allocation, lock, hash) each time.
#[derive(Debug, Default)]
pub(super) struct JoinCounters {
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

impl FindingMetrics {
    /// Counts one output of the correlator: joins and output tokens per settled span, TTFT per
    /// request, and each finding by its labels.
    pub fn record(&self, output: &Output) {
        match output {
            Output::Joined(joined) => self.on_joined(joined),
            Output::Abort(finding) => self.on_abort(finding),
            Output::ClientAbort(abort) => self.on_client_abort(abort),
            Output::RequestGpu(facts) => self.on_request_gpu(facts),
            Output::GpuContention(finding) => self.on_contention(finding),
            Output::ColdStart(finding) => self.on_cold_start(finding),
            Output::KvEviction(_) => {}
            Output::LostInFlight(finding) => self.on_lost_in_flight(finding),
        }
    }

    fn on_joined(&self, joined: &JoinedRequest) {
        let request = &joined.request;
        let mut cache = self.lock_cache();
        self.add_output_tokens(&mut cache, request.model.as_deref(), request.output_tokens);
        let family = &self.joins;
        cached_metric(&mut cache.joins, joined.join, || {
            family
                .get_or_create(&JoinLabels {
                    rule: joined.join.as_str().to_owned(),
                })
                .clone()
        })
        .inc();
    }

    /// The cache of hot counters; a panic while it was held leaves it usable (it only caches).
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, JoinCounters> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `tokens` to the output-token counter of `model`, looked up again only when the
    /// model changes. [`FindingMetrics::model`] registers the name in its bounded label set and
    /// then always answers the same for it, so skipping repeated calls changes nothing.
    fn add_output_tokens(
        &self,
        cache: &mut JoinCounters,
        model: Option<&str>,
        tokens: Option<u64>,
    ) {
        let cached = &mut cache.output_tokens;
        if cached.as_ref().is_none_or(|(m, _)| m.as_deref() != model) {
            let labels = self.model(model);
            let counter = self.output_tokens.get_or_create(&labels).clone();
            *cached = Some((model.map(str::to_owned), counter));
        }
        if let (Some((_, counter)), Some(n)) = (cached.as_ref(), tokens) {
            counter.inc_by(n);
        }
    }

    fn on_request_gpu(&self, facts: &RequestGpuFacts) {
        let Some(ttft) = facts.ttft_ns else {
            return;
        };
        let mut cache = self.lock_cache();
        let family = &self.ttft;
        cached_metric(&mut cache.ttft, facts.start, || {
            family
                .get_or_create(&StartLabels {
                    start: facts.start.as_str().to_owned(),
                })
                .clone()
        })
        .observe(ttft as f64 / 1e9);
    }

    fn on_contention(&self, finding: &GpuContentionFinding) {
        self.gpu_contention_seconds
            .get_or_create(&ContentionLabels {
                gpu: finding.gpu_uuid.clone(),
                neighbour: finding.neighbour.label(),
            })
            .inc_by(finding.seconds());
    }

    fn on_cold_start(&self, finding: &ColdStartFinding) {
        self.cold_start_floor.observe(finding.floor_seconds());
    }

    fn on_lost_in_flight(&self, finding: &LostInFlightFinding) {
        let model = self.model(finding.model.as_deref());
        self.lost_in_flight
            .get_or_create(&LostLabels {
                cause: finding.cause.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
    }

    /// Every client abort: counted, and its lag to each boundary observed (contract §3.1).
    fn on_client_abort(&self, abort: &ClientAbort) {
        let model = self.model(abort.model.as_deref());
        self.client_aborts
            .get_or_create(&AbortLabels {
                how: abort.how.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
        for (boundary, lag_ns) in abort.lags() {
            self.abort_lag
                .get_or_create(&AbortLagLabels {
                    boundary: boundary.as_str().to_owned(),
                    model: model.model.clone(),
                })
                .observe(lag_ns as f64 / 1e9);
        }
    }

    fn on_abort(&self, finding: &AbortFinding) {
        let model = self.model(finding.model.as_deref());
        self.billed_after_abort_tokens
            .get_or_create(&model)
            .inc_by(finding.tokens_after);
        self.aborts
            .get_or_create(&AbortLabels {
                how: finding.how.as_str().to_owned(),
                model: model.model.clone(),
            })
            .inc();
    }

    /// Copies the GPU gauges (latest NVML sample) into the metrics; the process gauges are
    /// rebuilt so that processes that left the GPU disappear.
    pub fn sync_gpu(&self, correlator: &Correlator) {
        let gpu = correlator.gpu_metrics();
        let m = self;
        advance_to(
            &m.gpu_requests_without_instance,
            gpu.requests_without_instance,
        );
        advance_to(&m.refused_connections, gpu.refused_connections);
        // The GPU tables' drops (samples, GPUs, instances, processes, start-up spans, refused
        // attempts), with the correlator's other tables.
        advance_to(
            &m.correlator_evictions.get_or_create(&TableLabels {
                table: "gpu".to_owned(),
            }),
            gpu.evictions,
        );
        advance_to(
            &m.cold_start_traces_unattributed,
            gpu.startup_traces_unattributed,
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

    /// Copies the correlator's running totals (KV evictions by tenant pair, state dropped at
    /// the caps, undecided evidence) into their counters.
    pub fn sync_correlator(&self, correlator: &Correlator) {
        let stats = correlator.stats();
        let m = self;
        for ((victim, neighbour), total) in correlator.kv_eviction_counts() {
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
}
