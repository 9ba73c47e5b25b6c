//! Process identities and runtime instances (contract §1.4): which front process a pid
//! belongs to, a span's instance, and the pids that make up an instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::correlator::config::GpuDetectionConfig;
use crate::model::{ProcessIdentity, RuntimeRequest, UnixNanos};

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

/// Process identities, front processes and the `service.instance.id` aliases, each bounded.
#[derive(Debug, Default)]
pub(crate) struct Processes {
    identities: BTreeMap<u32, (UnixNanos, ProcessIdentity)>,
    /// Front processes by pid.
    fronts: BTreeMap<u32, Front>,
    /// `service.instance.id` -> the front its joined spans read through (the alias of spans
    /// that joined no connection).
    instance_ids: BTreeMap<Arc<str>, (UnixNanos, u32)>,
}

impl Processes {
    /// Identities kept.
    pub(crate) fn len(&self) -> usize {
        self.identities.len()
    }

    pub(crate) fn identity(&self, pid: u32) -> Option<&ProcessIdentity> {
        self.identities.get(&pid).map(|(_, id)| id)
    }

    /// The front processes known.
    pub(crate) fn fronts(&self) -> impl Iterator<Item = u32> + '_ {
        self.fronts.keys().copied()
    }

    /// Keeps a process identity. Returns `true` when the pid was a front and names another
    /// process now: the instance exited, and what was learnt of it must be forgotten.
    pub(crate) fn on_process(
        &mut self,
        identity: ProcessIdentity,
        cfg: &GpuDetectionConfig,
        evictions: &mut u64,
    ) -> bool {
        let ts = identity.start_time.unwrap_or(0);
        let seen = self
            .identities
            .get(&identity.pid)
            .map_or(ts, |(t, _)| (*t).max(ts));
        let mut exited = false;
        if let Some(front) = self.fronts.get_mut(&identity.pid) {
            match (front.start_time, identity.start_time) {
                // The pid names another process now: the instance exited. What it learnt
                // (baseline, open intervals keep their own pid) must not pass to the new one.
                (Some(was), Some(now)) if was != now => {
                    self.fronts.remove(&identity.pid);
                    self.instance_ids.retain(|_, (_, p)| *p != identity.pid);
                    exited = true;
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
            *evictions += 1;
        }
        exited
    }

    /// A process that read requests (a `Listen` or a request head by `pid`): a front.
    pub(crate) fn on_front(
        &mut self,
        pid: u32,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
        evictions: &mut u64,
    ) {
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
                *evictions += 1;
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
    pub(crate) fn learn_instance_id(
        &mut self,
        span: &RuntimeRequest,
        pid: u32,
        ts: UnixNanos,
        cfg: &GpuDetectionConfig,
        evictions: &mut u64,
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
                *evictions += 1;
            }
        }
        self.instance_ids.insert(id.clone(), (ts, pid));
    }

    /// The instance's GPU pids: the front `pid` and those of `gpu_pids` (the pids NVML lists)
    /// that descend from it. What contention and the per-request GPU facts read: only pids
    /// on a GPU can be in a sample.
    pub(crate) fn gpu_pids(&self, pid: u32, gpu_pids: impl Iterator<Item = u32>) -> BTreeSet<u32> {
        let mut pids = BTreeSet::new();
        for p in gpu_pids {
            if p == pid {
                continue;
            }
            // An instance known only by its alias (no front): its children, as before the
            // kernel named fronts.
            let child_of_alias = !self.fronts.contains_key(&pid)
                && self.identity(p).and_then(|i| i.parent_pid) == Some(pid);
            if child_of_alias || self.front_of(p) == Some(pid) {
                pids.insert(p);
            }
        }
        pids.insert(pid);
        pids
    }

    /// The pids that are the instance for its cold start: its GPU pids ([`Self::gpu_pids`])
    /// and its other descendants among the identities known (a runtime's start-up spans name
    /// its engine's processes, GPU or not). Walks every identity: only while the instance's
    /// cold start is undecided.
    pub(crate) fn all_pids(&self, pid: u32, gpu_pids: impl Iterator<Item = u32>) -> BTreeSet<u32> {
        let mut pids = self.gpu_pids(pid, gpu_pids);
        pids.extend(
            self.identities
                .keys()
                .filter(|p| **p != pid && self.front_of(**p) == Some(pid)),
        );
        pids
    }

    /// Forgets fronts and aliases not seen for `idle` nanoseconds.
    pub(crate) fn on_tick(&mut self, now: UnixNanos, idle: u64) {
        self.fronts
            .retain(|_, f| now < f.last_seen.saturating_add(idle));
        self.instance_ids
            .retain(|_, (t, _)| now < t.saturating_add(idle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(pid: u32, start: u64, parent: u32) -> ProcessIdentity {
        ProcessIdentity {
            pid,
            executable: None,
            container_id: None,
            pod_uid: None,
            start_time: Some(start),
            parent_pid: Some(parent),
        }
    }

    /// The per-request GPU facts and contention read only the instance's pids on a GPU; the
    /// identities of its other descendants (an API server's tokenizer, a start-up helper)
    /// count only for its cold start.
    #[test]
    fn gpu_pids_are_the_front_and_its_descendants_on_a_gpu_only() {
        const FRONT: u32 = 100;
        const ENGINE: u32 = 101;
        const TOKENIZER: u32 = 102;
        const OTHER: u32 = 200;
        let cfg = GpuDetectionConfig::default();
        let mut evictions = 0;
        let mut procs = Processes::default();
        for id in [
            identity(FRONT, 10, 1),
            identity(ENGINE, 11, FRONT),
            identity(TOKENIZER, 12, FRONT),
            identity(OTHER, 13, 1),
        ] {
            procs.on_process(id, &cfg, &mut evictions);
        }
        procs.on_front(FRONT, 20, &cfg, &mut evictions);
        // NVML lists the engine and another process; the tokenizer holds no GPU.
        let on_gpu = [ENGINE, OTHER];
        assert_eq!(
            procs.gpu_pids(FRONT, on_gpu.into_iter()),
            BTreeSet::from([FRONT, ENGINE])
        );
        assert_eq!(
            procs.all_pids(FRONT, on_gpu.into_iter()),
            BTreeSet::from([FRONT, ENGINE, TOKENIZER])
        );
        // An instance known by its alias only (no front): its children on a GPU.
        assert_eq!(
            procs.gpu_pids(OTHER, [ENGINE, OTHER].into_iter()),
            BTreeSet::from([OTHER])
        );
        assert_eq!(evictions, 0);
    }
}
