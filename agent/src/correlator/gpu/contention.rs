//! GPU contention (contract §3.4): the detector, and the definitions the GPU side of every
//! request (contract §4.1: `inferwatch.gpu.uuid`, `inferwatch.gpu.sm_util`) shares with it.
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
//! span waits for the settle delay), and the request's [`RequestGpuFacts`](super::RequestGpuFacts) carries the
//! neighbour when the request was contended.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::processes::Processes;
use super::samples::{GpuSamples, Snapshot};
use crate::correlator::config::GpuDetectionConfig;
use crate::model::{RuntimeRequest, UnixNanos};

const MS: u64 = 1_000_000;

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
    /// The contended requests (each also got the neighbour in its [`RequestGpuFacts`](super::RequestGpuFacts)).
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

/// What the detector reads besides its own state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reads<'a> {
    pub(crate) samples: &'a GpuSamples,
    pub(crate) procs: &'a Processes,
    pub(crate) cfg: &'a GpuDetectionConfig,
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

/// The contention detector: per runtime instance its baseline, per (instance, GPU) its open
/// contention interval.
#[derive(Debug, Default)]
pub(crate) struct Contention {
    instances: BTreeMap<u32, Instance>,
    open: BTreeMap<(u32, String), OpenInterval>,
    /// `inferwatch_gpu_contention_seconds_total{gpu,neighbour}`, bounded.
    pub(crate) seconds: BTreeMap<(String, String), f64>,
    /// Findings emitted.
    pub(crate) findings: u64,
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

pub(crate) fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

impl Contention {
    /// (runtime instances, open intervals).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.instances.len(), self.open.len())
    }

    /// `pid` is in an NVML sample at `ts`: a known instance is still there.
    pub(crate) fn seen(&mut self, pid: u32, ts: UnixNanos) {
        if let Some(i) = self.instances.get_mut(&pid) {
            i.last_seen = i.last_seen.max(ts);
        }
    }

    /// The instance `pid` exited: its baseline must not pass to the next process of that pid.
    pub(crate) fn forget(&mut self, pid: u32) {
        self.instances.remove(&pid);
    }

    /// A pid seen as a runtime instance (span exporter or listener).
    pub(crate) fn on_runtime(
        &mut self,
        pid: u32,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
        evictions: &mut u64,
    ) {
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
            *evictions += 1;
        }
    }

    fn neighbour_in(
        procs: &Processes,
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
        let id = procs.identity(pid);
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

    /// A settled request of instance `pid` (GPU pids `pids`, on `gpus`) decoded from
    /// `first_token` at `tpot` per token: updates the baseline and the open intervals, closing
    /// those it starts too far after into `out`. Returns the noisy neighbour when the request
    /// was contended.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site (GpuView::on_request); the values are the request's decode facts"
    )]
    pub(crate) fn on_request(
        &mut self,
        pid: u32,
        pids: &BTreeSet<u32>,
        gpus: &[String],
        span: &RuntimeRequest,
        first_token: UnixNanos,
        tpot: u64,
        reads: Reads<'_>,
        out: &mut Vec<GpuContentionFinding>,
    ) -> Option<NoisyNeighbour> {
        let cfg = reads.cfg;
        let gap = cfg.sample_gap_ms.saturating_mul(MS);
        // Others' SM on each GPU over the decode window.
        let mut contended_on: Vec<(String, NoisyNeighbour)> = Vec::new();
        let mut clean = !gpus.is_empty();
        let baseline = self.baseline(pid, span.end, cfg);
        for uuid in gpus {
            let snaps = reads.samples.window(uuid, first_token, span.end, gap);
            let Some(others) = Self::others_sm(&snaps, pids) else {
                continue;
            };
            if others < f64::from(cfg.neighbour_sm_pct) {
                continue;
            }
            clean = false;
            let slowed = baseline.is_some_and(|b| {
                u128::from(tpot) * 100 >= u128::from(b) * u128::from(cfg.tpot_inflation_pct)
            });
            if slowed && let Some(n) = Self::neighbour_in(reads.procs, uuid, &snaps, pids) {
                contended_on.push((uuid.clone(), n));
            }
        }
        if clean && let Some(inst) = self.instances.get_mut(&pid) {
            inst.baseline.push_back((span.end, tpot));
            while inst.baseline.len() > cfg.max_baseline_requests.max(1) {
                inst.baseline.pop_front();
            }
        }
        let baseline = baseline?;
        let mut neighbour = None;
        for (uuid, n) in contended_on {
            self.extend_interval(pid, &uuid, span, first_token, tpot, baseline, reads, out);
            if neighbour.is_none() {
                neighbour = Some(n);
            }
        }
        neighbour
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
        reads: Reads<'_>,
        out: &mut Vec<GpuContentionFinding>,
    ) {
        let cfg = reads.cfg;
        let key = (pid, uuid.to_owned());
        let merge_gap = cfg.interval_merge_gap_ms.saturating_mul(MS);
        if self
            .open
            .get(&key)
            .is_some_and(|o| first_token > o.end.saturating_add(merge_gap))
            && let Some(old) = self.open.remove(&key)
        {
            self.close(pid, uuid, old, reads, out);
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
        reads: Reads<'_>,
        out: &mut Vec<GpuContentionFinding>,
    ) {
        let cfg = reads.cfg;
        let gap = cfg.sample_gap_ms.saturating_mul(MS);
        let pids = reads.procs.gpu_pids(pid, reads.samples.pids());
        let snaps = reads.samples.window(uuid, open.start, open.end, gap);
        let Some(neighbour) = Self::neighbour_in(reads.procs, uuid, &snaps, &pids) else {
            return;
        };
        let tpot_ns = open.tpots.iter().sum::<u64>() / open.tpots.len().max(1) as u64;
        let finding = GpuContentionFinding {
            gpu_uuid: uuid.to_owned(),
            runtime_pid: pid,
            runtime_executable: reads.procs.identity(pid).and_then(|i| i.executable.clone()),
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
        let series = self.seconds.len();
        let mut key = (uuid.to_owned(), finding.neighbour.label());
        if !self.seconds.contains_key(&key) && series >= cfg.max_contention_series {
            key.1 = crate::labels::OTHER.into();
        }
        *self.seconds.entry(key).or_default() += finding.seconds();
        self.findings += 1;
        out.push(finding);
    }

    /// Closes intervals that went quiet and forgets idle instances.
    pub(crate) fn on_tick(
        &mut self,
        now: UnixNanos,
        reads: Reads<'_>,
        out: &mut Vec<GpuContentionFinding>,
    ) {
        let cfg = reads.cfg;
        let close_after = cfg.interval_close_ms.saturating_mul(MS);
        let due: Vec<(u32, String)> = self
            .open
            .iter()
            .filter(|(_, o)| now >= o.end.saturating_add(close_after))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(open) = self.open.remove(&key) {
                self.close(key.0, &key.1, open, reads, out);
            }
        }
        let idle = cfg.instance_idle_ms.saturating_mul(MS);
        let open = &self.open;
        self.instances.retain(|pid, i| {
            now < i.last_seen.saturating_add(idle) || open.keys().any(|(p, _)| p == pid)
        });
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
