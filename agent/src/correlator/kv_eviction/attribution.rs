//! Attributing a KV eviction: which tenants' KV demand in the window between two turns
//! evicted the victim's prefix, from the spans or from the KV events.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::finding::{KvEvictionFinding, KvEvictionStats, KvEvidence, SpanLink, TenantShare};
use super::log::{InstanceLog, KvLogged, in_prefill};
use super::{KvTracker, NANOS_PER_MILLI, Pending, SELF_TENANT};
use crate::model::UnixNanos;

impl KvTracker {
    pub(super) fn attribute(
        &self,
        p: Pending,
        evictor_batches: Option<&[UnixNanos]>,
        stats: &mut KvEvictionStats,
    ) -> KvEvictionFinding {
        let mut f = p.finding;
        let Some(log) = self.logs.get(p.instance as usize) else {
            return f;
        };
        let (w0, w1) = (f.window_start, f.window_end);
        let mut demand: BTreeMap<u32, f64> = BTreeMap::new();
        let mut per_request: Vec<(f64, usize)> = Vec::new();
        // The batches that removed the victim's blocks stored the evictor's: their stores go to
        // the requests in prefill at that moment, exactly when one was, split by uncached
        // prompt tokens when several were.
        if let Some(batches) = evictor_batches.filter(|b| !b.is_empty()) {
            let slack = self
                .config
                .kv_store_slack_ms
                .saturating_mul(NANOS_PER_MILLI);
            let mut shares: HashMap<usize, f64> = HashMap::new();
            for entry in &log.kv {
                let KvLogged::Stored { ts, hashes, .. } = entry else {
                    continue;
                };
                if batches.binary_search(ts).is_err() {
                    continue;
                }
                let covering: Vec<usize> = log
                    .requests
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !(r.conv == p.conv && r.conv != 0))
                    .filter(|(_, r)| in_prefill(r, *ts, slack))
                    .map(|(i, _)| i)
                    .collect();
                if covering.len() > 1 {
                    stats.kv_shared_evictor_stores += 1;
                }
                let weight: f64 = covering
                    .iter()
                    .filter_map(|i| log.requests.get(*i))
                    .map(|r| r.uncached().max(1) as f64)
                    .sum();
                for i in covering {
                    if let Some(r) = log.requests.get(i) {
                        *shares.entry(i).or_default() +=
                            hashes.len() as f64 * r.uncached().max(1) as f64 / weight;
                    }
                }
            }
            for (i, blocks) in shares {
                if let Some(r) = log.requests.get(i) {
                    *demand.entry(r.tenant).or_default() += blocks;
                    per_request.push((blocks, i));
                }
            }
            if !demand.is_empty() {
                f.method = KvEvidence::KvEvents;
                return self.rank(f, p.victim_tenant, demand, per_request, log);
            }
        }
        let kv_usable = log.kv_since.is_some_and(|since| since <= w0)
            && !log
                .kv
                .iter()
                .any(|e| matches!(e, KvLogged::Broken { ts } if *ts >= w0 && *ts <= w1));
        let mut stored_in_window = false;
        if kv_usable {
            let block = u64::from(self.config.block_size.max(1));
            let slack = self
                .config
                .kv_store_slack_ms
                .saturating_mul(NANOS_PER_MILLI);
            let mut attributed: HashMap<usize, f64> = HashMap::new();
            let mut removed: HashSet<u64> = HashSet::new();
            let mut restored: HashSet<u64> = HashSet::new();
            for entry in &log.kv {
                match entry {
                    KvLogged::Stored { ts, hashes, .. } if *ts >= w0 && *ts < w1 => {
                        stored_in_window = true;
                        let n = hashes.len() as u64;
                        let best = log
                            .requests
                            .iter()
                            .enumerate()
                            .filter(|(_, r)| r.arrival <= *ts && *ts <= r.end.saturating_add(slack))
                            .min_by_key(|(_, r)| {
                                let expected = r.prompt / block - r.cached / block;
                                (expected.abs_diff(n), r.end)
                            })
                            .map(|(i, _)| i);
                        if let Some(i) = best {
                            *attributed.entry(i).or_default() += n as f64;
                        }
                    }
                    KvLogged::Stored { ts, hashes, .. }
                        if *ts >= w1 && *ts <= p.victim_end.saturating_add(slack) =>
                    {
                        restored.extend(hashes.iter().copied());
                    }
                    KvLogged::Removed { ts, hashes } if *ts >= w0 && *ts <= w1 => {
                        removed.extend(hashes.iter().copied());
                    }
                    _ => {}
                }
            }
            if stored_in_window {
                f.method = KvEvidence::KvEvents;
                f.victim_blocks_removed = Some(removed.intersection(&restored).count() as u64);
                for (i, blocks) in attributed {
                    let Some(r) = log.requests.get(i) else {
                        continue;
                    };
                    if r.conv == p.conv && r.conv != 0 {
                        continue;
                    }
                    *demand.entry(r.tenant).or_default() += blocks;
                    per_request.push((blocks, i));
                }
            }
        }
        if !stored_in_window {
            for (i, r) in log.requests.iter().enumerate() {
                if r.conv == p.conv && r.conv != 0 {
                    continue;
                }
                let d = r.demand(w0, w1);
                if d > 0.0 {
                    *demand.entry(r.tenant).or_default() += d;
                    per_request.push((d, i));
                }
            }
        }
        self.rank(f, p.victim_tenant, demand, per_request, log)
    }

    /// Names the neighbour and the top 3 from the per-tenant demand.
    pub(super) fn rank(
        &self,
        mut f: KvEvictionFinding,
        victim_tenant: u32,
        demand: BTreeMap<u32, f64>,
        mut per_request: Vec<(f64, usize)>,
        log: &InstanceLog,
    ) -> KvEvictionFinding {
        let total: f64 = demand.values().sum();
        if total <= 0.0 {
            return f;
        }
        let mut ranked: Vec<(u32, f64)> = demand.into_iter().collect();
        // Largest first; ties by tenant name so the order never depends on interning order.
        ranked.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| self.tenant_name(a.0).cmp(&self.tenant_name(b.0)))
        });
        let name = |id: u32| {
            if id == victim_tenant {
                SELF_TENANT.to_string()
            } else {
                self.tenant_name(id)
            }
        };
        let round = |x: f64| (x * 10_000.0).round() / 10_000.0;
        f.top_tenants = ranked
            .iter()
            .take(3)
            .map(|(id, d)| TenantShare {
                tenant: name(*id),
                share: round(d / total),
            })
            .collect();
        if let Some((top, d)) = ranked.first() {
            f.neighbour_tenant = Some(name(*top));
            f.neighbour_share = round(d / total);
            per_request.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            f.neighbour_links = per_request
                .iter()
                .filter_map(|(_, i)| log.requests.get(*i))
                .filter(|r| r.tenant == *top)
                .take(self.config.max_neighbour_links)
                .map(|r| SpanLink {
                    trace_id: r.trace_id,
                    span_id: r.span_id,
                })
                .collect();
        }
        f
    }
}
