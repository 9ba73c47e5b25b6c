//! The GPU side of the correlator: the NVML sample store ([`samples`]), process identities
//! and runtime instances ([`processes`]), GPU contention ([`contention`], contract §3.4) and
//! cold starts ([`cold_start`], contract §3.2), tied together by [`GpuView`], which also
//! gives every settled request its GPU facts (contract §4.1).

pub(crate) mod cold_start;
pub(crate) mod contention;
pub(crate) mod processes;
pub(crate) mod refused;
pub(crate) mod samples;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::correlator::config::GpuDetectionConfig;
use crate::model::{
    GpuProcessStat, GpuSample, GpuStat, ProcessIdentity, RuntimeRequest, StartupSpan, UnixNanos,
};
use cold_start::{ColdStartFinding, ColdStarts, StartKind};
use contention::{Contention, GpuContentionFinding, NoisyNeighbour, Reads, mean};
use processes::Processes;
use samples::GpuSamples;

const MS: u64 = 1_000_000;

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
/// [`Output::Joined`](crate::correlator::Output::Joined) (same trace and span id) whenever the correlator
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
/// [`Correlator::gpu_metrics`](crate::correlator::Correlator::gpu_metrics).
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
    /// Connection attempts refused on watched ports (no socket listened there).
    #[serde(default)]
    pub refused_connections: u64,
    /// State dropped because a GPU table was full (samples, GPUs, instances, processes).
    pub evictions: u64,
    /// Settled requests whose instance was not found: no connection joined and no pid alias
    /// (`inferwatch_gpu_requests_without_instance_total`).
    pub requests_without_instance: u64,
    /// Runtime start-up traces that name no process (TGI's) and that more than one instance
    /// could own: they make no phase
    /// (`inferwatch_cold_start_runtime_traces_unattributed_total`).
    pub startup_traces_unattributed: u64,
}

/// A finding of the GPU detections, in the order they were made.
#[derive(Debug)]
pub(crate) enum GpuFinding {
    /// A contention interval closed.
    Contention(GpuContentionFinding),
    /// A cold start was decided (or its start-up spans arrived).
    ColdStart(ColdStartFinding),
}

/// Everything the correlator knows of GPUs and processes.
#[derive(Debug, Default)]
pub(crate) struct GpuView {
    active: bool,
    samples: GpuSamples,
    procs: Processes,
    contention: Contention,
    pub(crate) cold: ColdStarts,
    metrics: GpuMetrics,
}

impl GpuView {
    /// Whether any GPU or process input arrived (only then are request facts emitted).
    pub(crate) fn active(&self) -> bool {
        self.active
    }

    pub(crate) fn metrics(&self) -> GpuMetrics {
        let mut m = self.metrics.clone();
        m.contention_seconds = self.contention.seconds.clone();
        m.contention_findings = self.contention.findings;
        m.refused_connections = self.cold.refused.seen;
        m.evictions += self.cold.refused.dropped;
        m.startup_traces_unattributed = self.cold.startup_unattributed;
        if let Some(latest) = &self.samples.latest {
            m.gpus = latest.gpus.clone();
            m.processes = latest
                .processes
                .iter()
                .map(|p| (p.clone(), self.procs.identity(p.pid).cloned()))
                .collect();
        }
        m
    }

    /// (NVML snapshots, identities, runtime instances, open contention intervals).
    pub(crate) fn sizes(&self) -> (usize, usize, usize, usize) {
        let (instances, open) = self.contention.sizes();
        (self.samples.len(), self.procs.len(), instances, open)
    }

    #[cfg(test)]
    pub(crate) fn front_of(&self, pid: u32) -> Option<u32> {
        self.procs.front_of(pid)
    }

    pub(crate) fn on_process(&mut self, identity: ProcessIdentity, cfg: &GpuDetectionConfig) {
        self.active = true;
        let pid = identity.pid;
        if self
            .procs
            .on_process(identity, cfg, &mut self.metrics.evictions)
        {
            self.contention.forget(pid);
        }
    }

    pub(crate) fn on_sample(&mut self, sample: GpuSample, cfg: &GpuDetectionConfig) {
        self.active = true;
        self.cold.on_sample(&sample, cfg);
        for p in &sample.processes {
            self.contention.seen(p.pid, sample.ts);
        }
        self.samples
            .on_sample(sample, cfg, &mut self.metrics.evictions);
    }

    /// A `Listen` by `pid` on `port`: a runtime instance.
    pub(crate) fn on_listen(
        &mut self,
        pid: u32,
        port: u16,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
    ) {
        self.procs
            .on_front(pid, ts, cfg, &mut self.metrics.evictions);
        self.on_runtime(pid, ts, cfg);
        self.cold.on_listen(pid, port, ts, cfg);
    }

    /// A connection attempt on the watched `port` that no socket took.
    pub(crate) fn on_refused(&mut self, port: u16, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.cold.on_refused(port, ts, cfg);
    }

    /// A request head read by `pid`: a front process.
    pub(crate) fn on_head(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.procs
            .on_front(pid, ts, cfg, &mut self.metrics.evictions);
        self.cold.on_head(pid, ts, cfg);
    }

    /// A span arrived (before its join): its instance, when its aliases name one.
    pub(crate) fn on_span(
        &mut self,
        span: &RuntimeRequest,
        arrival: UnixNanos,
        cfg: &GpuDetectionConfig,
    ) {
        self.cold.observe(arrival);
        if let Some(pid) = self.procs.instance_of(None, span) {
            self.on_runtime(pid, arrival, cfg);
        }
    }

    /// The runtime instance of `span` ([`Processes::instance_of`]).
    pub(crate) fn instance_of(&self, conn_pid: Option<u32>, span: &RuntimeRequest) -> Option<u32> {
        self.procs.instance_of(conn_pid, span)
    }

    /// A pid seen as a runtime instance (span exporter or listener).
    fn on_runtime(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.contention
            .on_runtime(pid, ts, cfg, &mut self.metrics.evictions);
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
        match self.procs.instance_of(None, span) {
            Some(pid) => self.cold_pending_for(pid, first),
            None => self
                .procs
                .fronts()
                .any(|pid| self.cold_pending_for(pid, first)),
        }
    }

    fn cold_pending_for(&self, pid: u32, first: UnixNanos) -> bool {
        if self.cold.is_decided(pid) {
            return false;
        }
        let pids = self.procs.all_pids(pid, self.samples.pids());
        self.cold
            .is_cold(pid, &pids, self.procs.identity(pid), first)
    }

    /// Whether the cold start of `span`'s instance (as far as its aliases tell before the join)
    /// is decided; a span with no known instance is decided only when every front's is.
    pub(crate) fn cold_decided_for(&self, instance: Option<u32>) -> bool {
        match instance {
            Some(pid) => self.cold.is_decided(pid),
            None => self.procs.fronts().all(|pid| self.cold.is_decided(pid)),
        }
    }

    /// The facts of a settled request, updating baselines, intervals and cold starts; closed
    /// intervals and a cold-start finding go to `out` before the facts.
    ///
    /// The facts and contention read the instance's GPU pids only; its cold start, while
    /// undecided, binds the wider set of its descendants ([`Processes::all_pids`]).
    ///
    /// `earlier_first_token`: the first token of a request of the same instance that got it
    /// before this one and has not settled yet; this one then cannot decide the cold start.
    pub(crate) fn on_request(
        &mut self,
        span: &RuntimeRequest,
        conn_pid: Option<u32>,
        earlier_first_token: Option<UnixNanos>,
        cfg: &GpuDetectionConfig,
        out: &mut Vec<GpuFinding>,
    ) -> RequestGpuFacts {
        let gap = cfg.sample_gap_ms.saturating_mul(MS);
        let pid = self.procs.instance_of(conn_pid, span);
        if let (Some(conn_pid), Some(_)) = (conn_pid, pid) {
            self.procs.learn_instance_id(
                span,
                conn_pid,
                span.end,
                cfg,
                &mut self.metrics.evictions,
            );
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
        let pids = self.procs.gpu_pids(pid, self.samples.pids());
        let gpus = self.samples.gpus_of(&pids, span.arrival, span.end, gap);

        // Once the cold start is decided only the start kind is read from it, unless an
        // earlier first token still pends (then the decision is re-derived from the pids).
        let binding = (!self.cold.is_decided(pid) || earlier_first_token.is_some())
            .then(|| self.procs.all_pids(pid, self.samples.pids()));
        let cold_pids = binding.as_ref().unwrap_or(&pids);
        let identity = self.procs.identity(pid);
        if let Some(finding) = self.cold.on_request(
            pid,
            cold_pids,
            span,
            &gpus,
            identity,
            earlier_first_token,
            cfg,
        ) {
            self.metrics.cold_start_findings += 1;
            out.push(GpuFinding::ColdStart(finding));
        }
        facts.start = match earlier_first_token {
            Some(first) => {
                self.cold
                    .start_before_decision(pid, cold_pids, identity, first, span.arrival)
            }
            None => self.cold.start_of(pid, span.arrival),
        };
        if facts.start == StartKind::Cold {
            facts.start_wait_ns = earlier_first_token
                .or_else(|| self.cold.first_token_of(pid))
                .map(|ft| ft.saturating_sub(span.arrival));
        }

        for uuid in &gpus {
            let snaps = self.samples.window(uuid, span.arrival, span.end, gap);
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
        let reads = Reads {
            samples: &self.samples,
            procs: &self.procs,
            cfg,
        };
        let mut closed = Vec::new();
        facts.neighbour = self.contention.on_request(
            pid,
            &pids,
            &gpus,
            span,
            first_token,
            tpot,
            reads,
            &mut closed,
        );
        out.extend(closed.into_iter().map(GpuFinding::Contention));
        facts
    }

    /// Closes contention intervals that went quiet, forgets idle instances, and reports the
    /// cold starts whose start-up spans stopped coming.
    pub(crate) fn on_tick(&mut self, now: UnixNanos, cfg: &GpuDetectionConfig) -> Vec<GpuFinding> {
        let mut closed = Vec::new();
        let reads = Reads {
            samples: &self.samples,
            procs: &self.procs,
            cfg,
        };
        self.contention.on_tick(now, reads, &mut closed);
        let mut out: Vec<GpuFinding> = closed.into_iter().map(GpuFinding::Contention).collect();
        self.procs
            .on_tick(now, cfg.instance_idle_ms.saturating_mul(MS));
        self.cold.on_tick(now, cfg);
        for finding in self.cold.on_tick_findings(now) {
            self.metrics.cold_start_findings += 1;
            out.push(GpuFinding::ColdStart(finding));
        }
        out
    }

    /// A runtime's start-up span: held for its instance's cold start, which it may complete.
    pub(crate) fn on_startup(
        &mut self,
        span: StartupSpan,
        cfg: &GpuDetectionConfig,
    ) -> Option<ColdStartFinding> {
        let dropped = self.cold.startup_dropped;
        let finding = self.cold.on_startup(span, cfg);
        self.metrics.evictions += self.cold.startup_dropped - dropped;
        if finding.is_some() {
            self.metrics.cold_start_findings += 1;
        }
        finding
    }
}
