//! Metrics of the findings (contract §4.2), registered once at start-up. They are updated by
//! the correlate stage; the scrape handler only encodes. The sources' health families are the
//! agent's own telemetry, in `crate::internal_events`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

pub use crate::labels::{BoundedLabel, OTHER};

/// `{model}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model name (bounded).
    pub model: String,
}

/// `{how, model}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AbortLabels {
    /// `fin` or `rst`.
    pub how: String,
    /// The model name (bounded).
    pub model: String,
}

/// `{cause, model}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LostLabels {
    /// `exit`, `signal`, `oom_kill` or `server_close`.
    pub cause: String,
    /// The model name (bounded).
    pub model: String,
}

/// `{boundary, model}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AbortLagLabels {
    /// `gateway` (client left -> gateway closed its upstream) or `runtime` (client left ->
    /// runtime stopped).
    pub boundary: String,
    /// The model name (bounded).
    pub model: String,
}

/// `{rule}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct JoinLabels {
    /// `traceparent | request_id | client_addr | temporal | unjoined`.
    pub rule: String,
}

/// `{table}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TableLabels {
    /// The correlator table an entry was evicted from.
    pub table: String,
}

/// `{reason}` of a KV-eviction turn or store left undecided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KvUndecidedLabels {
    /// Why the evidence was not used.
    pub reason: String,
}

/// `{victim_tenant, neighbour_tenant}` (bounded by the correlator's tenant labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KvEvictionLabels {
    /// The evicted conversation's tenant.
    pub victim_tenant: String,
    /// The tenant named as the noisy neighbour (`self` for the victim's own tenant).
    pub neighbour_tenant: String,
}

/// `{start}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StartLabels {
    /// `cold` or `warm`.
    pub start: String,
}

/// `{gpu, neighbour}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ContentionLabels {
    /// The GPU uuid.
    pub gpu: String,
    /// The neighbour process (executable, or `pid-N`; bounded).
    pub neighbour: String,
}

/// `{gpu}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GpuLabels {
    /// The GPU uuid.
    pub gpu: String,
}

/// `{gpu, pid, executable}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GpuProcessLabels {
    /// The GPU uuid.
    pub gpu: String,
    /// The process id.
    pub pid: String,
    /// The executable name.
    pub executable: String,
}

/// Findings and source-health metrics.
#[derive(Debug)]
pub struct FindingMetrics {
    /// `inferwatch_billed_after_abort_tokens_total{model}`.
    pub billed_after_abort_tokens: Family<ModelLabels, Counter>,
    /// `inferwatch_output_tokens_total{model}`.
    pub output_tokens: Family<ModelLabels, Counter>,
    /// `inferwatch_aborts_total{how,model}`.
    pub aborts: Family<AbortLabels, Counter>,
    /// `inferwatch_lost_in_flight_total{cause,model}` (contract §3.5).
    pub lost_in_flight: Family<LostLabels, Counter>,
    /// `inferwatch_lost_in_flight_ambiguous_total`: server-first closes with no span and no
    /// exit, from a runtime that sends no spans: no finding.
    pub lost_in_flight_ambiguous: Counter,
    /// `inferwatch_client_aborts_total{how,model}`: every client abort, finding or not.
    pub client_aborts: Family<AbortLabels, Counter>,
    /// `inferwatch_abort_lag_seconds{boundary,model}`, observed for every client abort.
    pub abort_lag: Family<AbortLagLabels, Histogram>,
    /// `inferwatch_joins_total{rule}`: how runtime spans were joined to connections.
    pub joins: Family<JoinLabels, Counter>,
    /// `inferwatch_correlator_evictions_total{table}`: state dropped at the caps.
    pub correlator_evictions: Family<TableLabels, Counter>,
    /// `inferwatch_kv_eviction_undecided_total{reason}`: ambiguous KV-eviction evidence, no
    /// finding made from it.
    pub kv_eviction_undecided: Family<KvUndecidedLabels, Counter>,
    /// `inferwatch_kv_evictions_total{victim_tenant,neighbour_tenant}`.
    pub kv_evictions: Family<KvEvictionLabels, Counter>,
    /// `inferwatch_cold_start_floor_seconds`.
    pub cold_start_floor: Histogram,
    /// `inferwatch_ttft_seconds{start}`.
    pub ttft: Family<StartLabels, Histogram>,
    /// `inferwatch_gpu_contention_seconds_total{gpu,neighbour}`.
    pub gpu_contention_seconds: Family<ContentionLabels, Counter<f64, AtomicU64>>,
    /// `inferwatch_gpu_sm_utilization_percent{gpu}`.
    pub gpu_sm_util: Family<GpuLabels, Gauge>,
    /// `inferwatch_gpu_memory_used_bytes{gpu}`.
    pub gpu_memory_used: Family<GpuLabels, Gauge>,
    /// `inferwatch_gpu_memory_total_bytes{gpu}`.
    pub gpu_memory_total: Family<GpuLabels, Gauge>,
    /// `inferwatch_gpu_process_sm_utilization_percent{gpu,pid,executable}` (latest sample's
    /// processes only).
    pub gpu_process_sm_util: Family<GpuProcessLabels, Gauge>,
    /// `inferwatch_gpu_process_memory_bytes{gpu,pid,executable}`.
    pub gpu_process_memory: Family<GpuProcessLabels, Gauge>,
    /// `inferwatch_gpu_requests_without_instance_total`: settled requests no runtime instance
    /// could be found for (no connection joined, no pid alias): no GPU facts, no contention.
    pub gpu_requests_without_instance: Counter,
    /// `inferwatch_refused_connections_total`: connection attempts to watched ports that no
    /// socket took (the kernel reset their SYN): clients that came while no runtime listened.
    pub refused_connections: Counter,
    /// `inferwatch_cold_start_runtime_traces_unattributed_total`: runtime start-up traces that
    /// name no process and that more than one instance could own (no phase made of them).
    pub cold_start_traces_unattributed: Counter,
    /// Bounds the `model` label.
    pub models: BoundedLabel,
    /// The counters [`FindingMetrics::record`] bumps for every span, resolved once.
    pub(super) cached: Mutex<super::record::JoinCounters>,
}

fn ttft_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn lag_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ])
}

impl FindingMetrics {
    /// Registers every family in `registry` (prefix `inferwatch_` added by the names here).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            billed_after_abort_tokens: Family::default(),
            output_tokens: Family::default(),
            aborts: Family::default(),
            lost_in_flight: Family::default(),
            lost_in_flight_ambiguous: Counter::default(),
            client_aborts: Family::default(),
            abort_lag: Family::new_with_constructor(lag_histogram),
            joins: Family::default(),
            correlator_evictions: Family::default(),
            kv_eviction_undecided: Family::default(),
            kv_evictions: Family::default(),
            cold_start_floor: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
            ]),
            ttft: Family::new_with_constructor(ttft_histogram),
            gpu_contention_seconds: Family::default(),
            gpu_sm_util: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_process_sm_util: Family::default(),
            gpu_process_memory: Family::default(),
            gpu_requests_without_instance: Counter::default(),
            refused_connections: Counter::default(),
            cold_start_traces_unattributed: Counter::default(),
            models: BoundedLabel::new(32),
            cached: Mutex::default(),
        };
        registry.register(
            "inferwatch_billed_after_abort_tokens",
            "Output tokens the runtime generated after the client had left",
            metrics.billed_after_abort_tokens.clone(),
        );
        registry.register(
            "inferwatch_output_tokens",
            "Output tokens of the runtime requests seen",
            metrics.output_tokens.clone(),
        );
        registry.register(
            "inferwatch_aborts",
            "Abort findings: the client left and tokens came after, or the runtime stopped late",
            metrics.aborts.clone(),
        );
        registry.register(
            "inferwatch_lost_in_flight",
            "Requests lost mid-response: the runtime exited, was killed or closed the connection",
            metrics.lost_in_flight.clone(),
        );
        registry.register(
            "inferwatch_lost_in_flight_ambiguous",
            "Requests the server closed first, without a span or an exit to say why: no finding",
            metrics.lost_in_flight_ambiguous.clone(),
        );
        registry.register(
            "inferwatch_client_aborts",
            "Clients that left while their request was in flight, whatever followed",
            metrics.client_aborts.clone(),
        );
        registry.register(
            "inferwatch_abort_lag_seconds",
            "Time from the client leaving to each boundary stopping (gateway, runtime)",
            metrics.abort_lag.clone(),
        );
        registry.register(
            "inferwatch_joins",
            "Runtime spans by the rule that joined them to a connection",
            metrics.joins.clone(),
        );
        registry.register(
            "inferwatch_correlator_evictions",
            "Correlator state dropped at its caps",
            metrics.correlator_evictions.clone(),
        );
        registry.register(
            "inferwatch_kv_eviction_undecided",
            "KV-eviction evidence left undecided (ambiguous or incomplete): no finding made from it",
            metrics.kv_eviction_undecided.clone(),
        );
        registry.register(
            "inferwatch_kv_evictions",
            "Conversations whose warm KV prefix was evicted, by victim and neighbour tenant",
            metrics.kv_evictions.clone(),
        );
        registry.register(
            "inferwatch_cold_start_floor_seconds",
            "Time from a runtime's process start to its first output token",
            metrics.cold_start_floor.clone(),
        );
        registry.register(
            "inferwatch_ttft_seconds",
            "Time to first token of runtime requests, by whether the instance was cold",
            metrics.ttft.clone(),
        );
        registry.register(
            "inferwatch_gpu_contention_seconds",
            "Seconds a runtime's decode was slowed by another process on its GPU",
            metrics.gpu_contention_seconds.clone(),
        );
        registry.register(
            "inferwatch_gpu_requests_without_instance",
            "Settled runtime requests whose instance was not found (no joined connection, no pid alias): no GPU facts",
            metrics.gpu_requests_without_instance.clone(),
        );
        registry.register(
            "inferwatch_refused_connections",
            "Connection attempts to a watched port that no socket took (its SYN got a reset): clients that came before a runtime listened, or after it left",
            metrics.refused_connections.clone(),
        );
        registry.register(
            "inferwatch_cold_start_runtime_traces_unattributed",
            "Runtime start-up traces naming no process that more than one instance could own: no phase made of them",
            metrics.cold_start_traces_unattributed.clone(),
        );
        registry.register(
            "inferwatch_gpu_sm_utilization_percent",
            "GPU SM utilisation (NVML)",
            metrics.gpu_sm_util.clone(),
        );
        registry.register(
            "inferwatch_gpu_memory_used_bytes",
            "GPU memory used (NVML)",
            metrics.gpu_memory_used.clone(),
        );
        registry.register(
            "inferwatch_gpu_memory_total_bytes",
            "GPU memory total (NVML)",
            metrics.gpu_memory_total.clone(),
        );
        registry.register(
            "inferwatch_gpu_process_sm_utilization_percent",
            "SM utilisation per process on each GPU (NVML samples)",
            metrics.gpu_process_sm_util.clone(),
        );
        registry.register(
            "inferwatch_gpu_process_memory_bytes",
            "GPU memory used per process (NVML)",
            metrics.gpu_process_memory.clone(),
        );
        metrics
    }

    /// `{model}` labels for a model name, bounded.
    pub fn model(&self, model: Option<&str>) -> ModelLabels {
        ModelLabels {
            model: self.models.get(model),
        }
    }
}
