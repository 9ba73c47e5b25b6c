//! The cold-start latency floor (contract §3.2) and the `inferwatch.start = cold | warm` tag.
//!
//! # Phase times of a runtime instance
//! - `t_exec`: the process start (`/proc/<pid>/stat`, from `Input::Process`);
//! - `t_gpu_first`: the first NVML sample listing one of the instance's pids (itself or a
//!   child); unknown when it was already listed in the first sample the correlator saw;
//! - `t_weights`: per GPU pid, the first sample from which its GPU memory stays within
//!   `gpu.plateau_tolerance_pct` percent of its level at the first token, up to the first
//!   token, moved forward past samples that still rise by more than a quarter of that
//!   tolerance; the latest over the instance's pids (every rank loaded). A ramp ending at `T`
//!   is thus placed at the first sample at or after `T`: within one NVML period;
//! - `t_listen`: the first `Listen` by the instance's pid;
//! - connection attempts refused on that port before it (no socket held it; [`super::refused`]):
//!   clients that waited for the start, counted from `t_exec`;
//! - `t_first_request`: the first request head read by the pid, or the earliest span arrival;
//! - `t_first_token`: the first token of the first settled span of the instance that has one.
//!
//! Floor = `t_first_token - t_exec` (or from the earliest known time when `t_exec` is unknown,
//! said in `floor_from`). An instance is a cold start only when the correlator saw it start:
//! `t_exec` after the first input, a pid first listed by NVML after the first sample, or a
//! `Listen`. A request is cold when it arrived before its (cold-started) instance served its
//! first token, warm otherwise.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::refused::{self, RefusedAttempts};
use crate::correlator::config::GpuDetectionConfig;
use crate::model::{GpuSample, ProcessIdentity, RuntimeRequest, StartupSpan, UnixNanos};

const MS: u64 = 1_000_000;

/// `inferwatch.start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartKind {
    /// The request arrived before its instance served its first token.
    Cold,
    /// Any other request.
    Warm,
}

impl StartKind {
    /// The attribute and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Warm => "warm",
        }
    }
}

/// One phase of a cold start (one child span of `inferwatch.cold_start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdStartPhase {
    /// `process_start` (to the first GPU sighting: imports, CUDA init), `weights_load` (to
    /// the memory plateau), `warmup` (to `Listen`: profiling, graph capture, server start),
    /// `wait_first_request`, `first_token`.
    pub name: String,
    /// When it began.
    pub start: UnixNanos,
    /// When it ended.
    pub end: UnixNanos,
    /// Where its times came from.
    #[serde(default)]
    pub source: PhaseSource,
    /// The runtime's span name, for a phase the runtime reported (`Load weights`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_span: Option<String>,
}

/// Where a cold-start phase's times came from (`inferwatch.cold_start.phase_source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseSource {
    /// The runtime's own start-up span: exact.
    RuntimeSpans,
    /// NVML's first sighting of the process or its memory plateau: within one NVML period.
    Nvml,
    /// The kernel and procfs: exec, `Listen`, the first request head, the first token.
    #[default]
    Kernel,
}

impl PhaseSource {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseSource::RuntimeSpans => "runtime_spans",
            PhaseSource::Nvml => "nvml",
            PhaseSource::Kernel => "kernel",
        }
    }
}

impl ColdStartPhase {
    /// Its length (0 when the boundaries came out of order).
    pub fn duration_ns(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// The cold-start floor of one runtime instance (contract §3.2): the `inferwatch.cold_start` span
/// (in the trace of the request that got the first token) and an observation of
/// `inferwatch_cold_start_floor_seconds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStartFinding {
    /// The instance.
    pub pid: u32,
    /// Its executable.
    pub executable: Option<String>,
    /// Its container.
    pub container_id: Option<String>,
    /// Its pod.
    pub pod_uid: Option<String>,
    /// The GPUs it loaded onto.
    pub gpu_uuids: Vec<String>,
    /// Process start.
    pub t_exec: Option<UnixNanos>,
    /// First NVML sighting.
    pub t_gpu_first: Option<UnixNanos>,
    /// GPU memory plateau reached.
    pub t_weights: Option<UnixNanos>,
    /// GPU memory at the plateau, bytes (all its pids).
    pub weights_bytes: Option<u64>,
    /// Listening.
    pub t_listen: Option<UnixNanos>,
    /// First request.
    pub t_first_request: Option<UnixNanos>,
    /// First token.
    pub t_first_token: UnixNanos,
    /// `t_first_token - t_exec` (or from `floor_from`), nanoseconds.
    pub floor_ns: u64,
    /// Which time the floor starts at: `exec`, `gpu_first`, `listen` or `first_request`.
    pub floor_from: String,
    /// The phases: the runtime's start-up spans when it sent them, else the spans between
    /// consecutive known times; each says where it came from.
    pub phases: Vec<ColdStartPhase>,
    /// The runtime's start-up spans the phases came from (0: NVML and kernel only).
    #[serde(default)]
    pub runtime_spans: usize,
    /// Connection attempts to its port that the kernel refused between its process start
    /// and its `Listen` (clients that waited for the start; a retried request counts once
    /// per attempt).
    #[serde(default)]
    pub refused_connections: u64,
    /// How long the earliest of them had waited when the port opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_wait_ns: Option<u64>,
    /// The trace of the request that got the first token.
    pub trace_id: [u8; 16],
    /// Its runtime span.
    pub span_id: [u8; 8],
}

impl ColdStartFinding {
    /// The floor in seconds.
    pub fn floor_seconds(&self) -> f64 {
        self.floor_ns as f64 / 1e9
    }
}

#[derive(Debug, Default)]
struct GpuProc {
    first_seen: UnixNanos,
    /// Listed in the first sample: its first sighting is not its start.
    preexisting: bool,
    last_seen: UnixNanos,
    /// (ts, bytes summed over GPUs), oldest first.
    memory: VecDeque<(UnixNanos, u64)>,
}

#[derive(Debug, Default)]
struct Runtime {
    last_seen: UnixNanos,
    t_listen: Option<UnixNanos>,
    t_first_request: Option<UnixNanos>,
    /// The ports it listens on (the attempts refused there before its `Listen` waited for it).
    ports: Vec<u16>,
    /// Set once decided: (first token, cold start seen).
    decided: Option<(UnixNanos, bool)>,
}

/// The start-up spans of one start (one trace), held until the instance's first token.
#[derive(Debug, Default)]
struct StartupTrace {
    /// The instance: the pid of a span sent by the process that serves the API.
    pid: Option<u32>,
    /// Every process that sent one of its spans.
    pids: BTreeSet<u32>,
    spans: Vec<StartupSpan>,
    /// The root arrived: it ends last, so the start is complete.
    root_seen: bool,
    /// It names no process, and more than one instance could be its own: tied to none.
    ambiguous: bool,
    /// It names no process and was tied to the one instance that listened after it.
    tied_by_listen: bool,
    last_seen: UnixNanos,
}

/// Most listening ports remembered per runtime instance.
const MAX_PORTS_PER_RUNTIME: usize = 8;

/// Most start-up spans held per start (vLLM 0.32 sends 12 per worker).
const MAX_STARTUP_SPANS: usize = 256;

/// A cold start decided while its runtime's start-up spans may still be on their way.
#[derive(Debug)]
struct PendingColdStart {
    finding: ColdStartFinding,
    pids: BTreeSet<u32>,
    deadline: UnixNanos,
}

/// Cold-start state of every runtime instance and GPU process.
#[derive(Debug, Default)]
pub(crate) struct ColdStarts {
    watch_start: Option<UnixNanos>,
    samples_seen: u64,
    procs: BTreeMap<u32, GpuProc>,
    runtimes: BTreeMap<u32, Runtime>,
    /// Start-up spans by trace.
    startup: BTreeMap<[u8; 16], StartupTrace>,
    /// Whether any runtime sent start-up spans: then a decided cold start waits for its own.
    startup_seen: bool,
    pending: BTreeMap<u32, PendingColdStart>,
    /// Attempts refused on watched ports, until a process listens there.
    pub(crate) refused: RefusedAttempts,
    /// Start-up spans dropped because a table was full.
    pub(crate) startup_dropped: u64,
    /// Start-up traces that name no process and that more than one instance could own: they
    /// make no phase.
    pub(crate) startup_unattributed: u64,
}

fn min_opt(a: Option<UnixNanos>, b: UnixNanos) -> Option<UnixNanos> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl ColdStarts {
    /// Any input time: the earliest is when the correlator started watching.
    pub(crate) fn observe(&mut self, ts: UnixNanos) {
        self.watch_start = min_opt(self.watch_start, ts);
    }

    fn runtime(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) -> &mut Runtime {
        if !self.runtimes.contains_key(&pid) && self.runtimes.len() >= cfg.max_instances.max(1) {
            let oldest = self
                .runtimes
                .iter()
                .min_by_key(|(p, r)| (r.last_seen, **p))
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.runtimes.remove(&oldest);
            }
        }
        let r = self.runtimes.entry(pid).or_default();
        r.last_seen = r.last_seen.max(ts);
        r
    }

    pub(crate) fn on_listen(
        &mut self,
        pid: u32,
        port: u16,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
    ) {
        self.observe(ts);
        let r = self.runtime(pid, ts, cfg);
        r.t_listen = min_opt(r.t_listen, ts);
        // A server listens on a port or two (API, metrics); the bound only guards the table.
        if !r.ports.contains(&port) && r.ports.len() < MAX_PORTS_PER_RUNTIME {
            r.ports.push(port);
        }
    }

    /// A connection attempt on the watched `port` that no socket took.
    pub(crate) fn on_refused(&mut self, port: u16, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.observe(ts);
        self.refused.on_refused(port, ts, cfg);
    }

    pub(crate) fn on_head(&mut self, pid: u32, ts: UnixNanos, cfg: &GpuDetectionConfig) {
        self.observe(ts);
        // Only the first heads matter, and only for a runtime already known (it listened).
        if let Some(r) = self.runtimes.get_mut(&pid)
            && r.decided.is_none()
        {
            r.t_first_request = min_opt(r.t_first_request, ts);
            r.last_seen = r.last_seen.max(ts);
        } else if !self.runtimes.contains_key(&pid) {
            let r = self.runtime(pid, ts, cfg);
            r.t_first_request = Some(ts);
        }
    }

    pub(crate) fn on_sample(&mut self, sample: &GpuSample, cfg: &GpuDetectionConfig) {
        self.observe(sample.ts);
        let first = self.samples_seen == 0;
        self.samples_seen += 1;
        let mut memory: BTreeMap<u32, Option<u64>> = BTreeMap::new();
        for p in &sample.processes {
            let m = memory.entry(p.pid).or_insert(None);
            if let Some(bytes) = p.used_memory {
                *m = Some(m.unwrap_or(0).saturating_add(bytes));
            }
        }
        for (pid, bytes) in memory {
            if !self.procs.contains_key(&pid) && self.procs.len() >= cfg.max_processes.max(1) {
                continue;
            }
            let p = self.procs.entry(pid).or_insert_with(|| GpuProc {
                first_seen: sample.ts,
                preexisting: first,
                ..GpuProc::default()
            });
            p.last_seen = sample.ts;
            if let Some(bytes) = bytes {
                p.memory.push_back((sample.ts, bytes));
                while p.memory.len() > cfg.max_memory_samples.max(1) {
                    p.memory.pop_front();
                }
            }
        }
    }

    /// The plateau time and level of one pid's memory up to `until`.
    fn plateau(&self, pid: u32, until: UnixNanos, tol_pct: u32) -> Option<(UnixNanos, u64)> {
        let series: Vec<&(UnixNanos, u64)> = self
            .procs
            .get(&pid)?
            .memory
            .iter()
            .filter(|(ts, _)| *ts <= until)
            .collect();
        let level = series.last()?.1;
        if level == 0 {
            return None;
        }
        let tol = u128::from(level) * u128::from(tol_pct) / 100;
        let within = |b: u64| u128::from(b.abs_diff(level)) <= tol;
        let mut start = series.len();
        while start > 0 && within(series[start - 1].1) {
            start -= 1;
        }
        // Inside the band, a ramp still climbing (by more than a quarter of the tolerance per
        // sample) has not ended: move to where it stops, so that a fast poll does not place
        // the end early by the width of the band.
        let step = tol / 4;
        while start + 1 < series.len()
            && u128::from(series[start + 1].1.saturating_sub(series[start].1)) > step
        {
            start += 1;
        }
        series.get(start).map(|(ts, _)| (*ts, level))
    }

    /// A settled request of instance `pid` (its pids `pids`, start-up helpers included):
    /// decides the instance's first token, and returns the cold-start finding when this
    /// request decided it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site (GpuView::on_request), all borrowed from it"
    )]
    pub(crate) fn on_request(
        &mut self,
        pid: u32,
        pids: &BTreeSet<u32>,
        span: &RuntimeRequest,
        gpus: &[String],
        identity: Option<&ProcessIdentity>,
        earlier_first_token: Option<UnixNanos>,
        cfg: &GpuDetectionConfig,
    ) -> Option<ColdStartFinding> {
        self.observe(span.arrival);
        let r = self.runtime(pid, span.end, cfg);
        if r.decided.is_some() {
            return None;
        }
        r.t_first_request = min_opt(r.t_first_request, span.arrival);
        if earlier_first_token.is_some() {
            return None;
        }
        let first_token = span.first_token?;
        let (t_listen, t_first_request) = (r.t_listen, r.t_first_request);
        let ports = std::mem::take(&mut r.ports);
        let t_exec = identity.and_then(|i| i.start_time);
        // Decided here, when the events up to the first token have arrived, not at the
        // `Listen`: the attempts and the listen may come in either order.
        let attempts: Vec<UnixNanos> = t_listen
            .map(|listen| {
                ports
                    .iter()
                    .flat_map(|port| self.refused.take_until(*port, listen))
                    .collect()
            })
            .unwrap_or_default();
        let (refused_connections, refused_wait_ns) = refused::waited(&attempts, t_exec, t_listen);

        let t_gpu_first = self.gpu_first(pids, first_token);
        let plateaus: Vec<(UnixNanos, u64)> = pids
            .iter()
            .filter(|p| self.procs.get(p).is_some_and(|g| !g.preexisting))
            .filter_map(|p| self.plateau(*p, first_token, cfg.plateau_tolerance_pct))
            .collect();
        let t_weights = plateaus.iter().map(|(ts, _)| *ts).max();
        let weights_bytes = (!plateaus.is_empty()).then(|| plateaus.iter().map(|(_, b)| *b).sum());

        let cold = self.is_cold(pid, pids, identity, first_token);
        if let Some(r) = self.runtimes.get_mut(&pid) {
            r.decided = Some((first_token, cold));
        }
        if !cold {
            return None;
        }
        let mut finding = ColdStartFinding {
            pid,
            executable: identity.and_then(|i| i.executable.clone()),
            container_id: identity.and_then(|i| i.container_id.clone()),
            pod_uid: identity.and_then(|i| i.pod_uid.clone()),
            gpu_uuids: gpus.to_vec(),
            t_exec,
            t_gpu_first,
            t_weights,
            weights_bytes,
            t_listen,
            t_first_request,
            t_first_token: first_token,
            floor_ns: 0,
            floor_from: String::new(),
            phases: Vec::new(),
            runtime_spans: 0,
            refused_connections,
            refused_wait_ns,
            trace_id: span.trace_id,
            span_id: span.span_id,
        };
        self.tie_unnamed();
        let complete = self
            .startup_of(pid, pids, t_exec, first_token)
            .is_some_and(|t| t.root_seen);
        if complete || !self.startup_seen {
            let spans = self.startup_spans(pid, pids, t_exec, first_token);
            fill_phases(&mut finding, &spans);
            return Some(finding);
        }
        // The runtime sends start-up spans, and this start's are not all here yet (its
        // exporter batches them): wait for its root, or `startup_span_wait_ms`.
        self.pending.insert(
            pid,
            PendingColdStart {
                finding,
                pids: pids.clone(),
                deadline: first_token.saturating_add(cfg.startup_span_wait_ms.saturating_mul(MS)),
            },
        );
        None
    }

    /// A runtime's start-up span; returns the cold-start finding it completes, if any.
    pub(crate) fn on_startup(
        &mut self,
        span: StartupSpan,
        cfg: &GpuDetectionConfig,
    ) -> Option<ColdStartFinding> {
        self.observe(span.start);
        self.startup_seen = true;
        if !self.startup.contains_key(&span.trace_id)
            && self.startup.len() >= cfg.max_instances.max(1)
        {
            let oldest = self
                .startup
                .iter()
                .min_by_key(|(id, t)| (t.last_seen, **id))
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.startup.remove(&oldest);
                self.startup_dropped += 1;
            }
        }
        let trace = self.startup.entry(span.trace_id).or_default();
        trace.last_seen = trace.last_seen.max(span.end);
        if trace.spans.len() >= MAX_STARTUP_SPANS {
            self.startup_dropped += 1;
            return None;
        }
        if trace.spans.iter().any(|s| s.span_id == span.span_id) {
            return None;
        }
        if let Some(pid) = span.process_pid {
            trace.pids.insert(pid);
            if span.process_kind.is_none() {
                trace.pid = Some(pid);
            }
        }
        trace.root_seen |= span.parent_span_id.is_none();
        let trace_id = span.trace_id;
        trace.spans.push(span);
        if !trace.root_seen {
            return None;
        }
        self.tie_unnamed();
        let trace_pids = self
            .startup
            .get(&trace_id)
            .map(|t| t.pids.clone())
            .unwrap_or_default();
        let pid = self
            .pending
            .iter()
            .find(|(pid, p)| {
                trace_pids.contains(pid) || p.pids.iter().any(|q| trace_pids.contains(q))
            })
            .map(|(pid, _)| *pid)?;
        let mut pending = self.pending.remove(&pid)?;
        let spans = self.startup_spans(
            pid,
            &pending.pids,
            pending.finding.t_exec,
            pending.finding.t_first_token,
        );
        fill_phases(&mut pending.finding, &spans);
        Some(pending.finding)
    }

    /// Ties each complete start-up trace that names no process (TGI sends no pid) to the one
    /// instance the agent saw begin to listen after the trace ended: a runtime listens once its
    /// start-up is over (TGI's router after its `warmup`, vLLM's API server after
    /// `Overall Loading`). The runtime's word is not needed, only the kernel's `Listen`. With
    /// more than one such instance the trace is tied to none and counted; with none yet (its
    /// `Listen` not seen) it waits for the next look.
    fn tie_unnamed(&mut self) {
        for trace in self.startup.values_mut() {
            if !trace.root_seen || trace.ambiguous || !trace.pids.is_empty() {
                continue;
            }
            let Some(end) = trace.spans.iter().map(|s| s.end).max() else {
                continue;
            };
            let mut listened = self
                .runtimes
                .iter()
                .filter(|(_, r)| r.t_listen.is_some_and(|l| l >= end))
                .map(|(pid, _)| *pid);
            match (listened.next(), listened.next()) {
                (Some(pid), None) => {
                    trace.pid = Some(pid);
                    trace.pids.insert(pid);
                    trace.tied_by_listen = true;
                }
                (Some(_), Some(_)) => {
                    trace.ambiguous = true;
                    self.startup_unattributed += 1;
                }
                (None, _) => {}
            }
        }
    }

    /// The start (trace) of instance `pid` (or one of its `pids`) that began last before
    /// `first_token`. A start tied by its `Listen` alone must also have begun after the
    /// process started (`t_exec`, when known): a stale trace of a runtime the agent does not
    /// watch is not taken for the next instance's.
    fn startup_of(
        &self,
        pid: u32,
        pids: &BTreeSet<u32>,
        t_exec: Option<UnixNanos>,
        first_token: UnixNanos,
    ) -> Option<&StartupTrace> {
        self.startup
            .values()
            .filter(|t| {
                t.pid == Some(pid)
                    || t.pid.is_none() && t.pids.iter().any(|p| *p == pid || pids.contains(p))
            })
            .filter_map(|t| {
                let start = t.spans.iter().map(|s| s.start).min()?;
                let after_exec = !t.tied_by_listen || t_exec.is_none_or(|exec| exec <= start);
                (start <= first_token && after_exec).then_some((start, t))
            })
            .max_by_key(|(start, _)| *start)
            .map(|(_, t)| t)
    }

    /// The start-up spans of that start that ended by `first_token`, by start time.
    fn startup_spans(
        &self,
        pid: u32,
        pids: &BTreeSet<u32>,
        t_exec: Option<UnixNanos>,
        first_token: UnixNanos,
    ) -> Vec<StartupSpan> {
        let mut spans: Vec<StartupSpan> = self
            .startup_of(pid, pids, t_exec, first_token)
            .map(|t| {
                t.spans
                    .iter()
                    .filter(|s| s.end <= first_token)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end), s.span_id));
        spans
    }

    /// Cold starts whose start-up spans did not all come within `startup_span_wait_ms`:
    /// reported with what came.
    pub(crate) fn on_tick_findings(&mut self, now: UnixNanos) -> Vec<ColdStartFinding> {
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(pid, _)| *pid)
            .collect();
        let mut out = Vec::new();
        if !due.is_empty() {
            self.tie_unnamed();
        }
        for pid in due {
            if let Some(mut pending) = self.pending.remove(&pid) {
                let spans = self.startup_spans(
                    pid,
                    &pending.pids,
                    pending.finding.t_exec,
                    pending.finding.t_first_token,
                );
                fill_phases(&mut pending.finding, &spans);
                out.push(pending.finding);
            }
        }
        out
    }

    /// When the runtime's GPU processes (not there when the agent started) first appeared, up
    /// to `first_token`.
    fn gpu_first(&self, pids: &BTreeSet<u32>, first_token: UnixNanos) -> Option<UnixNanos> {
        pids.iter()
            .filter_map(|p| self.procs.get(p))
            .filter(|g| !g.preexisting && g.first_seen <= first_token)
            .map(|g| g.first_seen)
            .min()
    }

    /// Whether the runtime `pid` cold-started, if its first token came at `first_token`: its
    /// process started while the agent watched, its GPU processes appeared, or it began to
    /// listen before that token.
    pub(crate) fn is_cold(
        &self,
        pid: u32,
        pids: &BTreeSet<u32>,
        identity: Option<&ProcessIdentity>,
        first_token: UnixNanos,
    ) -> bool {
        let watch_start = self.watch_start.unwrap_or(first_token);
        let t_listen = self.runtimes.get(&pid).and_then(|r| r.t_listen);
        identity
            .and_then(|i| i.start_time)
            .is_some_and(|t| t >= watch_start)
            || self.gpu_first(pids, first_token).is_some()
            || t_listen.is_some_and(|t| t <= first_token)
    }

    /// The start kind of a request that arrived at `arrival`, settled while a request that got
    /// the runtime's first token earlier (`first_token`) has not: what the decision will say.
    pub(crate) fn start_before_decision(
        &self,
        pid: u32,
        pids: &BTreeSet<u32>,
        identity: Option<&ProcessIdentity>,
        first_token: UnixNanos,
        arrival: UnixNanos,
    ) -> StartKind {
        if arrival < first_token && self.is_cold(pid, pids, identity, first_token) {
            StartKind::Cold
        } else {
            StartKind::Warm
        }
    }

    /// Whether the cold start of the runtime `pid` has been decided (by its first request with
    /// a first token).
    pub(crate) fn is_decided(&self, pid: u32) -> bool {
        self.runtimes.get(&pid).is_some_and(|r| r.decided.is_some())
    }

    /// Cold when the instance cold-started and the request arrived before its first token.
    pub(crate) fn start_of(&self, pid: u32, arrival: UnixNanos) -> StartKind {
        match self.runtimes.get(&pid).and_then(|r| r.decided) {
            Some((first_token, true)) if arrival < first_token => StartKind::Cold,
            _ => StartKind::Warm,
        }
    }

    pub(crate) fn on_tick(&mut self, now: UnixNanos, cfg: &GpuDetectionConfig) {
        let idle = cfg.instance_idle_ms.saturating_mul(MS);
        self.procs
            .retain(|_, p| now < p.last_seen.saturating_add(idle));
        self.runtimes
            .retain(|_, r| now < r.last_seen.saturating_add(idle));
        self.startup
            .retain(|_, t| now < t.last_seen.saturating_add(idle));
        self.refused.on_tick(now, cfg);
    }

    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.procs.len(), self.runtimes.len())
    }

    /// The instance's first token, once its cold start is decided.
    pub(crate) fn first_token_of(&self, pid: u32) -> Option<UnixNanos> {
        self.runtimes
            .get(&pid)
            .and_then(|r| r.decided)
            .map(|(ft, _)| ft)
    }
}

/// Fills the finding's phases, floor and floor start from its times and the runtime's
/// start-up spans (`spans`, by start time): exact where the runtime says, NVML where it does
/// not, the kernel's times always.
fn fill_phases(finding: &mut ColdStartFinding, spans: &[StartupSpan]) {
    let kernel =
        |name: &str, start: UnixNanos, end: UnixNanos, source: PhaseSource| ColdStartPhase {
            name: name.to_owned(),
            start,
            end,
            source,
            runtime_span: None,
        };
    let mut phases = Vec::new();
    let first_token = finding.t_first_token;
    let runtime_start = spans.iter().map(|s| s.start).min();
    let runtime_end = spans.iter().map(|s| s.end).max();
    if let (Some(rt_start), Some(rt_end)) = (runtime_start, runtime_end) {
        if let Some(exec) = finding.t_exec.filter(|t| *t <= rt_start) {
            phases.push(kernel("process_start", exec, rt_start, PhaseSource::Kernel));
        }
        phases.extend(spans.iter().map(|s| ColdStartPhase {
            name: s.phase.clone(),
            start: s.start,
            end: s.end,
            source: PhaseSource::RuntimeSpans,
            runtime_span: Some(s.name.clone()),
        }));
        let mut at = rt_end;
        if let Some(listen) = finding.t_listen.filter(|t| *t >= at) {
            phases.push(kernel("server_start", at, listen, PhaseSource::Kernel));
            at = listen;
        }
        if let Some(first) = finding.t_first_request.filter(|t| *t >= at) {
            phases.push(kernel("wait_first_request", at, first, PhaseSource::Kernel));
            at = first;
        }
        phases.push(kernel("first_token", at, first_token, PhaseSource::Kernel));
    } else {
        let points: [(&str, &str, PhaseSource, Option<UnixNanos>); 6] = [
            ("exec", "", PhaseSource::Kernel, finding.t_exec),
            (
                "gpu_first",
                "process_start",
                PhaseSource::Nvml,
                finding.t_gpu_first,
            ),
            (
                "weights",
                "weights_load",
                PhaseSource::Nvml,
                finding.t_weights,
            ),
            ("listen", "warmup", PhaseSource::Kernel, finding.t_listen),
            (
                "first_request",
                "wait_first_request",
                PhaseSource::Kernel,
                finding.t_first_request,
            ),
            (
                "first_token",
                "first_token",
                PhaseSource::Kernel,
                Some(first_token),
            ),
        ];
        let known: Vec<(&str, &str, PhaseSource, UnixNanos)> = points
            .iter()
            .filter_map(|(from, name, source, t)| t.map(|t| (*from, *name, *source, t)))
            .collect();
        phases.extend(
            known
                .windows(2)
                .map(|w| kernel(w[1].1, w[0].3, w[1].3, w[1].2)),
        );
    }
    let (floor_from, floor_start) = match (finding.t_exec, runtime_start) {
        (Some(exec), _) => ("exec", exec),
        (None, Some(rt)) => ("runtime_start", rt),
        (None, None) => [
            ("gpu_first", finding.t_gpu_first),
            ("weights", finding.t_weights),
            ("listen", finding.t_listen),
            ("first_request", finding.t_first_request),
        ]
        .into_iter()
        .find_map(|(from, t)| t.map(|t| (from, t)))
        .unwrap_or(("first_token", first_token)),
    };
    finding.floor_ns = first_token.saturating_sub(floor_start);
    finding.floor_from = floor_from.to_owned();
    finding.phases = phases;
    finding.runtime_spans = spans.len();
}
