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

mod attribution;
pub(super) mod config;
mod conversations;
mod detection;
pub(super) mod finding;
mod log;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::correlator::join::ConnectionFacts;
use crate::labels::BoundedLabel;
use crate::model::{InstanceIdentity, KvEvent, KvEventBatch, RuntimeRequest, UnixNanos};
pub use config::KvEvictionConfig;
pub use conversations::{ConversationRecord, ConversationTable, conversation_key};
pub use finding::{
    KvEvictionFinding, KvEvictionSizes, KvEvictionStats, KvEvidence, MissEvidence, SpanLink,
    TenantShare,
};
use log::{CLEAN_SAMPLES, InstanceLog, KvLogged, LoggedRequest};

const NANOS_PER_MILLI: u64 = 1_000_000;

/// The tenant name reported when the victim's own tenant is the noisy neighbour.
pub const SELF_TENANT: &str = "self";
/// The metric label for tenants outside the top K.
pub const OTHER_TENANT: &str = crate::labels::OTHER;
/// The tenant name used when a request carries none.
pub const UNKNOWN_TENANT: &str = crate::labels::UNKNOWN;

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
    /// The turn's end and output tokens: its decode, a probe of the instance's speed then.
    end: UnixNanos,
    output: u64,
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
    /// `victim_tenant` / `neighbour_tenant` label values, bounded.
    labels: BoundedLabel,
    counts: BTreeMap<(String, String), u64>,
    hasher: crate::privacy::TenantHasher,
}

impl KvTracker {
    pub(crate) fn new(config: KvEvictionConfig) -> Self {
        // The same keyed hash as every other export of a tenant (crate::privacy).
        let hasher = crate::privacy::TenantHasher::new(&config.tenant_hash_key);
        Self {
            conversations: ConversationTable::new(config.max_conversations),
            labels: BoundedLabel::sticky_top(config.metric_tenant_labels)
                .passing(&[SELF_TENANT, OTHER_TENANT]),
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
            .or(conn.and_then(|c| c.head.tenant.as_deref()))
            .unwrap_or(UNKNOWN_TENANT);
        let conversation = req
            .conversation
            .as_deref()
            .or(conn.and_then(|c| c.head.conversation.as_deref()));
        let tenant = self.tenant_id(tenant_raw, stats);
        let conv = conversation
            .map(|c| conversation_key(tenant_raw, c))
            .unwrap_or(0);
        let prompt = req.prompt_tokens.unwrap_or(0);
        let cached = req.cached_tokens.unwrap_or(0).min(prompt);
        let output = req.output_tokens.unwrap_or(0);
        // The runtime's own prefill time when it reports one; else from the arrival and the
        // queue, which also counts the tokenizer and the hops to and from the engine: under CPU
        // load those grow, and a prefill-time miss is decided on the difference.
        let prefill_start = match (req.prefill_ns, req.first_token) {
            (Some(prefill), Some(first)) => first.saturating_sub(prefill).max(req.arrival),
            _ => req.arrival.saturating_add(req.queue_ns.unwrap_or(0)),
        }
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
                end: logged.end,
                output: logged.output,
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
}

#[cfg(test)]
mod replay_tests;
