//! Agent-wide privacy settings (`[privacy]`): tenant hashing.
//!
//! With `hash_tenants` on, every tenant id that leaves the agent (abort and KV-eviction
//! findings, forwarded runtime spans' tenant attribute, metric labels, finding logs) is
//! replaced by `t-<16 hex>`, a keyed SipHash-2-4 of the id. The correlator still joins on the
//! raw ids inside the process: hashing happens at the edge, once per exported value.

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde::{Deserialize, Serialize};

use crate::correlator::siphash24;
use crate::sources::otlp::wire::rewrite_str_attributes;

/// `[privacy]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Report every exported tenant id as `t-<16 hex>`, a keyed SipHash-2-4 of the id under
    /// `tenant_hash_key`: stable across restarts and nodes sharing the key, not reversible
    /// without it. The older `[correlator.kv_eviction] hash_tenants` turns this on too.
    pub hash_tenants: bool,
    /// The key of the tenant hash (any string; folded to 128 bits). Set it from a Secret
    /// (`INFERWATCH_PRIVACY__TENANT_HASH_KEY`); when empty, the older
    /// `[correlator.kv_eviction] tenant_hash_key` is used.
    pub tenant_hash_key: String,
}

/// The keyed tenant hash, shared by every place that exports a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantHasher {
    k0: u64,
    k1: u64,
}

impl TenantHasher {
    /// A hasher under `key` (any length: folded to two 64-bit halves with fixed SipHash keys,
    /// so that any string is a usable key).
    pub fn new(key: &str) -> Self {
        let key = key.as_bytes();
        Self {
            k0: siphash24(1, 2, key),
            k1: siphash24(3, 4, key),
        }
    }

    /// `t-<16 hex>` for `tenant`.
    pub fn hash(&self, tenant: &str) -> String {
        format!("t-{:016x}", siphash24(self.k0, self.k1, tenant.as_bytes()))
    }

    /// A received span's protobuf bytes with the string value of its `attribute` attribute
    /// hashed; the bytes as they came when the span has none. Every other byte is kept.
    pub fn hash_in_span(&self, attribute: &str, span: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        if rewrite_str_attributes(&span, attribute, |tenant| self.hash(tenant), &mut out) {
            out
        } else {
            span
        }
    }

    /// Replaces the string value of `attribute` in decoded `attributes` (a resource's) by its
    /// hash.
    pub fn hash_attributes(&self, attribute: &str, attributes: &mut [KeyValue]) {
        for kv in attributes {
            if kv.key == attribute
                && let Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v)),
                }) = &mut kv.value
            {
                *v = self.hash(v);
            }
        }
    }
}

impl PrivacyConfig {
    /// Folds the older KV-only keys into this section, so one setting governs every export:
    /// `hash_tenants` is on when either says so; the key is this section's, or the older one
    /// when this one is empty. The KV tracker then reads the merged values back.
    pub fn merge_legacy(&mut self, kv: &mut crate::correlator::KvEvictionConfig) {
        self.hash_tenants |= kv.hash_tenants;
        if self.tenant_hash_key.is_empty() {
            self.tenant_hash_key = kv.tenant_hash_key.clone();
        }
        kv.hash_tenants = self.hash_tenants;
        kv.tenant_hash_key = self.tenant_hash_key.clone();
    }

    /// The hasher when hashing is on.
    pub fn hasher(&self) -> Option<TenantHasher> {
        self.hash_tenants
            .then(|| TenantHasher::new(&self.tenant_hash_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_keyed_and_opaque() {
        let a = TenantHasher::new("k1");
        let b = TenantHasher::new("k2");
        assert_eq!(a.hash("acme"), a.hash("acme"));
        assert_ne!(a.hash("acme"), b.hash("acme"));
        assert_ne!(a.hash("acme"), a.hash("globex"));
        let h = a.hash("acme");
        assert!(h.starts_with("t-") && h.len() == 18 && !h.contains("acme"));
    }

    #[test]
    fn legacy_kv_keys_turn_hashing_on_everywhere() {
        let mut p = PrivacyConfig::default();
        let mut kv = crate::correlator::KvEvictionConfig {
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
        let mut kv = crate::correlator::KvEvictionConfig::default();
        p.merge_legacy(&mut kv);
        assert!(kv.hash_tenants);
        assert_eq!(kv.tenant_hash_key, "new");
    }
}
