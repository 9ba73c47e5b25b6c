//! GPU contention (contract §3.4) and the GPU side of every request (contract §4.1:
//! `inferwatch.gpu.uuid`, `inferwatch.gpu.sm_util`).
//!
//! # Definitions
//! - A **runtime instance** (contract §1.4) is its **front process**: the process that reads
//!   its requests on a watched port (the pid of the kernel's `RequestHead` events, or of a
//!   `Listen`, including the listeners found in `/proc` at start-up). A span's instance is the
//!   reader of the connection it joined; a span that joined none falls back on its aliases:
//!   `process.pid` / `vllm.process_id` (the front itself, or a descendant of a known front),
//!   then `service.instance.id` when an earlier joined span of that id named its front.
//! - Its **GPU pids** are the front and its descendants among the pids NVML lists: a pid
//!   descends from the front when the `PPid` chain of its identities (`Input::Process`, sent
//!   for each NVML pid and its ancestors) reaches it, every parent having started no later
//!   than its child and the front's identity being the one it had when it read requests (a
//!   reused pid breaks the chain). vLLM's EngineCore and its workers, SGLang's scheduler and
//!   TGI's shards hold the GPU while the front process serves HTTP. Its GPUs are those where
//!   NVML lists one of its GPU pids.
//! - A request's **time per output token** is `(end - first_token) / (output_tokens - 1)`,
//!   over its decode window `[first_token, end]`.
//! - **Others' SM** on a GPU during a window: the mean, over the NVML samples in the window
//!   (or the last one before its end, within `gpu.sample_gap_ms`, when the window falls
//!   between samples), of the summed SM shares of every pid that is not one of the instance's.
//! - The instance's **baseline** is the median time per output token of its requests that
//!   ended in the last `gpu.baseline_window_ms` with others' SM below the threshold; it needs
//!   `gpu.baseline_min_requests` of them.
//! - A request is **contended** on a GPU when others' SM >= `gpu.neighbour_sm_pct` and its time
//!   per output token >= `gpu.tpot_inflation_pct`% of the baseline. Contended requests of the
//!   same instance and GPU whose decode windows start within `gpu.interval_merge_gap_ms` of the
//!   interval's end extend one **contention interval** `[first contended first token, last
//!   contended end]`; it closes (and its finding is emitted) `gpu.interval_close_ms` after its
//!   last contended request ended, or when a contended request starts too far after it.
//! - The **noisy neighbour** of an interval is the pid with the largest summed SM share over
//!   the interval's samples (ties: the lower pid); its share is its mean SM percentage.
//!
//! Decisions are taken when a request's span settles (its GPU samples have arrived by then: the
//! span waits for the settle delay), and the request's [`RequestGpuFacts`] carries the
//! neighbour when the request was contended.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Output;
use super::cold_start::{ColdStarts, StartKind};
use crate::model::{
    GpuProcessStat, GpuSample, GpuStat, ProcessIdentity, RuntimeRequest, UnixNanos,
};

const MS: u64 = 1_000_000;

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
            max_contention_series: 256,
        }
    }
}

/// The process that took the GPU (contract §4.1 `inferwatch.noisy_neighbour.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoisyNeighbour {
    /// The GPU shared.
    pub gpu_uuid: String,
    /// `inferwatch.noisy_neighbour.pid`.
    pub pid: u32,
    /// `inferwatch.noisy_neighbour.executable`.
    pub executable: Option<String>,
    /// `inferwatch.noisy_neighbour.container_id`.
    pub container_id: Option<String>,
    /// `inferwatch.noisy_neighbour.pod_uid`.
    pub pod_uid: Option<String>,
    /// `inferwatch.noisy_neighbour.share`: its mean SM utilisation over the window, percent.
    pub sm_share: f64,
}

impl NoisyNeighbour {
    /// The bounded label for `inferwatch_gpu_contention_seconds_total{neighbour}`: the
    /// executable name, else `pid-<pid>`.
    pub fn label(&self) -> String {
        self.executable
            .clone()
            .unwrap_or_else(|| format!("pid-{}", self.pid))
    }
}

/// A request decoded during a contention interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffectedRequest {
    /// Its trace id (the finding span goes into this trace).
    pub trace_id: [u8; 16],
    /// Its runtime span id (the finding span's parent).
    pub span_id: [u8; 8],
    /// The runtime's request id.
    pub request_id: Option<String>,
}

/// GPU contention on one GPU of one runtime instance (contract §3.4): the
/// `inferwatch.gpu_contention` span(s) and `inferwatch_gpu_contention_seconds_total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuContentionFinding {
    /// The GPU.
    pub gpu_uuid: String,
    /// The runtime instance (the victim).
    pub runtime_pid: u32,
    /// Its executable.
    pub runtime_executable: Option<String>,
    /// The interval's start: the first contended request's first token.
    pub start: UnixNanos,
    /// The interval's end: the last contended request's end.
    pub end: UnixNanos,
    /// The process with the largest SM share over the interval.
    pub neighbour: NoisyNeighbour,
    /// Others' summed SM utilisation over the interval, mean, percent.
    pub others_sm_pct: f64,
    /// The victim's baseline time per output token (median), in nanoseconds.
    pub tpot_baseline_ns: u64,
    /// The contended requests' mean time per output token, in nanoseconds.
    pub tpot_ns: u64,
    /// `tpot_ns / tpot_baseline_ns`.
    pub inflation: f64,
    /// The contended requests (each also got the neighbour in its [`RequestGpuFacts`]).
    pub affected: Vec<AffectedRequest>,
    /// Contended requests beyond `max_affected_requests`, not listed.
    pub affected_not_listed: u64,
}

impl GpuContentionFinding {
    /// The interval's length in seconds.
    pub fn seconds(&self) -> f64 {
        self.end.saturating_sub(self.start) as f64 / 1e9
    }
}

/// One GPU a request ran on (`inferwatch.gpu.uuid`, `inferwatch.gpu.sm_util`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestGpu {
    /// The GPU.
    pub uuid: String,
    /// The GPU's mean SM utilisation over the request (arrival to end), percent; `None` when
    /// NVML gave none.
    pub sm_util: Option<f64>,
    /// The instance's own mean SM share over the request, percent.
    pub instance_sm_util: Option<f64>,
}

/// The GPU and start facts of one settled request, emitted right after its
/// [`Output::Joined`](super::Output::Joined) (same trace and span id) whenever the correlator
/// has GPU or process input. An exporter sets `inferwatch.start`, `inferwatch.gpu.*` and, when
/// `neighbour` is set, `inferwatch.noisy_neighbour.*` on the forwarded span from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestGpuFacts {
    /// The span's trace id.
    pub trace_id: [u8; 16],
    /// The span's id.
    pub span_id: [u8; 8],
    /// The instance: its front process's pid (contract §1.4), when known.
    pub instance_pid: Option<u32>,
    /// `inferwatch.start`: cold when the request arrived before its instance served its first
    /// token.
    pub start: StartKind,
    /// For a cold request, how long it waited for its instance's start: from its arrival to
    /// the instance's first token, in nanoseconds (`inferwatch.start.wait_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_wait_ns: Option<u64>,
    /// Time to first token, in nanoseconds (for `inferwatch_ttft_seconds{start}`).
    pub ttft_ns: Option<u64>,
    /// Time per output token, in nanoseconds.
    pub tpot_ns: Option<u64>,
    /// The GPUs it ran on.
    pub gpus: Vec<RequestGpu>,
    /// The noisy neighbour, when it was decoded during contention.
    pub neighbour: Option<NoisyNeighbour>,
}

/// GPU gauges and counters for the metrics sink, read with
/// [`Correlator::gpu_metrics`](super::Correlator::gpu_metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuMetrics {
    /// The latest sample's GPUs (per-GPU gauges: `sm_util`, `mem_util`, `memory_used`,
    /// `memory_total`, by `uuid`).
    pub gpus: Vec<GpuStat>,
    /// The latest sample's processes with their identity when known (per-process gauges by
    /// `gpu_uuid`, `pid`, `executable`).
    pub processes: Vec<(GpuProcessStat, Option<ProcessIdentity>)>,
    /// `inferwatch_gpu_contention_seconds_total{gpu,neighbour}`: closed intervals' seconds by
    /// (GPU uuid, neighbour label); bounded, overflow under neighbour `other`.
    pub contention_seconds: BTreeMap<(String, String), f64>,
    /// Contention findings emitted.
    pub contention_findings: u64,
    /// Cold-start findings emitted.
    pub cold_start_findings: u64,
    /// State dropped because a GPU table was full (samples, GPUs, instances, processes).
    pub evictions: u64,
    /// Settled requests whose instance was not found: no connection joined and no pid alias
    /// (`inferwatch_gpu_requests_without_instance_total`).
    pub requests_without_instance: u64,
}

/// One NVML sample of one GPU, reduced to what the detections read.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) ts: UnixNanos,
    sm_util: Option<u32>,
    /// pid -> (SM share, memory bytes).
    pub(crate) procs: BTreeMap<u32, (Option<u32>, Option<u64>)>,
}

#[derive(Debug, Default)]
struct Instance {
    last_seen: UnixNanos,
    /// (end, tpot) of uncontended requests, oldest first.
    baseline: VecDeque<(UnixNanos, u64)>,
}

#[derive(Debug)]
struct OpenInterval {
    start: UnixNanos,
    end: UnixNanos,
    baseline: u64,
    tpots: Vec<u64>,
    affected: Vec<AffectedRequest>,
    not_listed: u64,
}

/// A front process: one that read requests on a watched port (contract §1.4).
#[derive(Debug, Clone, Copy)]
struct Front {
    /// Its start time when its identity was known: a later identity of the pid with another
    /// start time is another process, and the front is forgotten.
    start_time: Option<UnixNanos>,
    last_seen: UnixNanos,
}

/// How deep the `PPid` chain from a GPU process to its front is followed (vLLM: API server ->
/// EngineCore -> workers is 2; wrappers such as `torchrun` add one or two).
const MAX_TREE_DEPTH: usize = 8;

/// Everything the correlator knows of GPUs and processes.
#[derive(Debug, Default)]
pub(crate) struct GpuView {
    active: bool,
    latest: Option<GpuSample>,
    gpus: BTreeMap<String, VecDeque<Snapshot>>,
    identities: BTreeMap<u32, (UnixNanos, ProcessIdentity)>,
    /// Front processes by pid.
    fronts: BTreeMap<u32, Front>,
    /// `service.instance.id` -> the front its joined spans read through (the alias of spans
    /// that joined no connection).
    instance_ids: BTreeMap<Arc<str>, (UnixNanos, u32)>,
    /// Every pid in a kept NVML sample, with its last sample: the candidates for an
    /// instance's GPU pids.
    gpu_pids: BTreeMap<u32, UnixNanos>,
    instances: BTreeMap<u32, Instance>,
    open: BTreeMap<(u32, String), OpenInterval>,
    pub(crate) cold: ColdStarts,
    metrics: GpuMetrics,
}

/// The median of a non-empty slice (the lower middle for even lengths, so that it is one of
/// the values).
fn median(values: &mut [u64]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    values.get((values.len() - 1) / 2).copied()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

impl GpuView {
    /// Whether any GPU or process input arrived (only then are request facts emitted).
    pub(crate) fn active(&self) -> bool {
        self.active
    }

    pub(crate) fn metrics(&self) -> GpuMetrics {
        let mut m = self.metrics.clone();
        if let Some(latest) = &self.latest {
            m.gpus = latest.gpus.clone();
            m.processes = latest
                .processes
                .iter()
                .map(|p| (p.clone(), self.identity(p.pid).cloned()))
                .collect();
        }
        m
    }

    pub(crate) fn sizes(&self) -> (usize, usize, usize, usize) {
        (
            self.gpus.values().map(VecDeque::len).sum(),
            self.identities.len(),
            self.instances.len(),
            self.open.len(),
        )
    }

    pub(crate) fn identity(&self, pid: u32) -> Option<&ProcessIdentity> {
        self.identities.get(&pid).map(|(_, id)| id)
    }

    pub(crate) fn on_process(&mut self, identity: ProcessIdentity, cfg: &GpuDetectionConfig) {
        self.active = true;
        let ts = identity.start_time.unwrap_or(0);
        let seen = self
            .identities
            .get(&identity.pid)
            .map_or(ts, |(t, _)| (*t).max(ts));
        if let Some(front) = self.fronts.get_mut(&identity.pid) {
            match (front.start_time, identity.start_time) {
                // The pid names another process now: the instance exited. What it learnt
                // (baseline, open intervals keep their own pid) must not pass to the new one.
                (Some(was), Some(now)) if was != now => {
                    self.fronts.remove(&identity.pid);
                    self.instances.remove(&identity.pid);
                    self.instance_ids.retain(|_, (_, p)| *p != identity.pid);
                }
                (None, now) => front.start_time = now,
                _ => {}
            }
        }
        self.identities.insert(identity.pid, (seen, identity));
        while self.identities.len() > cfg.max_processes.max(1) {
            let Some(oldest) = self
                .identities
                .iter()
                .min_by_key(|(pid, (t, _))| (*t, **pid))
                .map(|(pid, _)| *pid)
            else {
                break;
            };
            self.identities.remove(&oldest);
            self.metrics.evictions += 1;
        }
    }

    pub(crate) fn on_sample(&mut self, sample: GpuSample, cfg: &GpuDetectionConfig) {
        self.active = true;
        let ts = sample.ts;
        for gpu in &sample.gpus {
            if !self.gpus.contains_key(&gpu.uuid) && self.gpus.len() >= cfg.max_gpus.max(1) {
                self.metrics.evictions += 1;
                continue;
            }
            let procs = sample
                .processes
                .iter()
                .filter(|p| p.gpu_uuid == gpu.uuid)
                .map(|p| (p.pid, (p.sm_util, p.used_memory)))
                .collect();
            let snaps = self.gpus.entry(gpu.uuid.clone()).or_default();
            // Samples come from one poller in time order; one out of order is dropped rather
            // than sorted in, so windows stay monotonic.
            if snaps.back().is_some_and(|s| s.ts >= ts) {
                self.metrics.evictions += 1;
                continue;
            }
            snaps.push_back(Snapshot {
                ts,
                sm_util: gpu.sm_util,
                procs,
            });
            let horizon = ts.saturating_sub(cfg.sample_history_ms.saturating_mul(MS));
            while snaps.len() > cfg.max_samples_per_gpu.max(1)
                || snaps.front().is_some_and(|s| s.ts < horizon)
            {
                snaps.pop_front();
            }
        }
        self.cold.on_sample(&sample, cfg);
        for p in &sample.processes {
            if let Some(i) = self.instances.get_mut(&p.pid) {
                i.last_seen = i.last_seen.max(ts);
            }
            if !self.gpu_pids.contains_key(&p.pid)
                && self.gpu_pids.len() >= cfg.max_processes.max(1)
            {
                self.metrics.evictions += 1;
                continue;
            }
            self.gpu_pids.insert(p.pid, ts);
        }
        let horizon = ts.saturating_sub(cfg.sample_history_ms.saturating_mul(MS));
        self.gpu_pids.retain(|_, last| *last >= horizon);
        self.latest = Some(sample);
    }

    /// A `Listen` by `pid`: a runtime instance.
    pub(crate) fn on_listen(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.on_front(pid, ts, cfg);
        self.on_runtime(pid, ts, cfg);
        self.cold.on_listen(pid, ts, cfg);
    }

    /// A request head read by `pid`: a front process.
    pub(crate) fn on_head(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.on_front(pid, ts, cfg);
        self.cold.on_head(pid, ts, cfg);
    }

    fn on_front(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        if !self.fronts.contains_key(&pid) {
            while self.fronts.len() >= cfg.max_instances.max(1) {
                let Some(oldest) = self
                    .fronts
                    .iter()
                    .min_by_key(|(pid, f)| (f.last_seen, **pid))
                    .map(|(pid, _)| *pid)
                else {
                    break;
                };
                self.fronts.remove(&oldest);
                self.metrics.evictions += 1;
            }
        }
        // The identity read for this pid is the reader's when it started before the read.
        let start_time = self
            .identity(pid)
            .and_then(|i| i.start_time)
            .filter(|t| *t <= ts);
        let front = self.fronts.entry(pid).or_insert(Front {
            start_time,
            last_seen: ts,
        });
        front.last_seen = front.last_seen.max(ts);
        if front.start_time.is_none() {
            front.start_time = start_time;
        }
    }

    /// A span arrived (before its join): its instance, when its aliases name one.
    pub(crate) fn on_span(
        &mut self,
        span: &RuntimeRequest,
        arrival: UnixNanos,
        cfg: &GpuDetectionConfig,
    ) {
        self.cold.observe(arrival);
        if let Some(pid) = self.instance_of(None, span) {
            self.on_runtime(pid, arrival, cfg);
        }
    }

    /// The front process `pid` descends from (itself included), following the `PPid` chain of
    /// the identities; `None` when the chain reaches no front or a reused pid breaks it.
    pub(crate) fn front_of(&self, pid: u32) -> Option<u32> {
        let mut cur = pid;
        let mut child_start: Option<UnixNanos> = None;
        for _ in 0..=MAX_TREE_DEPTH {
            let identity = self.identity(cur);
            let start = identity.and_then(|i| i.start_time);
            // A parent that started after its child is another process under a reused pid.
            if let (Some(parent), Some(child)) = (start, child_start)
                && parent > child
            {
                return None;
            }
            if let Some(front) = self.fronts.get(&cur) {
                let same = match (front.start_time, start) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                return same.then_some(cur);
            }
            let parent = identity.and_then(|i| i.parent_pid)?;
            if parent <= 1 || parent == cur {
                return None;
            }
            child_start = start.or(child_start);
            cur = parent;
        }
        None
    }

    /// The runtime instance of `span`: the reader of the connection it joined (`conn_pid`),
    /// else its pid alias (`process.pid`, `vllm.process_id`) resolved to the front it is or
    /// descends from (itself when no front is known: a runtime the kernel side does not see),
    /// else its `service.instance.id` when a joined span of that id named the front.
    pub(crate) fn instance_of(&self, conn_pid: Option<u32>, span: &RuntimeRequest) -> Option<u32> {
        if let Some(pid) = conn_pid {
            return Some(pid);
        }
        if let Some(alias) = span.instance.pid {
            return Some(self.front_of(alias).unwrap_or(alias));
        }
        let id = span.instance.service_instance_id.as_ref()?;
        self.instance_ids.get(id).map(|(_, pid)| *pid)
    }

    /// Remembers the front that a span's `service.instance.id` reads through.
    fn learn_instance_id(
        &mut self,
        span: &RuntimeRequest,
        pid: u32,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
    ) {
        let Some(id) = span.instance.service_instance_id.as_ref() else {
            return;
        };
        if !self.instance_ids.contains_key(id) {
            while self.instance_ids.len() >= cfg.max_instances.max(1) {
                let Some(oldest) = self
                    .instance_ids
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.instance_ids.remove(&oldest);
                self.metrics.evictions += 1;
            }
        }
        self.instance_ids.insert(id.clone(), (ts, pid));
    }

    /// A pid seen as a runtime instance (span exporter or listener).
    pub(crate) fn on_runtime(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        let entry = self.instances.entry(pid).or_default();
        entry.last_seen = entry.last_seen.max(ts);
        while self.instances.len() > cfg.max_instances.max(1) {
            let Some(oldest) = self
                .instances
                .iter()
                .min_by_key(|(pid, i)| (i.last_seen, **pid))
                .map(|(pid, _)| *pid)
            else {
                break;
            };
            self.instances.remove(&oldest);
            self.metrics.evictions += 1;
        }
    }

    /// Whether the cold start of `span`'s instance is open and would be one: not decided yet,
    /// and cold if decided by a first token no later than `span`'s. The predicate only grows
    /// with the first token, so for an instance it says warm for (one that started before the
    /// agent, say) any request may decide without changing the outcome.
    ///
    /// Before its join a span without an alias has no known instance: it is pending when any
    /// front's cold start is (waiting longer is safe; deciding from the wrong span is not).
    pub(crate) fn cold_start_pending(&self, span: &RuntimeRequest) -> bool {
        let Some(first) = span.first_token else {
            return false;
        };
        match self.instance_of(None, span) {
            Some(pid) => self.cold_pending_for(pid, first),
            None => self
                .fronts
                .keys()
                .any(|pid| self.cold_pending_for(*pid, first)),
        }
    }

    fn cold_pending_for(&self, pid: u32, first: UnixNanos) -> bool {
        if self.cold.is_decided(pid) {
            return false;
        }
        let identity = self.identities.get(&pid).map(|(_, id)| id);
        self.cold
            .is_cold(pid, &self.instance_pids(pid), identity, first)
    }

    /// Whether the cold start of `span`'s instance (as far as its aliases tell before the join)
    /// is decided; a span with no known instance is decided only when every front's is.
    pub(crate) fn cold_decided_for(&self, instance: Option<u32>) -> bool {
        match instance {
            Some(pid) => self.cold.is_decided(pid),
            None => self.fronts.keys().all(|pid| self.cold.is_decided(*pid)),
        }
    }

    /// The pids that are the instance: the front and its descendants among the processes
    /// known (those on a GPU, and those named otherwise: a runtime's start-up spans name its
    /// engine's processes, GPU or not).
    fn instance_pids(&self, pid: u32) -> BTreeSet<u32> {
        let mut pids: BTreeSet<u32> = self
            .gpu_pids
            .keys()
            .chain(self.identities.keys())
            .filter(|p| **p != pid && self.front_of(**p) == Some(pid))
            .copied()
            .collect();
        // An instance known only by its alias (no front): its children, as before the kernel
        // named fronts.
        if !self.fronts.contains_key(&pid) {
            pids.extend(
                self.gpu_pids
                    .keys()
                    .filter(|p| self.identity(**p).and_then(|i| i.parent_pid) == Some(pid)),
            );
        }
        pids.insert(pid);
        pids
    }

    /// Snapshots of `gpu` in `[from, to]`, or the last one before `to` within the gap.
    fn window(&self, gpu: &str, from: UnixNanos, to: UnixNanos, gap: u64) -> Vec<&Snapshot> {
        let Some(snaps) = self.gpus.get(gpu) else {
            return Vec::new();
        };
        let inside: Vec<&Snapshot> = snaps
            .iter()
            .filter(|s| s.ts >= from && s.ts <= to)
            .collect();
        if !inside.is_empty() {
            return inside;
        }
        snaps
            .iter()
            .rev()
            .find(|s| s.ts <= to)
            .filter(|s| s.ts.saturating_add(gap) >= to)
            .into_iter()
            .collect()
    }

    /// GPUs where the instance's pids appear in `[from, to]`.
    fn gpus_of(
        &self,
        pids: &BTreeSet<u32>,
        from: UnixNanos,
        to: UnixNanos,
        gap: u64,
    ) -> Vec<String> {
        self.gpus
            .keys()
            .filter(|uuid| {
                self.window(uuid, from, to, gap)
                    .iter()
                    .any(|s| pids.iter().any(|p| s.procs.contains_key(p)))
            })
            .cloned()
            .collect()
    }

    fn neighbour_in(
        &self,
        gpu: &str,
        snaps: &[&Snapshot],
        pids: &BTreeSet<u32>,
    ) -> Option<NoisyNeighbour> {
        let mut sums: BTreeMap<u32, u64> = BTreeMap::new();
        for s in snaps {
            for (pid, (sm, _)) in &s.procs {
                if !pids.contains(pid) {
                    *sums.entry(*pid).or_default() += u64::from(sm.unwrap_or(0));
                }
            }
        }
        let (pid, sum) = sums
            .into_iter()
            .max_by_key(|(pid, sum)| (*sum, std::cmp::Reverse(*pid)))?;
        let id = self.identity(pid);
        Some(NoisyNeighbour {
            gpu_uuid: gpu.to_owned(),
            pid,
            executable: id.and_then(|i| i.executable.clone()),
            container_id: id.and_then(|i| i.container_id.clone()),
            pod_uid: id.and_then(|i| i.pod_uid.clone()),
            sm_share: sum as f64 / snaps.len().max(1) as f64,
        })
    }

    fn others_sm(snaps: &[&Snapshot], pids: &BTreeSet<u32>) -> Option<f64> {
        mean(snaps.iter().map(|s| {
            s.procs
                .iter()
                .filter(|(pid, _)| !pids.contains(pid))
                .map(|(_, (sm, _))| f64::from(sm.unwrap_or(0)))
                .sum::<f64>()
        }))
    }

    /// The facts of a settled request, updating baselines, intervals and cold starts; closed
    /// intervals and a cold-start finding go to `out` before the facts.
    ///
    /// `earlier_first_token`: the first token of a request of the same instance that got it
    /// before this one and has not settled yet; this one then cannot decide the cold start.
    pub(crate) fn on_request(
        &mut self,
        span: &RuntimeRequest,
        conn_pid: Option<u32>,
        earlier_first_token: Option<UnixNanos>,
        cfg: &GpuDetectionConfig,
        out: &mut Vec<Output>,
    ) -> RequestGpuFacts {
        let gap = cfg.sample_gap_ms.saturating_mul(MS);
        let pid = self.instance_of(conn_pid, span);
        if let (Some(conn_pid), Some(_)) = (conn_pid, pid) {
            self.learn_instance_id(span, conn_pid, span.end, cfg);
        }
        let ttft_ns = span.first_token.map(|ft| ft.saturating_sub(span.arrival));
        let tpot_ns = match (span.first_token, span.output_tokens) {
            (Some(ft), Some(n)) if n >= 2 && span.end > ft => Some((span.end - ft) / (n - 1)),
            _ => None,
        };
        let mut facts = RequestGpuFacts {
            trace_id: span.trace_id,
            span_id: span.span_id,
            instance_pid: pid,
            start: StartKind::Warm,
            start_wait_ns: None,
            ttft_ns,
            tpot_ns,
            gpus: Vec::new(),
            neighbour: None,
        };
        let Some(pid) = pid else {
            self.metrics.requests_without_instance += 1;
            return facts;
        };
        self.on_runtime(pid, span.end, cfg);
        let pids = self.instance_pids(pid);
        let gpus = self.gpus_of(&pids, span.arrival, span.end, gap);

        let identity = self.identities.get(&pid).map(|(_, id)| id);
        if let Some(finding) =
            self.cold
                .on_request(pid, &pids, span, &gpus, identity, earlier_first_token, cfg)
        {
            self.metrics.cold_start_findings += 1;
            out.push(Output::ColdStart(finding));
        }
        facts.start = match earlier_first_token {
            Some(first) => {
                self.cold
                    .start_before_decision(pid, &pids, identity, first, span.arrival)
            }
            None => self.cold.start_of(pid, span.arrival),
        };
        if facts.start == StartKind::Cold {
            facts.start_wait_ns = earlier_first_token
                .or_else(|| self.cold.first_token_of(pid))
                .map(|ft| ft.saturating_sub(span.arrival));
        }

        for uuid in &gpus {
            let snaps = self.window(uuid, span.arrival, span.end, gap);
            facts.gpus.push(RequestGpu {
                uuid: uuid.clone(),
                sm_util: mean(snaps.iter().filter_map(|s| s.sm_util).map(f64::from)),
                instance_sm_util: mean(snaps.iter().map(|s| {
                    s.procs
                        .iter()
                        .filter(|(p, _)| pids.contains(p))
                        .map(|(_, (sm, _))| f64::from(sm.unwrap_or(0)))
                        .sum::<f64>()
                })),
            });
        }

        let (Some(first_token), Some(tpot)) = (span.first_token, tpot_ns) else {
            return facts;
        };
        // Others' SM on each GPU over the decode window.
        let mut contended_on: Vec<(String, NoisyNeighbour)> = Vec::new();
        let mut clean = !gpus.is_empty();
        let baseline = self.baseline(pid, span.end, cfg);
        for uuid in &gpus {
            let snaps = self.window(uuid, first_token, span.end, gap);
            let Some(others) = Self::others_sm(&snaps, &pids) else {
                continue;
            };
            if others < f64::from(cfg.neighbour_sm_pct) {
                continue;
            }
            clean = false;
            let slowed = baseline.is_some_and(|b| {
                u128::from(tpot) * 100 >= u128::from(b) * u128::from(cfg.tpot_inflation_pct)
            });
            if slowed && let Some(n) = self.neighbour_in(uuid, &snaps, &pids) {
                contended_on.push((uuid.clone(), n));
            }
        }
        if clean && let Some(inst) = self.instances.get_mut(&pid) {
            inst.baseline.push_back((span.end, tpot));
            while inst.baseline.len() > cfg.max_baseline_requests.max(1) {
                inst.baseline.pop_front();
            }
        }
        let Some(baseline) = baseline else {
            return facts;
        };
        for (uuid, neighbour) in &contended_on {
            self.extend_interval(pid, uuid, span, first_token, tpot, baseline, cfg, out);
            if facts.neighbour.is_none() {
                facts.neighbour = Some(neighbour.clone());
            }
        }
        facts
    }

    fn baseline(&self, pid: u32, at: UnixNanos, cfg: &GpuDetectionConfig) -> Option<u64> {
        let inst = self.instances.get(&pid)?;
        let from = at.saturating_sub(cfg.baseline_window_ms.saturating_mul(MS));
        let mut tpots: Vec<u64> = inst
            .baseline
            .iter()
            .filter(|(end, _)| *end >= from && *end <= at)
            .map(|(_, t)| *t)
            .collect();
        if tpots.len() < cfg.baseline_min_requests.max(1) {
            return None;
        }
        median(&mut tpots)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; the values are the request's decode facts"
    )]
    fn extend_interval(
        &mut self,
        pid: u32,
        uuid: &str,
        span: &RuntimeRequest,
        first_token: UnixNanos,
        tpot: u64,
        baseline: u64,
        cfg: &GpuDetectionConfig,
        out: &mut Vec<Output>,
    ) {
        let key = (pid, uuid.to_owned());
        let merge_gap = cfg.interval_merge_gap_ms.saturating_mul(MS);
        if self
            .open
            .get(&key)
            .is_some_and(|o| first_token > o.end.saturating_add(merge_gap))
            && let Some(old) = self.open.remove(&key)
        {
            self.close(pid, uuid, old, cfg, out);
        }
        let open = self.open.entry(key).or_insert_with(|| OpenInterval {
            start: first_token,
            end: span.end,
            baseline,
            tpots: Vec::new(),
            affected: Vec::new(),
            not_listed: 0,
        });
        open.start = open.start.min(first_token);
        open.end = open.end.max(span.end);
        open.tpots.push(tpot);
        if open.tpots.len() > cfg.max_affected_requests.max(1) {
            // Keep the mean bounded in memory: fold the oldest two into one.
            let a = open.tpots.remove(0);
            if let Some(b) = open.tpots.first_mut() {
                *b = (a + *b) / 2;
            }
        }
        if open.affected.len() < cfg.max_affected_requests {
            open.affected.push(AffectedRequest {
                trace_id: span.trace_id,
                span_id: span.span_id,
                request_id: span.request_id.clone(),
            });
        } else {
            open.not_listed += 1;
        }
    }

    fn close(
        &mut self,
        pid: u32,
        uuid: &str,
        open: OpenInterval,
        cfg: &GpuDetectionConfig,
        out: &mut Vec<Output>,
    ) {
        let gap = cfg.sample_gap_ms.saturating_mul(MS);
        let pids = self.instance_pids(pid);
        let snaps = self.window(uuid, open.start, open.end, gap);
        let Some(neighbour) = self.neighbour_in(uuid, &snaps, &pids) else {
            return;
        };
        let tpot_ns = open.tpots.iter().sum::<u64>() / open.tpots.len().max(1) as u64;
        let finding = GpuContentionFinding {
            gpu_uuid: uuid.to_owned(),
            runtime_pid: pid,
            runtime_executable: self.identity(pid).and_then(|i| i.executable.clone()),
            start: open.start,
            end: open.end,
            others_sm_pct: Self::others_sm(&snaps, &pids).unwrap_or(0.0),
            tpot_baseline_ns: open.baseline,
            tpot_ns,
            inflation: tpot_ns as f64 / open.baseline.max(1) as f64,
            neighbour,
            affected: open.affected,
            affected_not_listed: open.not_listed,
        };
        let series = self.metrics.contention_seconds.len();
        let mut key = (uuid.to_owned(), finding.neighbour.label());
        if !self.metrics.contention_seconds.contains_key(&key)
            && series >= cfg.max_contention_series
        {
            key.1 = "other".into();
        }
        *self.metrics.contention_seconds.entry(key).or_default() += finding.seconds();
        self.metrics.contention_findings += 1;
        out.push(Output::GpuContention(finding));
    }

    /// Closes intervals that went quiet and forgets idle instances.
    pub(crate) fn on_tick(&mut self, now: UnixNanos, cfg: &GpuDetectionConfig) -> Vec<Output> {
        let mut out = Vec::new();
        let close_after = cfg.interval_close_ms.saturating_mul(MS);
        let due: Vec<(u32, String)> = self
            .open
            .iter()
            .filter(|(_, o)| now >= o.end.saturating_add(close_after))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(open) = self.open.remove(&key) {
                self.close(key.0, &key.1, open, cfg, &mut out);
            }
        }
        let idle = cfg.instance_idle_ms.saturating_mul(MS);
        let open = &self.open;
        self.instances.retain(|pid, i| {
            now < i.last_seen.saturating_add(idle) || open.keys().any(|(p, _)| p == pid)
        });
        self.fronts
            .retain(|_, f| now < f.last_seen.saturating_add(idle));
        self.instance_ids
            .retain(|_, (t, _)| now < t.saturating_add(idle));
        self.cold.on_tick(now, cfg);
        for finding in self.cold.on_tick_findings(now) {
            self.metrics.cold_start_findings += 1;
            out.push(Output::ColdStart(finding));
        }
        out
    }

    /// A runtime's start-up span: held for its instance's cold start, which it may complete.
    pub(crate) fn on_startup(
        &mut self,
        span: crate::model::StartupSpan,
        cfg: &GpuDetectionConfig,
    ) -> Vec<Output> {
        let dropped = self.cold.startup_dropped;
        let finding = self.cold.on_startup(span, cfg);
        self.metrics.evictions += self.cold.startup_dropped - dropped;
        match finding {
            Some(finding) => {
                self.metrics.cold_start_findings += 1;
                vec![Output::ColdStart(finding)]
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_a_member() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3]), Some(3));
        assert_eq!(median(&mut [4, 1, 3, 2]), Some(2));
        assert_eq!(median(&mut [5, 1, 3]), Some(3));
    }

    #[test]
    fn neighbour_label_is_bounded_by_executable() {
        let n = NoisyNeighbour {
            gpu_uuid: "GPU-a".into(),
            pid: 7,
            executable: None,
            container_id: None,
            pod_uid: None,
            sm_share: 1.0,
        };
        assert_eq!(n.label(), "pid-7");
        let named = NoisyNeighbour {
            executable: Some("python3".into()),
            ..n
        };
        assert_eq!(named.label(), "python3");
    }
}
