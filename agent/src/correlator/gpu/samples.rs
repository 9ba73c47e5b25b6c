//! The NVML sample store: per GPU, the recent samples reduced to what the detections read, and
//! every pid those samples list (the candidates for an instance's GPU pids).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::correlator::config::GpuDetectionConfig;
use crate::model::{GpuSample, UnixNanos};

const MS: u64 = 1_000_000;

/// One NVML sample of one GPU, reduced to what the detections read.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) ts: UnixNanos,
    pub(crate) sm_util: Option<u32>,
    /// pid -> (SM share, memory bytes).
    pub(crate) procs: BTreeMap<u32, (Option<u32>, Option<u64>)>,
}

/// Recent NVML samples, bounded per GPU (count and age), in GPUs and in pids.
#[derive(Debug, Default)]
pub(crate) struct GpuSamples {
    /// The latest sample as received (the per-GPU and per-process gauges).
    pub(crate) latest: Option<GpuSample>,
    gpus: BTreeMap<String, VecDeque<Snapshot>>,
    /// Every pid in a kept NVML sample, with its last sample: the candidates for an
    /// instance's GPU pids.
    pids: BTreeMap<u32, UnixNanos>,
}

impl GpuSamples {
    /// Snapshots kept, all GPUs together.
    pub(crate) fn len(&self) -> usize {
        self.gpus.values().map(VecDeque::len).sum()
    }

    /// The pids listed in the kept samples.
    pub(crate) fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.pids.keys().copied()
    }

    /// Keeps one poll; counts in `evictions` what the bounds turned away.
    pub(crate) fn on_sample(
        &mut self,
        sample: GpuSample,
        cfg: &GpuDetectionConfig,
        evictions: &mut u64,
    ) {
        let ts = sample.ts;
        for gpu in &sample.gpus {
            if !self.gpus.contains_key(&gpu.uuid) && self.gpus.len() >= cfg.max_gpus.max(1) {
                *evictions += 1;
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
                *evictions += 1;
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
        for p in &sample.processes {
            if !self.pids.contains_key(&p.pid) && self.pids.len() >= cfg.max_processes.max(1) {
                *evictions += 1;
                continue;
            }
            self.pids.insert(p.pid, ts);
        }
        let horizon = ts.saturating_sub(cfg.sample_history_ms.saturating_mul(MS));
        self.pids.retain(|_, last| *last >= horizon);
        self.latest = Some(sample);
    }

    /// Snapshots of `gpu` in `[from, to]`, or the last one before `to` within the gap.
    pub(crate) fn window(
        &self,
        gpu: &str,
        from: UnixNanos,
        to: UnixNanos,
        gap: u64,
    ) -> Vec<&Snapshot> {
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

    /// GPUs where one of `pids` appears in `[from, to]`.
    pub(crate) fn gpus_of(
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
}
