//! Settings of the KV-eviction detection (`[correlator.kv_eviction]`).

use serde::{Deserialize, Serialize};

/// Settings of the KV-eviction detection (`[correlator.kv_eviction]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEvictionConfig {
    /// Whether conversations are tracked and evictions reported at all.
    pub enabled: bool,
    /// The runtime's KV block size in tokens (vLLM's default is 16): expected cached tokens are
    /// rounded down to it.
    pub block_size: u32,
    /// Smallest expected cached prefix, in tokens, for which a miss is reported.
    pub min_prefix_tokens: u64,
    /// A conversation with no turn for this long is forgotten, in milliseconds; its next turn
    /// is treated as a first turn.
    pub conversation_idle_ms: u64,
    /// Most conversations tracked at once; beyond it the least recently updated is dropped and
    /// counted.
    pub max_conversations: usize,
    /// Most distinct tenants interned; later tenants share the name `other`.
    pub max_tenants: usize,
    /// Most runtime instances tracked (at most 65,535).
    pub max_instances: usize,
    /// How long each instance's request log keeps a request after it ended, in milliseconds.
    /// Windows between turns longer than this are attributed from what is left.
    pub request_log_horizon_ms: u64,
    /// Most requests kept per instance in the request log; beyond it the oldest goes.
    pub max_requests_per_instance: usize,
    /// How long after the victim's span settled the attribution waits, in milliseconds, so that
    /// requests that overlapped the window but ended later are counted.
    pub attribution_delay_ms: u64,
    /// Most span links to the neighbour's requests in one finding (largest demand first).
    pub max_neighbour_links: usize,
    /// Report tenant ids as `t-<16 hex>`, a keyed SipHash-2-4 of the id under
    /// `tenant_hash_key`: stable across restarts and nodes with the same key, not reversible
    /// without it.
    pub hash_tenants: bool,
    /// The key of the tenant hash (any string; it is folded to 128 bits).
    pub tenant_hash_key: String,
    /// Tenants with their own label in the eviction counters; the rest count as `other`.
    pub metric_tenant_labels: usize,
    /// Most block hashes kept per instance from KV events (stored and removed together).
    pub max_kv_blocks_per_instance: usize,
    /// Slack after a request's end within which a `BlockStored` event is still its own, in
    /// milliseconds (runtimes cache the last blocks when the request finishes).
    pub kv_store_slack_ms: u64,
}

impl Default for KvEvictionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            block_size: 16,
            min_prefix_tokens: 256,
            conversation_idle_ms: 30 * 60 * 1000,
            // 7/16 of 2^18: the largest count whose hash table never outgrows 2^18 buckets
            // (8 MiB). When a full table has used up its free slots on tombstones, hashbrown
            // rehashes in place while the entries fit in half its capacity (7/8 of the
            // buckets) and doubles otherwise, so the earlier 2^17 settled at 2^19 buckets
            // (17 MiB) under steady churn. With the update queue, ~12 MiB in all. At 100 new
            // conversations/s, a busy GPU node, that is about 20 minutes of history, the order
            // of `conversation_idle_ms`; a conversation returning after 115k others on one
            // node would have lost its prefix to plain LRU pressure anyway.
            max_conversations: 114_688,
            max_tenants: 65_536,
            max_instances: 1024,
            request_log_horizon_ms: 10 * 60 * 1000,
            max_requests_per_instance: 16_384,
            attribution_delay_ms: 5_000,
            max_neighbour_links: 16,
            hash_tenants: false,
            tenant_hash_key: String::new(),
            metric_tenant_labels: 20,
            max_kv_blocks_per_instance: 262_144,
            kv_store_slack_ms: 50,
        }
    }
}

impl crate::privacy::LegacyTenantHashing for KvEvictionConfig {
    fn tenant_hashing(&mut self) -> (&mut bool, &mut String) {
        (&mut self.hash_tenants, &mut self.tenant_hash_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::PrivacyConfig;

    #[test]
    fn legacy_kv_keys_turn_hashing_on_everywhere() {
        let mut p = PrivacyConfig::default();
        let mut kv = KvEvictionConfig {
            hash_tenants: true,
            tenant_hash_key: "old".into(),
            ..Default::default()
        };
        p.merge_legacy(&mut kv);
        assert!(p.hash_tenants);
        assert_eq!(p.tenant_hash_key, "old");
        let mut p = PrivacyConfig {
            hash_tenants: true,
            tenant_hash_key: "new".into(),
        };
        let mut kv = KvEvictionConfig::default();
        p.merge_legacy(&mut kv);
        assert!(kv.hash_tenants);
        assert_eq!(kv.tenant_hash_key, "new");
    }
}
