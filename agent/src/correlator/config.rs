//! Configuration of the correlator: the join window and the bounds of every table it keeps.

use serde::{Deserialize, Serialize};

use super::kv_eviction::config::KvEvictionConfig;
use super::lost::LostInFlightConfig;
use crate::model::UnixNanos;

const NANOS_PER_MILLI: u64 = 1_000_000;

/// The correlator's settings (contract §2, §3.1, §6): join window, settle delays, and the caps
/// and time-outs that keep its memory bounded whatever the traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelatorConfig {
    /// Temporal join window, in milliseconds: a span with no exact match joins the unclaimed
    /// request head on its instance closest to the span's arrival, if that head was read within
    /// this distance of the arrival.
    pub temporal_window_ms: u64,
    /// How much closer to the span's arrival the best temporal candidate must be than every
    /// other candidate, in milliseconds. Closer than that, two requests fit the span as well as
    /// each other: no join is made, no finding either, and the span is counted as
    /// `inferwatch_joins_total{rule="ambiguous"}`.
    pub temporal_margin_ms: u64,
    /// How long after a span becomes joinable (its end, and its arrival plus the temporal
    /// window) the correlator waits before settling it, in milliseconds. Covers kernel events
    /// still in the ring buffer or the pipeline's queue.
    pub settle_delay_ms: u64,
    /// How long a request seen by the kernel waits for its runtime span once the kernel saw it
    /// end (next request on the connection, close, or the last write after the peer left), in
    /// milliseconds. Must exceed the runtime's export delay (the OTLP batch exporter adds up to
    /// 5 s). When it runs out the request settles without a span: an abort is then reported from
    /// the kernel's writes alone (method `kernel_writes`).
    pub span_wait_ms: u64,
    /// Longest time a request head is kept while the kernel has not seen it end, in
    /// milliseconds (a generation that streams for longer is dropped and counted).
    pub max_request_age_ms: u64,
    /// A connection with no pending request and no event for this long is forgotten, in
    /// milliseconds.
    pub connection_idle_ms: u64,
    /// Most connections tracked at once; beyond it the connection seen first is evicted (and
    /// counted) together with its pending requests.
    pub max_connections: usize,
    /// Most request heads waiting for their span at once, all connections together; beyond it
    /// the oldest head is evicted and counted.
    pub max_pending_heads: usize,
    /// Most requests remembered per connection (a keep-alive connection carries several);
    /// beyond it the oldest is evicted and counted.
    pub max_heads_per_connection: usize,
    /// Most runtime spans waiting to settle at once; beyond it the span due first is settled
    /// at once with whatever the kernel has seen so far (counted as an eviction).
    pub max_pending_spans: usize,
    /// Most listening ports remembered (used to place connections on runtime instances).
    pub max_listeners: usize,
    /// Prefixes a runtime puts before the `x-request-id` header to form its own request id
    /// (vLLM: `chatcmpl-<id>` for chat completions, `cmpl-<id>` for completions, `embd-<id>`
    /// for embeddings). A span's request id matches a header when it equals it, or equals it
    /// after one of these prefixes is removed.
    pub request_id_prefixes: Vec<String>,
    /// Sizes, in bytes, of writes after the peer left that are framing rather than a token
    /// chunk. The defaults: 14, the OpenAI-compatible stream terminator `data: [DONE]\n\n`, and
    /// 5, the chunked transfer encoding's last chunk `0\r\n\r\n` (a gateway writes it after a
    /// client that hung up on `[DONE]`; no SSE token chunk is that short).
    pub framing_write_bytes: Vec<u64>,
    /// A client abort whose tokens after the close are 0 still makes an `inferwatch.abort`
    /// finding span when the runtime took longer than this to stop, in milliseconds (contract
    /// §3.1). Every abort is counted and its lag observed whatever this is.
    pub abort_lag_finding_ms: u64,
    /// Cross-tenant KV-cache eviction (contract §3.3): conversation tracking and its bounds.
    pub kv_eviction: KvEvictionConfig,
    /// GPU contention and cold-start detection: thresholds and the bounds of their state.
    pub gpu: GpuDetectionConfig,
    /// Requests lost in flight (contract §3.5): how exits and closes are tied.
    pub lost_in_flight: LostInFlightConfig,
}

impl Default for CorrelatorConfig {
    fn default() -> Self {
        Self {
            temporal_window_ms: 500,
            temporal_margin_ms: 50,
            settle_delay_ms: 250,
            span_wait_ms: 30_000,
            max_request_age_ms: 15 * 60 * 1000,
            connection_idle_ms: 15 * 60 * 1000,
            max_connections: 65_536,
            max_pending_heads: 65_536,
            max_heads_per_connection: 256,
            max_pending_spans: 16_384,
            max_listeners: 1024,
            request_id_prefixes: vec!["chatcmpl-".into(), "cmpl-".into(), "embd-".into()],
            framing_write_bytes: vec![b"data: [DONE]\n\n".len() as u64, b"0\r\n\r\n".len() as u64],
            abort_lag_finding_ms: 1000,
            kv_eviction: KvEvictionConfig::default(),
            gpu: GpuDetectionConfig::default(),
            lost_in_flight: LostInFlightConfig::default(),
        }
    }
}

/// Settings of the GPU detections (contention, cold start) and the bounds of their state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuDetectionConfig {
    /// Others' summed SM utilisation, in percent, at or above which a GPU counts as shared
    /// (contract §3.4: 30).
    pub neighbour_sm_pct: u32,
    /// Time per output token, in percent of the instance's baseline, at or above which its
    /// decode counts as slowed (contract §3.4: 150, i.e. 1.5x).
    pub tpot_inflation_pct: u32,
    /// How far back the baseline reaches, in milliseconds (contract §3.4: 10 minutes).
    pub baseline_window_ms: u64,
    /// Fewest uncontended requests in the window for a baseline to exist.
    pub baseline_min_requests: usize,
    /// Most uncontended requests remembered per instance for the baseline.
    pub max_baseline_requests: usize,
    /// A contended request whose decode starts within this many milliseconds after the open
    /// interval's end extends it; a later one starts a new interval.
    pub interval_merge_gap_ms: u64,
    /// An interval closes when no contended request ended for this many milliseconds (tick
    /// time).
    pub interval_close_ms: u64,
    /// Most requests listed per contention finding (the rest are counted).
    pub max_affected_requests: usize,
    /// When a window holds no NVML sample, the last sample before its end counts if it is at
    /// most this many milliseconds older (set it above the NVML period).
    pub sample_gap_ms: u64,
    /// How long NVML samples are kept, in milliseconds (must cover the longest request).
    pub sample_history_ms: u64,
    /// Most NVML samples kept per GPU.
    pub max_samples_per_gpu: usize,
    /// Most GPUs tracked.
    pub max_gpus: usize,
    /// Most runtime instances tracked; beyond it the least recently seen is forgotten.
    pub max_instances: usize,
    /// Most process identities and GPU processes tracked; beyond it the least recently seen is
    /// forgotten.
    pub max_processes: usize,
    /// A runtime instance or GPU process not seen for this many milliseconds is forgotten.
    pub instance_idle_ms: u64,
    /// Cold start: a GPU memory sample within this many percent of the plateau level counts as
    /// on the plateau.
    pub plateau_tolerance_pct: u32,
    /// Cold start: how long after the first token a cold start waits for the rest of its
    /// runtime's start-up spans (exporters batch them) when the runtime sends such spans.
    pub startup_span_wait_ms: u64,
    /// Cold start: GPU memory samples kept per process until its first token.
    pub max_memory_samples: usize,
    /// Cold start: how long a connection attempt refused on a watched port (nothing listened)
    /// waits for a process to listen there and count it as having waited for the start.
    pub refused_keep_ms: u64,
    /// Most (GPU, neighbour) series in the contention-seconds counter; the rest count under
    /// `other`.
    pub max_contention_series: usize,
}

impl Default for GpuDetectionConfig {
    fn default() -> Self {
        Self {
            neighbour_sm_pct: 30,
            tpot_inflation_pct: 150,
            baseline_window_ms: 10 * 60 * 1000,
            baseline_min_requests: 5,
            max_baseline_requests: 1024,
            interval_merge_gap_ms: 5_000,
            interval_close_ms: 15_000,
            max_affected_requests: 256,
            sample_gap_ms: 5_000,
            sample_history_ms: 15 * 60 * 1000,
            max_samples_per_gpu: 4096,
            max_gpus: 64,
            max_instances: 256,
            max_processes: 4096,
            instance_idle_ms: 60 * 60 * 1000,
            plateau_tolerance_pct: 2,
            startup_span_wait_ms: 10_000,
            max_memory_samples: 4096,
            refused_keep_ms: 30 * 60 * 1000,
            max_contention_series: 256,
        }
    }
}

impl CorrelatorConfig {
    pub(crate) fn temporal_window(&self) -> UnixNanos {
        self.temporal_window_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn temporal_margin(&self) -> UnixNanos {
        self.temporal_margin_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn abort_lag_finding(&self) -> UnixNanos {
        self.abort_lag_finding_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn settle_delay(&self) -> UnixNanos {
        self.settle_delay_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn span_wait(&self) -> UnixNanos {
        self.span_wait_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn max_request_age(&self) -> UnixNanos {
        self.max_request_age_ms.saturating_mul(NANOS_PER_MILLI)
    }
    pub(crate) fn connection_idle(&self) -> UnixNanos {
        self.connection_idle_ms.saturating_mul(NANOS_PER_MILLI)
    }

    /// How far past the last event a tick must reach for everything pending to settle
    /// (spans, and kernel-side requests still waiting for a span): used for the final tick
    /// at shutdown.
    pub fn settle_horizon_ns(&self) -> UnixNanos {
        self.temporal_window()
            .saturating_add(self.settle_delay())
            .saturating_add(self.span_wait())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_rejects_unknown_keys() {
        let text = toml::to_string(&CorrelatorConfig::default()).expect("serialize default");
        let back: CorrelatorConfig = toml::from_str(&text).expect("parse default back");
        assert_eq!(back, CorrelatorConfig::default());
        let err = toml::from_str::<CorrelatorConfig>("temporal_window = 3");
        assert!(err.is_err(), "unknown key must be rejected");
        let partial: CorrelatorConfig = toml::from_str("span_wait_ms = 7").expect("partial config");
        assert_eq!(partial.span_wait_ms, 7);
        assert_eq!(partial.temporal_window_ms, 500);
    }
}
