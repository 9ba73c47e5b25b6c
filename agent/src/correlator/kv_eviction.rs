//! Cross-tenant KV-cache eviction (contract §3.3): per runtime instance, which conversation lost
//! its warm prefix between two turns, and whose burst evicted it.
//!
//! # Detection
//! For turn n+1 of a conversation on the same instance as turn n, the expected cached tokens are
//! `E = min(P_n + O_n, P_n+1)` rounded down to the block size. An eviction is found when
//! `E >= min_prefix_tokens` and the reported cached tokens `C_n+1 < E / 2`. A conversation seen
//! on another instance, or idle for longer than `conversation_idle_ms`, starts afresh.
//!
//! A turn whose span reports no cached tokens (vLLM 0.32) is decided at its attribution time
//! from the instance's KV events when it has them (`MissEvidence::KvEvents`: the turn stored
//! again blocks of the conversation's own hash chain, each removed since; `C` = `E` minus
//! the blocks stored again), else from its prefill time against the
//! instance's clean prefill rate (`MissEvidence::PrefillTime`, conservative: an overlapping
//! prefill, too few rate samples or a time between a hit's and a miss's decides nothing).
//! Ambiguities make no finding and are counted (`KvEvictionStats`).
//!
//! # Attribution
//! The decision waits `attribution_delay_ms` after the victim's span settled, so that the spans
//! of requests that overlapped the window `[end of turn n, arrival of turn n+1]` but ended later
//! are known. Then, per tenant:
//! - `spans`: KV demand = uncached prompt tokens of the requests whose prefill started in the
//!   window, plus their output tokens pro-rated by how much of their decode fell in the window
//!   (a refinement of "prompt + output": only allocations made in the window can evict);
//! - `kv_events` from the miss's own evidence: the batches that removed the victim's blocks
//!   carry the evictor's stores, attributed to the requests in prefill at their timestamp
//!   (exact with one, split by uncached prompt with several);
//! - `kv_events`, otherwise, when the instance published KV events covering the window without
//!   a sequence gap: blocks stored in the window, each `BlockStored` event attributed to the request active
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

/// How the victim's miss itself was established (`inferwatch.kv.evidence`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissEvidence {
    /// The span's cached-token count.
    #[default]
    Span,
    /// The conversation's own block hashes, stored again by the later turn after their removal.
    KvEvents,
    /// The later turn's prefill time against the instance's recent prefill rate.
    PrefillTime,
}

impl MissEvidence {
    /// The attribute value (`inferwatch.kv.evidence`).
    pub fn as_str(self) -> &'static str {
        match self {
            MissEvidence::Span => "span",
            MissEvidence::KvEvents => "kv_events",
            MissEvidence::PrefillTime => "prefill_time",
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
    /// How the miss was established.
    #[serde(default)]
    pub evidence: MissEvidence,
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
    /// Findings whose miss was established from the conversation's block hashes.
    pub findings_evidence_kv_events: u64,
    /// Findings whose miss was inferred from the prefill time.
    pub findings_evidence_prefill_time: u64,
    /// Block hashes dropped from an instance's KV log by `max_kv_blocks_per_instance`.
    pub kv_blocks_dropped: u64,
    /// `BlockStored` events in a conversation turn's prefill window that another request's
    /// prefill also covered and that no hash chain tied to either: not used as evidence.
    pub kv_ambiguous_stores: u64,
    /// Turns without a cached-token count whose KV evidence was incomplete (no chain of the
    /// conversation's blocks kept, a re-stored block with no removal seen, or a sequence gap
    /// or cache clear in between): no finding.
    pub kv_turns_undecided: u64,
    /// Evictor batches' stores that several requests' prefills covered (split between them by
    /// uncached prompt tokens).
    pub kv_shared_evictor_stores: u64,
    /// Turns without a cached-token count or KV events whose prefill time fell between a hit
    /// and a miss, overlapped another prefill, or came before the rate was known: no finding.
    pub prefill_time_undecided: u64,
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

/// The instance key of a span's exporter: `service.instance.id`, else `pid:<process.pid>`, else
/// `svc:<service.name>@<host.name>`. A KV event endpoint names its instance with the same key.
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
        parent: Option<u64>,
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

/// Clean prefills of a similar length needed before the prefill-time evidence is used.
const PREFILL_MIN_SAMPLES: usize = 3;
/// Clean prefills kept per instance.
const CLEAN_SAMPLES: usize = 64;

/// Whether `ts` falls in the request's prefill (from its start to its first token, plus the
/// store slack).
fn in_prefill(r: &LoggedRequest, ts: UnixNanos, slack: u64) -> bool {
    r.prefill_start <= ts && ts <= r.first_token.unwrap_or(r.end).saturating_add(slack)
}

/// A miss established from KV events or the prefill time.
#[derive(Debug)]
struct KvMiss {
    expected: u64,
    cached: u64,
    evidence: MissEvidence,
    /// The conversation's blocks stored again.
    blocks_lost: u64,
    /// Timestamps of the batches that removed them, sorted.
    evictor_batches: Vec<UnixNanos>,
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
    /// Recent prefills of requests that cannot have hit a conversation's prefix (a first turn,
    /// no conversation, or a known cached count): `(uncached tokens, prefill ns)`, at most
    /// `CLEAN_SAMPLES`. The reference of the prefill-time evidence, by prompt length (a CPU's or
    /// GPU's rate depends on it), which a hit's short prefill must not inflate.
    clean: VecDeque<(u64, u64)>,
    /// The runtime's block size, from its `BlockStored` events.
    kv_block_size: Option<u32>,
}

/// A detected eviction waiting for its attribution.
#[derive(Debug, Clone)]
struct Pending {
    finding: KvEvictionFinding,
    instance: u16,
    conv: u64,
    victim_tenant: u32,
    victim_end: UnixNanos,
    /// `None`: the span reported the cached tokens (the miss is established). Otherwise what
    /// deciding it from KV events or the prefill time needs, once the requests overlapping the
    /// turn have settled.
    undecided: Option<Undecided>,
}

/// A later turn without a cached-token count, waiting for its KV or prefill-time evidence.
#[derive(Debug, Clone, Copy)]
struct Undecided {
    /// `P_n + O_n`.
    history: u64,
    /// `P_n+1`.
    prompt: u64,
    prefill_start: UnixNanos,
    first_token: Option<UnixNanos>,
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
        // A request that cannot have hit a conversation's earlier turn: its prefill time is
        // that of its whole prompt (or of its known uncached part).
        let clean = req.cached_tokens.is_some()
            || conv == 0
            || self
                .conversations
                .get(conv)
                .is_none_or(|p| p.instance != instance);
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
                if clean {
                    if log.clean.len() >= CLEAN_SAMPLES {
                        log.clean.pop_front();
                    }
                    log.clean.push_back((uncached, prefill_ns));
                }
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
        let log = &self.logs[instance as usize];
        let block = u64::from(log.kv_block_size.unwrap_or(self.config.block_size).max(1));
        let history = u64::from(prev.prompt_tokens) + u64::from(prev.output_tokens);
        let expected = history.min(logged.prompt) / block * block;
        if expected < self.config.min_prefix_tokens {
            return;
        }
        // Without a cached-token count the miss is decided at the due time, from the KV events
        // or the prefill time, once the requests overlapping the turn have settled.
        let undecided = match req.cached_tokens {
            Some(cached) if cached.saturating_mul(2) >= expected => return,
            Some(_) => None,
            None => Some(Undecided {
                history,
                prompt: logged.prompt,
                prefill_start: logged.prefill_start,
                first_token: req.first_token,
            }),
        };
        let cached = req.cached_tokens.unwrap_or(0);
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
            evidence: MissEvidence::Span,
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
                undecided,
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
        let first_new = log.kv.len();
        for event in &batch.events {
            let entry = match event {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    block_size,
                    ..
                } => {
                    if *block_size > 0 {
                        log.kv_block_size = Some(*block_size);
                    }
                    KvLogged::Stored {
                        ts: batch.ts,
                        hashes: block_hashes.clone(),
                        parent: *parent_block_hash,
                    }
                }
                KvEvent::BlockRemoved { block_hashes, .. } => {
                    // vLLM 0.32 sends one event per removed block: consecutive removals of one
                    // batch share an entry, so that a tracked removed block costs its 8 bytes.
                    if log.kv.len() > first_new
                        && let Some(KvLogged::Removed { hashes, .. }) = log.kv.back_mut()
                    {
                        hashes.extend_from_slice(block_hashes);
                        log.kv_blocks += block_hashes.len();
                        continue;
                    }
                    KvLogged::Removed {
                        ts: batch.ts,
                        hashes: block_hashes.clone(),
                    }
                }
                KvEvent::AllBlocksCleared => KvLogged::Broken { ts: batch.ts },
            };
            log.kv_blocks += entry.blocks();
            log.kv.push_back(entry);
        }
        while log.kv_blocks > cap {
            let Some(old) = log.kv.pop_front() else {
                break;
            };
            stats.kv_blocks_dropped += old.blocks() as u64;
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
            if let Some(mut p) = self.pending.remove(&key) {
                let mut evictor = None;
                if let Some(u) = p.undecided {
                    let Some(miss) = self.decide(&p, u, stats) else {
                        continue;
                    };
                    p.finding.expected_cached_tokens = miss.expected;
                    p.finding.cached_tokens = miss.cached;
                    p.finding.evidence = miss.evidence;
                    p.finding.ttft_penalty_ns = self.penalty(&p, miss.expected, miss.cached);
                    if miss.evidence == MissEvidence::KvEvents {
                        p.finding.victim_blocks_removed = Some(miss.blocks_lost);
                        stats.findings_evidence_kv_events += 1;
                    } else {
                        stats.findings_evidence_prefill_time += 1;
                    }
                    evictor = Some(miss.evictor_batches);
                }
                let finding = self.attribute(p, evictor.as_deref(), stats);
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

    /// The TTFT penalty of `expected - cached` lost tokens at the instance's recent rate.
    fn penalty(&self, p: &Pending, expected: u64, cached: u64) -> Option<u64> {
        let rate = self.logs.get(p.instance as usize)?.prefill_rate?;
        let ttft = p.finding.ttft_ns?;
        if rate <= 0.0 {
            return None;
        }
        let lost = expected.saturating_sub(cached) as f64;
        Some(((lost / rate * 1e9) as u64).min(ttft))
    }

    /// Decides a turn without a cached-token count: from the instance's KV events when it has
    /// them, else from the prefill time. `None`: no miss, or not established (counted).
    fn decide(&self, p: &Pending, u: Undecided, stats: &mut KvEvictionStats) -> Option<KvMiss> {
        let log = self.logs.get(p.instance as usize)?;
        if log.kv_since.is_some() {
            return self.decide_kv(log, p, u, stats);
        }
        self.decide_prefill_time(log, p, u, stats)
    }

    fn decide_kv(
        &self,
        log: &InstanceLog,
        p: &Pending,
        u: Undecided,
        stats: &mut KvEvictionStats,
    ) -> Option<KvMiss> {
        let slack = self
            .config
            .kv_store_slack_ms
            .saturating_mul(NANOS_PER_MILLI);
        let block = u64::from(log.kv_block_size.unwrap_or(self.config.block_size).max(1));
        let expected = u.history.min(u.prompt) / block * block;
        if expected < self.config.min_prefix_tokens {
            return None;
        }
        let w0 = p.finding.window_start;
        // The conversation's earlier turns still in the request log.
        let earlier: Vec<&LoggedRequest> = log
            .requests
            .iter()
            .filter(|r| r.conv == p.conv && r.end <= w0)
            .collect();
        let Some(t0) = earlier.iter().map(|r| r.prefill_start).min() else {
            stats.kv_turns_undecided += 1;
            return None;
        };
        let t1 = u.first_token.unwrap_or(p.victim_end).max(p.victim_end) + slack;
        let broken = log
            .kv
            .iter()
            .any(|e| matches!(e, KvLogged::Broken { ts } if *ts >= t0 && *ts <= t1));
        // Events since before the end of turn n at least: a subscription that began later
        // missed stores of the chain, which makes the answer a hit (conservative), never a
        // false miss.
        if log.kv_since.is_none_or(|since| since > w0) || broken {
            stats.kv_turns_undecided += 1;
            return None;
        }
        let start = log.kv.partition_point(|e| e.ts() < t0);
        // The conversation's chain: what its earlier turns stored, in order. A store chained
        // onto the chain is the conversation's whatever else ran; an unchained one is its only
        // when no other request was in prefill then.
        let mut chain: Vec<u64> = Vec::new();
        let mut in_chain: HashSet<u64> = HashSet::new();
        let mut restored: Vec<u64> = Vec::new();
        let mut removed: HashMap<u64, UnixNanos> = HashMap::new();
        for entry in log.kv.range(start..) {
            match entry {
                KvLogged::Stored {
                    ts, hashes, parent, ..
                } if *ts < u.prefill_start => {
                    let chained = parent.is_some_and(|h| in_chain.contains(&h));
                    if !chained {
                        let covering = log.requests.iter().filter(|r| in_prefill(r, *ts, slack));
                        let (mut mine, mut others) = (0, 0);
                        for r in covering {
                            if r.conv == p.conv && r.end <= w0 {
                                mine += 1;
                            } else {
                                others += 1;
                            }
                        }
                        if mine == 0 {
                            continue;
                        }
                        if others > 0 {
                            stats.kv_ambiguous_stores += 1;
                            continue;
                        }
                    }
                    for h in hashes {
                        if in_chain.insert(*h) {
                            chain.push(*h);
                        }
                    }
                }
                KvLogged::Stored { ts, hashes, .. } if *ts <= t1 => {
                    restored.extend(hashes.iter().filter(|h| in_chain.contains(h)));
                }
                KvLogged::Removed { ts, hashes } if *ts <= t1 => {
                    for h in hashes.iter().filter(|h| in_chain.contains(h)) {
                        removed.insert(*h, *ts);
                    }
                }
                _ => {}
            }
            if entry.ts() > t1 {
                break;
            }
        }
        if chain.is_empty() {
            stats.kv_turns_undecided += 1;
            return None;
        }
        if restored.is_empty() {
            return None;
        }
        // Stored again only after its removal: a block re-stored with no removal seen is
        // evidence missing, not an eviction.
        let mut evictor_batches = Vec::new();
        for h in &restored {
            match removed.get(h) {
                Some(ts) => evictor_batches.push(*ts),
                None => {
                    stats.kv_turns_undecided += 1;
                    return None;
                }
            }
        }
        evictor_batches.sort_unstable();
        evictor_batches.dedup();
        // The blocks stored again are lost for certain; whether a runtime also recomputed (without
        // storing again) chain blocks after the first lost one depends on it: counting only the
        // ones stored again never overstates the loss.
        restored.sort_unstable();
        restored.dedup();
        let cached = expected.saturating_sub(restored.len() as u64 * block);
        if cached.saturating_mul(2) >= expected {
            return None;
        }
        Some(KvMiss {
            expected,
            cached,
            evidence: MissEvidence::KvEvents,
            blocks_lost: restored.len() as u64,
            evictor_batches,
        })
    }

    /// The prefill-time evidence: the turn's prefill, at the instance's clean rate, took as long
    /// as its whole prompt, not only the part past the expected prefix. Conservative: it needs
    /// a settled rate, no other prefill overlapping the turn's, and a clear margin both ways.
    fn decide_prefill_time(
        &self,
        log: &InstanceLog,
        p: &Pending,
        u: Undecided,
        stats: &mut KvEvictionStats,
    ) -> Option<KvMiss> {
        let block = u64::from(self.config.block_size.max(1));
        let expected = u.history.min(u.prompt) / block * block;
        if expected < self.config.min_prefix_tokens {
            return None;
        }
        // The rate for this prompt's length, from clean prefills of half to twice its length:
        // the slowest of them, so that a turn is called a miss only when even the slowest
        // prefill seen at this length could not have done it as a hit (timing noise and the
        // contention those prefills met count against the finding, never for it).
        let mut per_token: Vec<f64> = log
            .clean
            .iter()
            .filter(|(tokens, _)| *tokens * 2 >= u.prompt && *tokens <= u.prompt * 2)
            .map(|(tokens, ns)| *ns as f64 / *tokens as f64)
            .collect();
        per_token.sort_by(f64::total_cmp);
        let rate = per_token
            .last()
            .filter(|_| per_token.len() >= PREFILL_MIN_SAMPLES)
            .map(|ns| 1e9 / ns);
        let (Some(rate), Some(first)) = (rate, u.first_token) else {
            stats.prefill_time_undecided += 1;
            return None;
        };
        if !rate.is_finite() || rate <= 0.0 || first <= u.prefill_start {
            stats.prefill_time_undecided += 1;
            return None;
        }
        let overlapped = log.requests.iter().any(|r| {
            r.span_id != p.finding.parent_span_id
                && r.prefill_start < first
                && r.first_token.unwrap_or(r.end) > u.prefill_start
        });
        if overlapped {
            stats.prefill_time_undecided += 1;
            return None;
        }
        let observed_s = (first - u.prefill_start) as f64 / 1e9;
        let beyond_prefix = u.prompt.saturating_sub(expected) as f64;
        // Tokens the prefill had time for beyond the part past the prefix.
        let lost = observed_s * rate - beyond_prefix;
        let hit_s = beyond_prefix / rate;
        if lost >= 0.75 * expected as f64 && observed_s >= 2.0 * hit_s {
            let cached = expected.saturating_sub(lost.min(expected as f64) as u64);
            return Some(KvMiss {
                expected,
                cached,
                evidence: MissEvidence::PrefillTime,
                blocks_lost: 0,
                evictor_batches: Vec::new(),
            });
        }
        if lost > 0.25 * expected as f64 {
            stats.prefill_time_undecided += 1;
        }
        None
    }

    fn attribute(
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
    fn rank(
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

#[cfg(test)]
mod replay_vllm_0_32 {
    use super::*;
    use crate::sources::kvevents::decode_message;

    /// The batches a real vLLM 0.32 published (`tests/real-vllm/fixtures`).
    pub(super) fn recorded(instance: &str) -> Vec<KvEventBatch> {
        let text = include_str!("../../../tests/real-vllm/fixtures/kv_events_vllm_0.32.jsonl");
        text.lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
                let frames: Vec<Vec<u8>> = v["frames"]
                    .as_array()
                    .expect("frames")
                    .iter()
                    .map(|f| hex::decode(f.as_str().expect("hex")).expect("hex frame"))
                    .collect();
                let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                decode_message(&refs, instance).expect("decodes")
            })
            .collect()
    }

    const MS: u64 = 1_000_000;

    fn request(
        trace: u8,
        tenant: &str,
        conversation: Option<&str>,
        prefill: (UnixNanos, UnixNanos),
        end: UnixNanos,
        prompt: u64,
    ) -> RuntimeRequest {
        RuntimeRequest {
            runtime: crate::model::RuntimeKind::Vllm,
            trace_id: [trace; 16],
            span_id: [trace; 8],
            parent_span_id: None,
            request_id: None,
            model: Some("m".into()),
            tenant: Some(tenant.into()),
            conversation: conversation.map(Into::into),
            client: None,
            // vLLM 0.32: a random service.instance.id; the API server's pid ties the KV
            // endpoint (named `pid:<pid>` by discovery) to the spans.
            instance: InstanceIdentity {
                service_name: Some("vllm".into()),
                service_instance_id: Some("5f0c2a9e-random".into()),
                pid: Some(4242),
                host_name: None,
            },
            arrival: prefill.0,
            queue_ns: Some(0),
            first_token: Some(prefill.1),
            end,
            prompt_tokens: Some(prompt),
            cached_tokens: None,
            output_tokens: Some(16),
            finish_reason: Some("stop".into()),
            token_times: Vec::new(),
        }
    }

    fn stored(b: &KvEventBatch) -> Vec<u64> {
        b.events
            .iter()
            .flat_map(|e| match e {
                KvEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn removed(b: &KvEventBatch) -> Vec<u64> {
        b.events
            .iter()
            .flat_map(|e| match e {
                KvEvent::BlockRemoved { block_hashes, .. } => block_hashes.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Twist {
        None,
        /// An `AllBlocksCleared` between the victim's turns.
        Cleared,
        /// The batch with the sequence number 7 lost.
        Gap,
        /// A noisy request in prefill when the victim's first turn stored its blocks.
        ConcurrentFirstTurn,
    }

    struct Replay {
        findings: Vec<KvEvictionFinding>,
        stats: KvEvictionStats,
        /// The victim's blocks that the noisy prompts' batches removed, in chain order.
        victim_lost: usize,
        /// The noisy requests whose batches removed the victim's blocks.
        evictor_traces: Vec<u8>,
        /// When the victim's second turn settled, and when the finding came.
        victim_end: UnixNanos,
        finding_at: Option<UnixNanos>,
    }

    /// Replays the recorded stream: batch 0 is the victim's first turn (conversation `c1`),
    /// batches 1-9 the noisy tenant's 1000-token prompts (5-9 evict), then the victim's second
    /// turn, which stores again, from the recorded hashes, what it lost (vLLM recomputes from the
    /// first missing block on), then batches 10-11: conversation `c2`, whose second turn chains
    /// onto its first (a hit).
    fn replay(batches: Vec<KvEventBatch>, twist: Twist) -> Replay {
        let config = KvEvictionConfig {
            min_prefix_tokens: 64,
            ..KvEvictionConfig::default()
        };
        let delay = config.attribution_delay_ms * MS;
        let mut t = KvTracker::new(config);
        let mut stats = KvEvictionStats::default();
        let mut out = Vec::new();
        let b = &batches;
        let chain0 = stored(&b[0]);
        let lost_from_noisy: HashSet<u64> = b[1..10].iter().flat_map(removed).collect();
        let first_lost = chain0.iter().position(|h| lost_from_noisy.contains(h));
        let victim_lost = first_lost.map_or(0, |i| chain0.len() - i);
        let evictor_traces: Vec<u8> = (1..10u8)
            .filter(|i| removed(&b[*i as usize]).iter().any(|h| chain0.contains(h)))
            .collect();
        let mut finding_at = None;
        let mut tick = |t: &mut KvTracker, now, stats: &mut KvEvictionStats, out: &mut Vec<_>| {
            let before = out.len();
            t.on_tick(now, stats, out);
            if out.len() > before && finding_at.is_none() {
                finding_at = Some(now);
            }
        };
        // Turn 1 of c1: its prefill ends with batch 0.
        let t0 = b[0].ts;
        if twist == Twist::ConcurrentFirstTurn {
            t.on_request(
                &request(
                    200,
                    "noisy",
                    None,
                    (t0 - 250 * MS, t0 + 5 * MS),
                    t0 + 30 * MS,
                    900,
                ),
                None,
                &mut stats,
            );
        }
        t.on_kv_events(&b[0], &mut stats);
        t.on_request(
            &request(
                100,
                "victim",
                Some("c1"),
                (t0 - 300 * MS, t0 + 5 * MS),
                t0 + 200 * MS,
                704,
            ),
            None,
            &mut stats,
        );
        for (i, batch) in b.iter().enumerate().take(10).skip(1) {
            if twist == Twist::Gap && i == 7 {
                continue;
            }
            let ts = batch.ts;
            t.on_kv_events(batch, &mut stats);
            t.on_request(
                &request(
                    i as u8,
                    "noisy",
                    None,
                    (ts - 300 * MS, ts + 5 * MS),
                    ts + 40 * MS,
                    1000,
                ),
                None,
                &mut stats,
            );
            tick(&mut t, ts + 40 * MS, &mut stats, &mut out);
        }
        let a = b[9].ts + 1_000 * MS;
        if twist == Twist::Cleared {
            let mut clear = b[9].clone();
            clear.ts = a - 100 * MS;
            clear.seq = None;
            clear.events = vec![KvEvent::AllBlocksCleared];
            t.on_kv_events(&clear, &mut stats);
        }
        // Turn 2 of c1: stores again what it lost, then its new blocks.
        let mut again = b[0].clone();
        again.ts = a + 250 * MS;
        again.seq = Some(10);
        let keep = chain0.len() - victim_lost;
        again.events = vec![KvEvent::BlockStored {
            block_hashes: chain0[keep..].iter().copied().chain([7, 8, 9]).collect(),
            parent_block_hash: keep.checked_sub(1).map(|i| chain0[i]),
            num_tokens: (victim_lost as u32 + 3) * 32,
            block_size: 32,
            lora_id: None,
            medium: Some("GPU".into()),
        }];
        t.on_kv_events(&again, &mut stats);
        let victim_end = a + 400 * MS;
        t.on_request(
            &request(
                101,
                "victim",
                Some("c1"),
                (a, a + 260 * MS),
                victim_end,
                1100,
            ),
            None,
            &mut stats,
        );
        let mut now = victim_end;
        while now + 100 * MS < b[10].ts - 100 * MS {
            now += 100 * MS;
            tick(&mut t, now, &mut stats, &mut out);
        }
        // c2: two turns, the second a hit (chained onto the first's last block).
        let shift = |mut x: KvEventBatch, seq| {
            x.seq = Some(seq);
            x
        };
        for (k, i) in [(0u8, 10usize), (1, 11)] {
            let ts = b[i].ts;
            t.on_kv_events(&shift(b[i].clone(), 11 + u64::from(k)), &mut stats);
            t.on_request(
                &request(
                    150 + k,
                    "victim",
                    Some("c2"),
                    (ts - 50 * MS, ts + 2 * MS),
                    ts + 20 * MS,
                    96 * (u64::from(k) + 1),
                ),
                None,
                &mut stats,
            );
            tick(&mut t, ts + 20 * MS, &mut stats, &mut out);
        }
        while now < b[11].ts + 2 * delay {
            now += 100 * MS;
            tick(&mut t, now, &mut stats, &mut out);
        }
        Replay {
            findings: out,
            stats,
            victim_lost,
            evictor_traces,
            victim_end,
            finding_at,
        }
    }

    #[test]
    fn the_victims_restored_blocks_make_one_finding_naming_the_evictor() {
        let r = replay(recorded("pid:4242"), Twist::None);
        assert!(
            r.victim_lost >= 16,
            "the noisy prompts evicted {}",
            r.victim_lost
        );
        assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
        let f = &r.findings[0];
        assert_eq!(f.evidence, MissEvidence::KvEvents);
        assert_eq!(f.method, KvEvidence::KvEvents);
        assert_eq!(f.victim_conversation, "c1");
        assert_eq!(f.trace_id, [101; 16]);
        // Block size 32 from the events: E = 704 (22 blocks), C = the blocks kept.
        assert_eq!(f.expected_cached_tokens, 704);
        assert_eq!(f.cached_tokens, (22 - r.victim_lost as u64) * 32);
        assert_eq!(f.victim_blocks_removed, Some(r.victim_lost as u64));
        assert_eq!(f.neighbour_tenant.as_deref(), Some("noisy"));
        assert_eq!(f.neighbour_share, 1.0);
        assert_eq!(f.top_tenants.len(), 1);
        // Links: exactly the noisy requests whose batches removed the victim's blocks.
        let mut linked: Vec<u8> = f.neighbour_links.iter().map(|l| l.trace_id[0]).collect();
        linked.sort_unstable();
        assert_eq!(linked, r.evictor_traces);
        assert!(f.ttft_penalty_ns.is_some_and(|p| p > 0));
        assert_eq!(r.stats.findings_evidence_kv_events, 1);
        assert_eq!(r.stats.kv_ambiguous_stores, 0);
        assert_eq!(r.stats.kv_turns_undecided, 0);
        // The finding comes the attribution delay after the victim's turn settled.
        let delay = r.finding_at.map(|at| at - r.victim_end);
        assert!(
            delay.is_some_and(|d| (5_000 * MS..=5_100 * MS).contains(&d)),
            "{delay:?}"
        );
    }

    /// The older array encoding of the same events replays to the same finding.
    #[test]
    fn the_array_encoding_replays_the_same() {
        use rmpv::Value;
        let maps = recorded("pid:4242");
        let arrays: Vec<KvEventBatch> = maps
            .iter()
            .map(|b| {
                let events = b
                    .events
                    .iter()
                    .map(|e| match e {
                        KvEvent::BlockStored {
                            block_hashes,
                            parent_block_hash,
                            num_tokens,
                            block_size,
                            ..
                        } => Value::Array(vec![
                            "BlockStored".into(),
                            Value::Array(block_hashes.iter().map(|h| Value::from(*h)).collect()),
                            parent_block_hash.map_or(Value::Nil, Value::from),
                            Value::Array((0..*num_tokens).map(Value::from).collect()),
                            Value::from(*block_size),
                            Value::Nil,
                            "GPU".into(),
                        ]),
                        KvEvent::BlockRemoved { block_hashes, .. } => Value::Array(vec![
                            "BlockRemoved".into(),
                            Value::Array(block_hashes.iter().map(|h| Value::from(*h)).collect()),
                            "GPU".into(),
                        ]),
                        KvEvent::AllBlocksCleared => Value::Array(vec!["AllBlocksCleared".into()]),
                    })
                    .collect();
                let payload = Value::Array(vec![
                    Value::F64(b.ts as f64 / 1e9),
                    Value::Array(events),
                    Value::from(0),
                ]);
                let mut bytes = Vec::new();
                rmpv::encode::write_value(&mut bytes, &payload).expect("encode");
                let seq = b.seq.unwrap_or(0).to_be_bytes();
                let mut back =
                    decode_message(&[b"", &seq, &bytes], "pid:4242").expect("array form decodes");
                // Float seconds round the timestamp to about a microsecond.
                assert!(back.ts.abs_diff(b.ts) < 1_000, "{} {}", back.ts, b.ts);
                back.ts = b.ts;
                back
            })
            .collect();
        for (a, m) in arrays.iter().zip(&maps) {
            assert_eq!(a.events.len(), m.events.len());
            assert_eq!(stored(a), stored(m));
            assert_eq!(removed(a), removed(m));
        }
        let (x, y) = (replay(maps, Twist::None), replay(arrays, Twist::None));
        assert_eq!(x.findings, y.findings);
        assert_eq!(x.findings.len(), 1);
    }

    #[test]
    fn a_cleared_cache_or_a_sequence_gap_makes_no_finding_and_is_counted() {
        for twist in [Twist::Cleared, Twist::Gap] {
            let r = replay(recorded("pid:4242"), twist);
            assert!(r.findings.is_empty(), "{twist:?}: {:?}", r.findings);
            assert_eq!(r.stats.kv_turns_undecided, 1, "{twist:?}");
        }
    }

    #[test]
    fn a_first_turn_stored_while_another_prefilled_is_ambiguous() {
        let r = replay(recorded("pid:4242"), Twist::ConcurrentFirstTurn);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(r.stats.kv_ambiguous_stores, 1);
        assert_eq!(r.stats.kv_turns_undecided, 1);
    }

    #[test]
    fn a_chained_second_turn_is_a_hit() {
        // c2's turn 2 (batch 11) stores only blocks chained onto turn 1's last: no finding for
        // c2 in any replay above; here without c1's eviction in the way.
        let r = replay(recorded("pid:4242"), Twist::None);
        assert!(r.findings.iter().all(|f| f.victim_conversation != "c2"));
    }

    /// A turn without cached tokens or KV events, decided by its prefill time: 6 first turns
    /// of 1000 tokens at 10k tokens/s set the rate; then turn 2 of each takes `prefill_ms`.
    fn prefill_run(
        turn2_prefill_ms: &[u64],
        overlap: bool,
    ) -> (Vec<KvEvictionFinding>, KvEvictionStats) {
        let mut t = KvTracker::new(KvEvictionConfig::default());
        let mut stats = KvEvictionStats::default();
        let mut out = Vec::new();
        let base = 1_800_000_000_000 * MS;
        let mut now = base;
        let convs: Vec<String> = (0..turn2_prefill_ms.len().max(6))
            .map(|i| format!("c{i}"))
            .collect();
        for (i, c) in convs.iter().enumerate() {
            t.on_request(
                &request(
                    i as u8,
                    "victim",
                    Some(c),
                    (now, now + 100 * MS),
                    now + 150 * MS,
                    1000,
                ),
                None,
                &mut stats,
            );
            now += 200 * MS;
        }
        for (i, ms) in turn2_prefill_ms.iter().enumerate() {
            if overlap {
                t.on_request(
                    &request(
                        200,
                        "noisy",
                        None,
                        (now, now + 100 * MS),
                        now + 110 * MS,
                        1000,
                    ),
                    None,
                    &mut stats,
                );
            }
            t.on_request(
                &request(
                    100 + i as u8,
                    "victim",
                    Some(&convs[i]),
                    (now, now + ms * MS),
                    now + (ms + 50) * MS,
                    1100,
                ),
                None,
                &mut stats,
            );
            now += 300 * MS;
        }
        t.on_tick(now + 10_000 * MS, &mut stats, &mut out);
        (out, stats)
    }

    #[test]
    fn a_prefill_as_long_as_the_whole_prompt_is_a_miss_and_a_short_one_is_not() {
        // E = min(1000 + 16, 1100) rounded to 16 = 1008; a hit prefills 92 tokens (~9 ms),
        // a miss 1100 (~110 ms).
        let (out, stats) = prefill_run(&[110, 12, 9, 60, 105], false);
        let missed: Vec<u8> = out.iter().map(|f| f.trace_id[0]).collect();
        assert_eq!(missed, vec![100, 104], "{out:?}");
        assert!(out.iter().all(|f| f.evidence == MissEvidence::PrefillTime));
        assert_eq!(out[0].expected_cached_tokens, 1008);
        assert!(out[0].cached_tokens < 504, "{}", out[0].cached_tokens);
        assert_eq!(stats.findings_evidence_prefill_time, 2);
        // 60 ms: between a hit and a miss.
        assert_eq!(stats.prefill_time_undecided, 1);
    }

    #[test]
    fn a_prefill_overlapping_another_or_before_the_rate_settles_is_undecided() {
        let (out, stats) = prefill_run(&[110, 110], true);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(stats.prefill_time_undecided, 2);
    }

    /// What one tracked block costs in an instance's KV log: 8 bytes in its entry's hash list,
    /// plus its entry's share. vLLM 0.32 stores a prompt's blocks in one event (31 blocks) and
    /// removes them one event each, merged per batch (29-31 blocks).
    #[test]
    fn a_tracked_block_costs_about_ten_bytes() {
        let entry = size_of::<KvLogged>();
        assert!(entry <= 48, "{entry}");
        let mut t = KvTracker::new(KvEvictionConfig::default());
        let mut stats = KvEvictionStats::default();
        for b in recorded("pid:1") {
            t.on_kv_events(&b, &mut stats);
        }
        let log = &t.logs[0];
        let blocks = log.kv_blocks;
        let bytes = log.kv.len() * entry
            + log
                .kv
                .iter()
                .map(|e| match e {
                    KvLogged::Stored { hashes, .. } | KvLogged::Removed { hashes, .. } => {
                        hashes.capacity() * 8
                    }
                    KvLogged::Broken { .. } => 0,
                })
                .sum::<usize>();
        // 12 batches: 12 stores and 7 merged removals.
        assert_eq!(log.kv.len(), 19);
        let per_block = bytes as f64 / blocks as f64;
        assert!(
            per_block < 12.0,
            "{per_block} bytes per block ({bytes} / {blocks})"
        );
    }
}
