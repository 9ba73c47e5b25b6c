//! Bounded tenant labels for the KV-eviction counter.

use std::collections::{HashMap, HashSet};

use super::{OTHER_TENANT, SELF_TENANT};

/// Bounded tenant labels for `inferwatch_kv_evictions_total{victim_tenant, neighbour_tenant}`:
/// at most `k` tenants get their own label, the rest `other`.
///
/// Labels are sticky, so that a labelled tenant's counter stays monotonic: the first `k`
/// tenants counted get a label; afterwards a tenant counted more than twice as often as the
/// least counted labelled tenant takes that one's place (whose later counts go to `other`).
/// Counts are kept for at most `16 * k` candidates.
#[derive(Debug, Clone)]
pub struct TenantLabels {
    k: usize,
    counts: HashMap<String, u64>,
    labelled: HashSet<String>,
}

impl TenantLabels {
    /// Labels for at most `k` tenants.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            counts: HashMap::new(),
            labelled: HashSet::new(),
        }
    }

    /// Counts one occurrence of `tenant` and returns its label (`tenant` or `other`).
    pub fn label(&mut self, tenant: &str) -> String {
        if tenant == SELF_TENANT || tenant == OTHER_TENANT {
            return tenant.to_string();
        }
        let room = self.counts.len() < self.k.saturating_mul(16).max(1);
        let count = match self.counts.get_mut(tenant) {
            Some(c) => {
                *c += 1;
                *c
            }
            None if room => {
                self.counts.insert(tenant.to_string(), 1);
                1
            }
            None => return OTHER_TENANT.to_string(),
        };
        if self.labelled.contains(tenant) {
            return tenant.to_string();
        }
        if self.labelled.len() < self.k {
            self.labelled.insert(tenant.to_string());
            return tenant.to_string();
        }
        let weakest = self
            .labelled
            .iter()
            .map(|t| (self.counts.get(t).copied().unwrap_or(0), t.clone()))
            .min();
        match weakest {
            Some((least, name)) if count > least.saturating_mul(2) => {
                self.labelled.remove(&name);
                self.labelled.insert(tenant.to_string());
                tenant.to_string()
            }
            _ => OTHER_TENANT.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_sticky() {
        let mut l = TenantLabels::new(2);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OTHER_TENANT);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label(SELF_TENANT), SELF_TENANT);
        // c grows to more than twice b's count and takes its label.
        for _ in 0..3 {
            l.label("c");
        }
        assert_eq!(l.label("c"), "c");
        assert_eq!(l.label("b"), OTHER_TENANT);
    }
}
