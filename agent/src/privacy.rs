//! Agent-wide privacy settings (`[privacy]`): tenant hashing, and the keyed SipHash-2-4 it
//! shares with the correlator's conversation keys.
//!
//! With `hash_tenants` on, every tenant id that leaves the agent (abort and KV-eviction
//! findings, forwarded runtime spans' tenant attribute, metric labels, finding logs) is
//! replaced by `t-<16 hex>`, a keyed SipHash-2-4 of the id. The correlator still joins on the
//! raw ids inside the process: hashing happens at the edge, once per exported value.

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::hash::Hasher;

use serde::{Deserialize, Serialize};

use crate::otlp_wire::read::rewrite_str_attributes;

/// SipHash-2-4 of `data` under the 128-bit key `(k0, k1)` (Aumasson & Bernstein): the tenant
/// hash here and the correlator's conversation keys. The `siphasher` crate's, not `std`'s:
/// `DefaultHasher` does not promise a stable output across Rust releases and `std`'s
/// `SipHasher` is deprecated; the output must stay stable across restarts and nodes.
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut hasher = siphasher::sip::SipHasher24::new_with_keys(k0, k1);
    hasher.write(data);
    hasher.finish()
}

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

/// An older config section with its own tenant-hashing keys
/// (`[correlator.kv_eviction] hash_tenants`, `tenant_hash_key`), merged into `[privacy]` by
/// [`PrivacyConfig::merge_legacy`]. Implemented where the section is defined, so that this
/// module stays below the components that hash tenants.
pub trait LegacyTenantHashing {
    /// The section's `hash_tenants` switch and `tenant_hash_key`.
    fn tenant_hashing(&mut self) -> (&mut bool, &mut String);
}

impl PrivacyConfig {
    /// Folds the older KV-only keys into this section, so one setting governs every export:
    /// `hash_tenants` is on when either says so; the key is this section's, or the older one
    /// when this one is empty. The KV tracker then reads the merged values back.
    pub fn merge_legacy(&mut self, kv: &mut impl LegacyTenantHashing) {
        let (hash_tenants, tenant_hash_key) = kv.tenant_hashing();
        self.hash_tenants |= *hash_tenants;
        if self.tenant_hash_key.is_empty() {
            self.tenant_hash_key = tenant_hash_key.clone();
        }
        *hash_tenants = self.hash_tenants;
        *tenant_hash_key = self.tenant_hash_key.clone();
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
    fn siphash_matches_the_reference_vector() {
        // The reference paper's test: key 00..0f, message 00..0e (15 bytes).
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xa129_ca61_49be_45e5);
    }

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
}
