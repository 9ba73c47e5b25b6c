//! Cross-tenant KV-cache eviction (contract §3.3): per runtime instance, which conversation lost
//! its warm prefix between two turns, and whose burst evicted it.
//!
//! # Detection
//! For turn n+1 of a conversation on the same instance as turn n, the expected cached tokens are
//! `E = min(P_n + O_n, P_n+1)` rounded down to the block size. An eviction is found when
//! `E >= min_prefix_tokens` and the reported cached tokens `C_n+1 < E / 2`. A conversation seen
//! on another instance, or idle for longer than `conversation_idle_ms`, starts afresh.
//!
//! # Attribution
//! The decision waits `attribution_delay_ms` after the victim's span settled, so that the spans
//! of requests that overlapped the window `[end of turn n, arrival of turn n+1]` but ended later
//! are known. Then, per tenant:
//! - `spans`: KV demand = uncached prompt tokens of the requests whose prefill started in the
//!   window, plus their output tokens pro-rated by how much of their decode fell in the window
//!   (a refinement of "prompt + output": only allocations made in the window can evict);
//! - `kv_events`, when the instance published KV events covering the window without a sequence
//!   gap: blocks stored in the window, each `BlockStored` event attributed to the request active
//!   on the instance at that time whose expected new blocks (`(P - C) / block_size`) match the
//!   event's block count best. vLLM's events name no request, so this is a heuristic: exact when
//!   one request is prefilling at a time, a best guess under heavy batching. The victim's
//!   removed blocks are the hashes removed in the window that its turn n+1 stored again (same
//!   content, same hash).
//!
//! The victim's own conversation is never the neighbour; its own tenant can be (`self`).
//!
//! # Memory
//! The conversation table ([`ConversationTable`]) keys conversations by a 64-bit SipHash of
//! `tenant \0 conversation` and keeps a 24-byte record. Budget at the default cap of 1,048,576
//! conversations: 2^21 hash buckets x 33 bytes (63 MiB) plus the eviction queue (16 bytes per
//! update, compacted at twice the records: at most 32 MiB), so at most 95 MiB in steady state
//! and 115 MiB while the table doubles (measured by `agent/benches/conversations.rs`: 82 bytes
//! per conversation live, 115 MiB peak). Beyond the cap the least recently updated
//! conversation is dropped and counted. Per instance, a request log (time horizon and cap) and
//! a KV event log (cap in blocks) are kept; tenants are interned up to `max_tenants`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::join::ConnectionFacts;
use crate::model::{InstanceIdentity, KvEvent, KvEventBatch, RuntimeRequest, UnixNanos};

const NANOS_PER_MILLI: u64 = 1_000_000;

/// The tenant name reported when the victim's own tenant is the noisy neighbour.
pub const SELF_TENANT: &str = "self";
/// The metric label for tenants outside the top K.
pub const OTHER_TENANT: &str = "other";
/// The tenant name used when a request carries none.
pub const UNKNOWN_TENANT: &str = "unknown";

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

/// Where the attribution of a KV eviction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEvidence {
    /// Per-tenant KV demand computed from the runtime's request spans.
    Spans,
    /// Blocks stored and removed, from the runtime's KV events.
    KvEvents,
}

impl KvEvidence {
    /// The attribute value (`inferwatch.kv_eviction.method`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvEvidence::Spans => "spans",
            KvEvidence::KvEvents => "kv_events",
        }
    }
}

/// One tenant's share of the KV demand in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantShare {
    /// The tenant (hashed when configured), or `self` for the victim's own tenant.
    pub tenant: String,
    /// Its share of the demand, 0..=1, rounded to 4 decimals.
    pub share: f64,
}

/// A link to one of the neighbour's request spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanLink {
    /// The request span's trace id.
    pub trace_id: [u8; 16],
    /// The request span's id.
    pub span_id: [u8; 8],
}

/// A conversation whose warm prefix was evicted between two turns (`inferwatch.kv_eviction`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEvictionFinding {
    /// The victim request span's trace id: the finding span goes into this trace.
    pub trace_id: [u8; 16],
    /// The victim request span's id: the finding span's parent.
    pub parent_span_id: [u8; 8],
    /// The victim's tenant (hashed when configured).
    pub victim_tenant: Option<String>,
    /// The victim's conversation id.
    pub victim_conversation: String,
    /// The victim request's runtime id.
    pub victim_request_id: Option<String>,
    /// The runtime instance (see [`instance_key`]).
    pub instance: String,
    /// The model.
    pub model: Option<String>,
    /// Expected cached tokens `E`.
    pub expected_cached_tokens: u64,
    /// Reported cached tokens `C`.
    pub cached_tokens: u64,
    /// Start of the window: the end of turn n.
    pub window_start: UnixNanos,
    /// End of the window: the arrival of turn n+1.
    pub window_end: UnixNanos,
    /// The tenant with the largest KV demand in the window (`self` when it is the victim's
    /// own tenant), or `None` when nothing else ran (`inferwatch.noisy_neighbour.tenant`).
    pub neighbour_tenant: Option<String>,
    /// The neighbour's share of the demand (`inferwatch.noisy_neighbour.share`).
    pub neighbour_share: f64,
    /// The three largest shares.
    pub top_tenants: Vec<TenantShare>,
    /// The neighbour's request spans in the window, largest demand first (span links).
    pub neighbour_links: Vec<SpanLink>,
    /// Turn n+1's time to first token, in nanoseconds.
    pub ttft_ns: Option<u64>,
    /// How much of it the eviction cost: the prefill of the `E - C` lost tokens at the
    /// instance's recent prefill rate, at most the TTFT.
    pub ttft_penalty_ns: Option<u64>,
    /// Where the attribution came from.
    pub method: KvEvidence,
    /// With KV events: the victim's blocks removed in the window.
    pub victim_blocks_removed: Option<u64>,
}

/// Counters of the KV-eviction detection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvEvictionStats {
    /// Requests with a conversation key seen.
    pub conversation_turns: u64,
    /// Conversations dropped because the table was full.
    pub conversations_dropped: u64,
    /// Conversations forgotten after `conversation_idle_ms`.
    pub conversations_expired: u64,
    /// Turns seen on another instance than the previous turn (no finding).
    pub conversations_moved: u64,
    /// Findings made.
    pub findings: u64,
    /// Findings attributed from KV events.
    pub findings_kv_events: u64,
    /// KV event batches received.
    pub kv_batches: u64,
    /// KV event batches missing, from gaps in the sequence numbers.
    pub kv_batches_missing: u64,
    /// KV event batches whose sequence number went backwards (publisher restart or replay).
    pub kv_sequence_resets: u64,
    /// Tenants beyond `max_tenants` (named `other`).
    pub tenants_overflowed: u64,
    /// Instances beyond `max_instances` (not tracked).
    pub instances_overflowed: u64,
}

/// How full the KV-eviction tables are (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvictionSizes {
    /// Conversations tracked.
    pub conversations: usize,
    /// Requests in the instances' logs.
    pub logged_requests: usize,
    /// Block hashes in the instances' KV event logs.
    pub logged_kv_blocks: usize,
    /// Findings waiting for their attribution.
    pub pending_findings: usize,
}

/// The instance key of a span's exporter: `service.instance.id`, else `pid:<process.pid>`, else
/// `svc:<service.name>@<host.name>`. A KV event endpoint names its instance with the same key.
/// The other names an instance answers to, for KV event sources configured by name: its
/// `service.instance.id`, `pid:<pid>`, and `svc:<service.name>@<host.name>` (what a KV source's
/// `instance` setting may say). When several instances share a service name the first keeps
/// the `svc:` alias; configure such KV sources by `service.instance.id` or pid.
pub fn instance_aliases(identity: &InstanceIdentity) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(id) = &identity.service_instance_id {
        out.push(id.to_string());
    }
    if let Some(pid) = identity.pid {
        out.push(format!("pid:{pid}"));
    }
    out.push(format!(
        "svc:{}@{}",
        identity.service_name.as_deref().unwrap_or(""),
        identity.host_name.as_deref().unwrap_or("")
    ));
    out
}

pub fn instance_key(identity: &InstanceIdentity) -> String {
    if let Some(id) = &identity.service_instance_id {
        return id.to_string();
    }
    if let Some(pid) = identity.pid {
        return format!("pid:{pid}");
    }
    format!(
        "svc:{}@{}",
        identity.service_name.as_deref().unwrap_or(""),
        identity.host_name.as_deref().unwrap_or("")
    )
}

/// SipHash-2-4 of `data` under the 128-bit key `(k0, k1)` (Aumasson & Bernstein), written out
/// because `std`'s hasher does not promise a stable output across Rust releases.
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;
    let round = |v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64| {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13) ^ *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16) ^ *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21) ^ *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17) ^ *v2;
        *v2 = v2.rotate_left(32);
    };
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let m = u64::from_le_bytes(word);
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    last[7] = data.len() as u8;
    let m = u64::from_le_bytes(last);
    v3 ^= m;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= m;
    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// The 64-bit key of a conversation: SipHash-2-4 of `tenant \0 conversation` under a fixed key.
/// Ids of different tenants never share a record; two conversations collide with probability
/// about n^2 / 2^65 (3e-8 at a million).
pub fn conversation_key(tenant: &str, conversation: &str) -> u64 {
    let mut bytes = Vec::with_capacity(tenant.len() + conversation.len() + 1);
    bytes.extend_from_slice(tenant.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(conversation.as_bytes());
    siphash24(0x696e_6665_7277_6174, 0x6368_2d63_6f6e_7673, &bytes)
}

/// The last turn of one conversation: 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationRecord {
    /// End of the last turn.
    pub end: UnixNanos,
    /// Its prompt tokens (saturated at `u32::MAX`).
    pub prompt_tokens: u32,
    /// Its output tokens (saturated).
    pub output_tokens: u32,
    /// Its tenant, interned.
    pub tenant: u32,
    /// Its runtime instance, interned.
    pub instance: u16,
}

/// Conversations by 64-bit key, bounded: the least recently updated is dropped first.
///
/// The eviction order is a queue of `(key, end)` written at every update; an entry is live when
/// the record still has that `end` (older entries are skipped, and the queue is compacted when
/// it holds more than twice the records).
#[derive(Debug)]
pub struct ConversationTable {
    map: HashMap<u64, ConversationRecord>,
    order: VecDeque<(u64, UnixNanos)>,
    cap: usize,
    dropped: u64,
    expired: u64,
}

impl ConversationTable {
    /// An empty table holding at most `cap` conversations.
    pub fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
            expired: 0,
        }
    }

    /// The record of `key`.
    pub fn get(&self, key: u64) -> Option<&ConversationRecord> {
        self.map.get(&key)
    }

    /// Conversations tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Conversations dropped because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Conversations forgotten by [`ConversationTable::expire`].
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Bytes held by the table's allocations now (capacity, not length).
    pub fn allocated_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket plus the entries; buckets = capacity * 8 / 7
        // rounded up to a power of two.
        let buckets = (self.map.capacity() * 8 / 7).next_power_of_two();
        buckets * (size_of::<(u64, ConversationRecord)>() + 1)
            + self.order.capacity() * size_of::<(u64, UnixNanos)>()
    }

    /// Inserts or replaces the record of `key`; drops the oldest when full.
    pub fn upsert(&mut self, key: u64, record: ConversationRecord) {
        if !self.map.contains_key(&key) {
            while self.map.len() >= self.cap {
                let Some((old, end)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|r| r.end == end) {
                    self.map.remove(&old);
                    self.dropped += 1;
                }
            }
        }
        self.map.insert(key, record);
        // Compacted before the push that would grow it past twice the records: the deque
        // doubles its allocation when full, and compacting after that push kept an allocation
        // of four times the records (8 MiB at the default cap) for one entry too many.
        if self.order.len() >= 2 * self.cap.max(16) {
            let map = &self.map;
            self.order
                .retain(|(k, end)| map.get(k).is_some_and(|r| r.end == *end));
        }
        self.order.push_back((key, record.end));
    }

    /// Forgets the conversations whose last turn ended before `before`, in update order (a
    /// record updated out of time order may linger until the ones before it go).
    pub fn expire(&mut self, before: UnixNanos) -> u64 {
        let mut n = 0;
        while let Some(&(key, end)) = self.order.front() {
            if end >= before {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|r| r.end == end) {
                self.map.remove(&key);
                n += 1;
            }
        }
        self.expired += n;
        n
    }
}

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

/// A request as the instance's log keeps it.
#[derive(Debug, Clone)]
struct LoggedRequest {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// Conversation key (0: none).
    conv: u64,
    tenant: u32,
    arrival: UnixNanos,
    prefill_start: UnixNanos,
    first_token: Option<UnixNanos>,
    end: UnixNanos,
    prompt: u64,
    cached: u64,
    output: u64,
}

impl LoggedRequest {
    fn uncached(&self) -> u64 {
        self.prompt.saturating_sub(self.cached)
    }

    /// KV tokens this request allocated in `[w0, w1)`.
    fn demand(&self, w0: UnixNanos, w1: UnixNanos) -> f64 {
        let mut d = 0.0;
        if self.prefill_start >= w0 && self.prefill_start < w1 {
            d += self.uncached() as f64;
        }
        let decode_start = self.first_token.unwrap_or(self.end);
        if self.output > 0 {
            let lo = decode_start.max(w0);
            let hi = self.end.min(w1);
            if self.end > decode_start {
                if hi > lo {
                    d += self.output as f64 * (hi - lo) as f64 / (self.end - decode_start) as f64;
                }
            } else if decode_start >= w0 && decode_start < w1 {
                d += self.output as f64;
            }
        }
        d
    }
}

#[derive(Debug, Clone)]
enum KvLogged {
    Stored {
        ts: UnixNanos,
        hashes: Vec<u64>,
    },
    Removed {
        ts: UnixNanos,
        hashes: Vec<u64>,
    },
    /// Everything cleared, or batches lost: block evidence is incomplete around `ts`.
    Broken {
        ts: UnixNanos,
    },
}

impl KvLogged {
    fn ts(&self) -> UnixNanos {
        match self {
            KvLogged::Stored { ts, .. }
            | KvLogged::Removed { ts, .. }
            | KvLogged::Broken { ts } => *ts,
        }
    }
    fn blocks(&self) -> usize {
        match self {
            KvLogged::Stored { hashes, .. } | KvLogged::Removed { hashes, .. } => hashes.len(),
            KvLogged::Broken { .. } => 0,
        }
    }
}

#[derive(Debug, Default)]
struct InstanceLog {
    requests: VecDeque<LoggedRequest>,
    kv: VecDeque<KvLogged>,
    kv_blocks: usize,
    /// Earliest KV event ever logged for this instance (evidence starts there).
    kv_since: Option<UnixNanos>,
    last_seq: Option<u64>,
    /// Recent prefill rate, tokens per second (EWMA).
    prefill_rate: Option<f64>,
}

/// A detected eviction waiting for its attribution.
#[derive(Debug, Clone)]
struct Pending {
    finding: KvEvictionFinding,
    instance: u16,
    conv: u64,
    victim_tenant: u32,
    victim_end: UnixNanos,
}

/// The KV-eviction state inside the correlator.
#[derive(Debug)]
pub(crate) struct KvTracker {
    config: KvEvictionConfig,
    conversations: ConversationTable,
    tenant_ids: HashMap<String, u32>,
    tenant_names: Vec<String>,
    instance_ids: HashMap<String, u16>,
    /// Instances created from a KV source's name that no span has claimed yet.
    kv_named: std::collections::HashSet<u16>,
    instance_names: Vec<String>,
    /// The last identity resolved to an instance: a node's spans come from one or a few
    /// runtimes, and resolving builds the identity's alias strings each time. Instance ids are
    /// never reassigned, so the cached answer stays right.
    last_instance: Option<(InstanceIdentity, u16, Arc<str>)>,
    logs: Vec<InstanceLog>,
    pending: BTreeMap<(UnixNanos, [u8; 16], [u8; 8]), Pending>,
    labels: TenantLabels,
    counts: BTreeMap<(String, String), u64>,
    hasher: crate::privacy::TenantHasher,
}

impl KvTracker {
    pub(crate) fn new(config: KvEvictionConfig) -> Self {
        // The same keyed hash as every other export of a tenant (crate::privacy).
        let hasher = crate::privacy::TenantHasher::new(&config.tenant_hash_key);
        Self {
            conversations: ConversationTable::new(config.max_conversations),
            labels: TenantLabels::new(config.metric_tenant_labels),
            tenant_ids: HashMap::new(),
            tenant_names: Vec::new(),
            instance_ids: HashMap::new(),
            kv_named: std::collections::HashSet::new(),
            instance_names: Vec::new(),
            last_instance: None,
            logs: Vec::new(),
            pending: BTreeMap::new(),
            counts: BTreeMap::new(),
            hasher,
            config,
        }
    }

    pub(crate) fn counts(&self) -> &BTreeMap<(String, String), u64> {
        &self.counts
    }

    pub(crate) fn sizes(&self) -> KvEvictionSizes {
        KvEvictionSizes {
            conversations: self.conversations.len(),
            logged_requests: self.logs.iter().map(|l| l.requests.len()).sum(),
            logged_kv_blocks: self.logs.iter().map(|l| l.kv_blocks).sum(),
            pending_findings: self.pending.len(),
        }
    }

    fn tenant_id(&mut self, tenant: &str, stats: &mut KvEvictionStats) -> u32 {
        if let Some(id) = self.tenant_ids.get(tenant) {
            return *id;
        }
        let name = if self.config.hash_tenants && tenant != UNKNOWN_TENANT {
            self.hasher.hash(tenant)
        } else {
            tenant.to_string()
        };
        if self.tenant_names.len() >= self.config.max_tenants.max(1) {
            stats.tenants_overflowed += 1;
            // All overflowed tenants share one id named `other`.
            return match self.tenant_ids.get(OTHER_TENANT) {
                Some(id) => *id,
                None => {
                    let id = self.tenant_names.len() as u32;
                    self.tenant_names.push(OTHER_TENANT.to_string());
                    self.tenant_ids.insert(OTHER_TENANT.to_string(), id);
                    id
                }
            };
        }
        let id = self.tenant_names.len() as u32;
        self.tenant_names.push(name);
        self.tenant_ids.insert(tenant.to_string(), id);
        id
    }

    fn tenant_name(&self, id: u32) -> String {
        self.tenant_names
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| UNKNOWN_TENANT.to_string())
    }

    fn instance_id(&mut self, key: &str, stats: &mut KvEvictionStats) -> Option<u16> {
        if let Some(id) = self.instance_ids.get(key) {
            return Some(*id);
        }
        let cap = self.config.max_instances.clamp(1, u16::MAX as usize);
        if self.instance_names.len() >= cap {
            stats.instances_overflowed += 1;
            return None;
        }
        let id = self.instance_names.len() as u16;
        self.instance_names.push(key.to_string());
        self.instance_ids.insert(key.to_string(), id);
        self.logs.push(InstanceLog::default());
        Some(id)
    }

    /// Takes one settled request span (with what the kernel saw of it, when joined).
    pub(crate) fn on_request(
        &mut self,
        req: &RuntimeRequest,
        conn: Option<&ConnectionFacts>,
        stats: &mut KvEvictionStats,
    ) {
        if !self.config.enabled {
            return;
        }
        let (id, key) = match &self.last_instance {
            Some((identity, id, key)) if *identity == req.instance => (*id, Arc::clone(key)),
            _ => {
                let key: Arc<str> = instance_key(&req.instance).into();
                let Some(id) = self.resolve_instance(&req.instance, &key, stats) else {
                    return;
                };
                self.last_instance = Some((req.instance.clone(), id, Arc::clone(&key)));
                (id, key)
            }
        };
        self.log_request(id, &key, req, conn, stats);
    }

    /// The instance of a span's exporter, created when new (`None` when the instance table is
    /// full).
    fn resolve_instance(
        &mut self,
        identity: &InstanceIdentity,
        key: &str,
        stats: &mut KvEvictionStats,
    ) -> Option<u16> {
        // An instance first named by a KV source (by one of its aliases) and then by spans is
        // one instance; an alias never merges two instances that spans told apart.
        let aliases = instance_aliases(identity);
        let known = self.instance_ids.get(key).copied().or_else(|| {
            let claimed = aliases.iter().find_map(|a| {
                self.instance_ids
                    .get(a.as_str())
                    .copied()
                    .filter(|id| self.kv_named.contains(id))
            });
            if let Some(id) = claimed {
                self.kv_named.remove(&id);
            }
            claimed
        });
        let instance = known.or_else(|| self.instance_id(key, stats))?;
        for alias in aliases {
            self.instance_ids.entry(alias).or_insert(instance);
        }
        Some(instance)
    }

    fn log_request(
        &mut self,
        instance: u16,
        key: &str,
        req: &RuntimeRequest,
        conn: Option<&ConnectionFacts>,
        stats: &mut KvEvictionStats,
    ) {
        let tenant_raw = req
            .tenant
            .as_deref()
            .or(conn.and_then(|c| c.tenant.as_deref()))
            .unwrap_or(UNKNOWN_TENANT);
        let conversation = req
            .conversation
            .as_deref()
            .or(conn.and_then(|c| c.conversation.as_deref()));
        let tenant = self.tenant_id(tenant_raw, stats);
        let conv = conversation
            .map(|c| conversation_key(tenant_raw, c))
            .unwrap_or(0);
        let prompt = req.prompt_tokens.unwrap_or(0);
        let cached = req.cached_tokens.unwrap_or(0).min(prompt);
        let output = req.output_tokens.unwrap_or(0);
        let prefill_start = req
            .arrival
            .saturating_add(req.queue_ns.unwrap_or(0))
            .min(req.end);
        let logged = LoggedRequest {
            trace_id: req.trace_id,
            span_id: req.span_id,
            conv,
            tenant,
            arrival: req.arrival,
            prefill_start,
            first_token: req.first_token,
            end: req.end,
            prompt,
            cached,
            output,
        };

        // The rate before this request: a victim's own slow prefill must not lower it.
        let rate = self.logs[instance as usize].prefill_rate;
        if let (Some(conversation), true) = (conversation, conv != 0) {
            stats.conversation_turns += 1;
            self.on_turn(req, &logged, conversation, instance, key, rate, stats);
        }
        let log = &mut self.logs[instance as usize];
        if let Some(first) = req.first_token {
            let uncached = logged.uncached();
            let prefill_ns = first.saturating_sub(prefill_start);
            // Short prompts are dominated by the decode step: they say little about the rate.
            if uncached >= 64 && prefill_ns > 0 {
                let sample = uncached as f64 * 1e9 / prefill_ns as f64;
                log.prefill_rate = Some(match log.prefill_rate {
                    Some(r) => 0.8 * r + 0.2 * sample,
                    None => sample,
                });
            }
        }
        // Trimmed before the push, so that the deque never holds one more than the cap (and
        // doubles its allocation for it).
        while log.requests.len() >= self.config.max_requests_per_instance.max(1) {
            log.requests.pop_front();
        }
        log.requests.push_back(logged);
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one call site, all borrowed from it"
    )]
    fn on_turn(
        &mut self,
        req: &RuntimeRequest,
        logged: &LoggedRequest,
        conversation: &str,
        instance: u16,
        instance_name: &str,
        rate: Option<f64>,
        stats: &mut KvEvictionStats,
    ) {
        let idle = self
            .config
            .conversation_idle_ms
            .saturating_mul(NANOS_PER_MILLI);
        let previous = self.conversations.get(logged.conv).copied();
        if let Some(prev) = previous {
            if req.arrival < prev.end {
                // An older turn settled late (or a concurrent request): keep the later turn.
                return;
            }
            let fresh = req.arrival.saturating_sub(prev.end) <= idle;
            if !fresh {
                stats.conversations_expired += 1;
            } else if prev.instance != instance {
                stats.conversations_moved += 1;
            } else {
                self.check_turn(
                    req,
                    logged,
                    conversation,
                    instance,
                    instance_name,
                    prev,
                    rate,
                    stats,
                );
            }
        }
        let before = self.conversations.dropped();
        self.conversations.upsert(
            logged.conv,
            ConversationRecord {
                end: req.end,
                prompt_tokens: u32::try_from(logged.prompt).unwrap_or(u32::MAX),
                output_tokens: u32::try_from(logged.output).unwrap_or(u32::MAX),
                tenant: logged.tenant,
                instance,
            },
        );
        stats.conversations_dropped += self.conversations.dropped() - before;
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one call site, all borrowed from it"
    )]
    fn check_turn(
        &mut self,
        req: &RuntimeRequest,
        logged: &LoggedRequest,
        conversation: &str,
        instance: u16,
        instance_name: &str,
        prev: ConversationRecord,
        rate: Option<f64>,
        stats: &mut KvEvictionStats,
    ) {
        let Some(cached) = req.cached_tokens else {
            // No cached-token count: without KV events there is nothing to compare.
            return;
        };
        let block = u64::from(self.config.block_size.max(1));
        let history = u64::from(prev.prompt_tokens) + u64::from(prev.output_tokens);
        let expected = history.min(logged.prompt) / block * block;
        if expected < self.config.min_prefix_tokens || cached.saturating_mul(2) >= expected {
            return;
        }
        let ttft = req.first_token.map(|f| f.saturating_sub(req.arrival));
        let penalty = match (ttft, rate) {
            (Some(ttft), Some(rate)) if rate > 0.0 => {
                let lost = expected.saturating_sub(cached) as f64;
                Some(((lost / rate * 1e9) as u64).min(ttft))
            }
            _ => None,
        };
        let finding = KvEvictionFinding {
            trace_id: req.trace_id,
            parent_span_id: req.span_id,
            victim_tenant: Some(self.tenant_name(logged.tenant)).filter(|t| t != UNKNOWN_TENANT),
            victim_conversation: conversation.to_string(),
            victim_request_id: req.request_id.clone(),
            instance: instance_name.to_string(),
            model: req.model.clone(),
            expected_cached_tokens: expected,
            cached_tokens: cached,
            window_start: prev.end,
            window_end: req.arrival,
            neighbour_tenant: None,
            neighbour_share: 0.0,
            top_tenants: Vec::new(),
            neighbour_links: Vec::new(),
            ttft_ns: ttft,
            ttft_penalty_ns: penalty,
            method: KvEvidence::Spans,
            victim_blocks_removed: None,
        };
        let due = req.end.saturating_add(
            self.config
                .attribution_delay_ms
                .saturating_mul(NANOS_PER_MILLI),
        );
        // Bounded by the request logs: at most one pending finding per logged request.
        let cap = self.config.max_requests_per_instance.max(1) * self.logs.len().max(1);
        if self.pending.len() >= cap {
            return;
        }
        self.pending.insert(
            (due, req.trace_id, req.span_id),
            Pending {
                finding,
                instance,
                conv: logged.conv,
                victim_tenant: logged.tenant,
                victim_end: req.end,
            },
        );
        let _ = stats;
    }

    /// Takes one batch of KV events.
    pub(crate) fn on_kv_events(&mut self, batch: &KvEventBatch, stats: &mut KvEvictionStats) {
        if !self.config.enabled {
            return;
        }
        stats.kv_batches += 1;
        let known = self.instance_ids.contains_key(batch.instance.as_str());
        let Some(instance) = self.instance_id(&batch.instance, stats) else {
            return;
        };
        if !known {
            // Named by the KV source before any span: a span may claim it by alias.
            self.kv_named.insert(instance);
        }
        let cap = self.config.max_kv_blocks_per_instance.max(1);
        let log = &mut self.logs[instance as usize];
        if let Some(seq) = batch.seq {
            match log.last_seq {
                Some(last) if seq > last.saturating_add(1) => {
                    stats.kv_batches_missing += seq - last - 1;
                    log.kv.push_back(KvLogged::Broken { ts: batch.ts });
                }
                Some(last) if seq <= last => {
                    stats.kv_sequence_resets += 1;
                    log.kv.push_back(KvLogged::Broken { ts: batch.ts });
                }
                _ => {}
            }
            log.last_seq = Some(seq);
        }
        log.kv_since = Some(log.kv_since.map_or(batch.ts, |s| s.min(batch.ts)));
        for event in &batch.events {
            let entry = match event {
                KvEvent::BlockStored { block_hashes, .. } => KvLogged::Stored {
                    ts: batch.ts,
                    hashes: block_hashes.clone(),
                },
                KvEvent::BlockRemoved { block_hashes, .. } => KvLogged::Removed {
                    ts: batch.ts,
                    hashes: block_hashes.clone(),
                },
                KvEvent::AllBlocksCleared => KvLogged::Broken { ts: batch.ts },
            };
            log.kv_blocks += entry.blocks();
            log.kv.push_back(entry);
        }
        while log.kv_blocks > cap {
            let Some(old) = log.kv.pop_front() else {
                break;
            };
            log.kv_blocks -= old.blocks();
            // Evidence before the first kept event is gone.
            log.kv_since = log.kv.front().map(KvLogged::ts);
        }
    }

    /// Expires state and emits the findings whose attribution is due at `now`.
    pub(crate) fn on_tick(
        &mut self,
        now: UnixNanos,
        stats: &mut KvEvictionStats,
        out: &mut Vec<KvEvictionFinding>,
    ) {
        if !self.config.enabled {
            return;
        }
        let idle = self
            .config
            .conversation_idle_ms
            .saturating_mul(NANOS_PER_MILLI);
        stats.conversations_expired += self.conversations.expire(now.saturating_sub(idle));
        let due: Vec<_> = self
            .pending
            .range(..=(now, [u8::MAX; 16], [u8::MAX; 8]))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(p) = self.pending.remove(&key) {
                let finding = self.attribute(p, stats);
                let victim = finding
                    .victim_tenant
                    .clone()
                    .unwrap_or_else(|| UNKNOWN_TENANT.to_string());
                let neighbour = finding
                    .neighbour_tenant
                    .clone()
                    .unwrap_or_else(|| UNKNOWN_TENANT.to_string());
                let labels = (self.labels.label(&victim), self.labels.label(&neighbour));
                *self.counts.entry(labels).or_default() += 1;
                stats.findings += 1;
                if finding.method == KvEvidence::KvEvents {
                    stats.findings_kv_events += 1;
                }
                out.push(finding);
            }
        }
        // Forget requests and KV events older than the horizon, except what a pending finding
        // still needs (its window starts at or after the oldest pending window start).
        let horizon = self
            .config
            .request_log_horizon_ms
            .saturating_mul(NANOS_PER_MILLI);
        let keep_from = self
            .pending
            .values()
            .map(|p| p.finding.window_start)
            .min()
            .unwrap_or(UnixNanos::MAX)
            .min(now.saturating_sub(horizon));
        for log in &mut self.logs {
            while log.requests.front().is_some_and(|r| r.end < keep_from) {
                log.requests.pop_front();
            }
            while log.kv.front().is_some_and(|e| e.ts() < keep_from) {
                if let Some(old) = log.kv.pop_front() {
                    log.kv_blocks -= old.blocks();
                    log.kv_since = log.kv.front().map(KvLogged::ts);
                }
            }
        }
    }

    fn attribute(&self, p: Pending, _stats: &mut KvEvictionStats) -> KvEvictionFinding {
        let mut f = p.finding;
        let Some(log) = self.logs.get(p.instance as usize) else {
            return f;
        };
        let (w0, w1) = (f.window_start, f.window_end);
        let mut demand: BTreeMap<u32, f64> = BTreeMap::new();
        let mut per_request: Vec<(f64, usize)> = Vec::new();
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
                    KvLogged::Stored { ts, hashes } if *ts >= w0 && *ts < w1 => {
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
                    KvLogged::Stored { ts, hashes }
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
            if id == p.victim_tenant {
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
    fn table_drops_the_oldest_and_counts() {
        let mut t = ConversationTable::new(3);
        let rec = |end| ConversationRecord {
            end,
            prompt_tokens: 1,
            output_tokens: 1,
            tenant: 0,
            instance: 0,
        };
        for k in 1..=3 {
            t.upsert(k, rec(k * 10));
        }
        t.upsert(1, rec(40));
        t.upsert(4, rec(50));
        assert_eq!(t.len(), 3);
        assert_eq!(t.dropped(), 1);
        assert!(t.get(2).is_none(), "2 was the least recently updated");
        assert!(t.get(1).is_some());
        assert_eq!(t.expire(45), 2);
        assert_eq!(t.len(), 1);
        assert!(t.get(4).is_some());
    }

    #[test]
    fn the_update_queue_stays_within_twice_the_records() {
        let cap = 64;
        let mut t = ConversationTable::new(cap);
        // Updates of the same few conversations leave stale queue entries behind; the queue is
        // compacted before it would grow its allocation past 2 * cap.
        for end in 0..10_000u64 {
            t.upsert(
                end % 8,
                ConversationRecord {
                    end,
                    prompt_tokens: 1,
                    output_tokens: 1,
                    tenant: 0,
                    instance: 0,
                },
            );
            assert!(t.order.len() <= 2 * cap);
        }
        assert!(t.order.capacity() <= 2 * cap, "{}", t.order.capacity());
        assert_eq!(t.len(), 8);
    }

    /// The default cap is 7/16 of a power of two, and a table at such a cap keeps its bucket
    /// count under churn (rehashed in place, never doubled); 2M upserts of new keys took a
    /// table capped at 2^17 to 2^19 buckets.
    #[test]
    fn a_full_table_under_churn_keeps_its_buckets() {
        let default = KvEvictionConfig::default().max_conversations;
        assert!((default * 16 / 7).is_power_of_two() && default * 16 % 7 == 0);
        let cap = 7 * 4096 / 16;
        let mut t = ConversationTable::new(cap);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for end in 0..50 * cap as u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let record = ConversationRecord {
                end,
                prompt_tokens: 1,
                output_tokens: 1,
                tenant: 0,
                instance: 0,
            };
            t.upsert(x, record);
            assert!(t.map.capacity() <= 4096 * 7 / 8, "{}", t.map.capacity());
        }
        assert_eq!(t.len(), cap);
    }

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
