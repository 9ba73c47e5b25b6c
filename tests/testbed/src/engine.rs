//! Continuous-batching scheduler over the paged KV cache: a waiting queue, at most
//! `max_running` sequences, a per-step token budget; prefill time proportional to uncached
//! prompt tokens; decode step time growing with the batch and slowed in contention intervals.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::config::RuntimeConfig;
use crate::kv::{self, Allocation, BLOCK_SIZE, KvCache, Owner};
use crate::kvevents::{KvCacheEvent, KvEventPublisher};
use crate::tokens;
use crate::truth::{
    ColdStartTruth, ContentionTruth, EvictionTruth, JsonlWriter, TruthRecord, now_ns,
};

/// What the runtime does when the client disconnects mid-request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Abort at the next step boundary once the disconnect is seen (vLLM).
    Immediate,
    /// Abort this long after the disconnect is seen (SGLang-like lag).
    Delayed(Duration),
    /// Keep generating to `max_tokens`.
    Never,
}

/// Bad policy string.
#[derive(Debug, thiserror::Error)]
#[error("unknown disconnect policy {0:?} (immediate | delayed:<ms> | never)")]
pub struct PolicyError(String);

impl Policy {
    /// Parse `immediate`, `delayed:<ms>`, `never`.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        match s {
            "immediate" => Ok(Self::Immediate),
            "never" => Ok(Self::Never),
            _ => s
                .strip_prefix("delayed:")
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| Self::Delayed(Duration::from_millis(ms)))
                .ok_or_else(|| PolicyError(s.to_string())),
        }
    }

    /// When a disconnect seen at `seen_ns` takes effect (None: never).
    pub fn deadline(&self, seen_ns: u64) -> Option<u64> {
        match self {
            Self::Immediate => Some(seen_ns),
            Self::Delayed(d) => Some(seen_ns + d.as_nanos() as u64),
            Self::Never => None,
        }
    }

    /// The canonical string.
    pub fn as_string(&self) -> String {
        match self {
            Self::Immediate => "immediate".into(),
            Self::Delayed(d) => format!("delayed:{}", d.as_millis()),
            Self::Never => "never".into(),
        }
    }
}

/// Engine timing and sizing, with times already scaled.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Max running sequences.
    pub max_running: usize,
    /// Tokens per step.
    pub token_budget: usize,
    /// KV blocks.
    pub kv_blocks: usize,
    /// Per-tenant hash salt.
    pub tenant_salt: bool,
    /// Prefill ns per uncached token.
    pub prefill_ns_per_token: f64,
    /// Decode step ns with one sequence.
    pub decode_ns: f64,
    /// Growth per extra sequence (fraction).
    pub decode_batch_growth: f64,
    /// Disconnect policy.
    pub policy: Policy,
    /// Max waiting requests (beyond: 503).
    pub max_waiting: usize,
}

impl EngineConfig {
    /// From the scenario's runtime section; `scale` multiplies all durations.
    pub fn from_runtime(r: &RuntimeConfig, scale: f64) -> Result<Self, PolicyError> {
        let policy = match Policy::parse(&r.disconnect_policy)? {
            Policy::Delayed(d) => Policy::Delayed(d.mul_f64(scale.max(0.0))),
            p => p,
        };
        Ok(Self {
            max_running: r.max_running.max(1),
            token_budget: r.token_budget.max(1),
            kv_blocks: r.kv_blocks.max(2),
            tenant_salt: r.tenant_salt,
            prefill_ns_per_token: r.prefill_us_per_token * 1e3 * scale,
            decode_ns: r.decode_ms * 1e6 * scale,
            decode_batch_growth: r.decode_batch_growth,
            policy,
            max_waiting: 4096,
        })
    }
}

/// A request submitted to the engine.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    /// Request id (X-Request-Id).
    pub request_id: String,
    /// Tenant.
    pub tenant: String,
    /// Conversation.
    pub conversation: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Max output tokens (>= 1).
    pub max_tokens: u32,
    /// Arrival, unix ns.
    pub arrival_ns: u64,
}

/// Messages from the engine to a request's handler.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// One output token, with its text and production time.
    Token {
        /// 0-based index.
        index: u32,
        /// Text (one word).
        text: String,
        /// When produced, unix ns.
        time_ns: u64,
    },
    /// The engine stopped working on the sequence.
    Done(SeqSummary),
}

/// Engine-side facts about a finished sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqSummary {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Output tokens generated.
    pub output_tokens: u64,
    /// `length` or `abort`.
    pub finish_reason: String,
    /// First admitted.
    pub scheduled_ns: Option<u64>,
    /// First token.
    pub first_token_ns: Option<u64>,
    /// Last token.
    pub last_token_ns: Option<u64>,
    /// Stop.
    pub stop_ns: u64,
    /// Sum of the durations of steps it took part in (model execute time), ns.
    pub execute_ns: u64,
    /// Hashes stored in the prefix cache at the end.
    pub stored_blocks: Vec<u64>,
    /// Hashes hit at admission.
    pub hit_blocks: Vec<u64>,
    /// Arrived before the process served its first token.
    pub cold: bool,
}

/// Rejection at submit.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Prompt + max_tokens can never fit the KV cache.
    #[error("prompt ({prompt}) + max_tokens ({max}) exceeds the KV cache ({cap} tokens)")]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Max tokens.
        max: u32,
        /// Capacity in tokens.
        cap: usize,
    },
    /// Waiting queue full.
    #[error("waiting queue full")]
    QueueFull,
}

struct Seq {
    id: u64,
    req: SeqRequest,
    hashes: Vec<u64>,
    salt: u64,
    out_seed: u64,
    output: Vec<u32>,
    alloc: Option<Allocation>,
    tx: mpsc::Sender<SeqEvent>,
    sum: SeqSummary,
    abort_at: Option<u64>,
    prefilled: bool,
}

struct State {
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    kv: KvCache,
    next_id: u64,
    first_token_ns: Option<u64>,
    cold: Option<ColdStartTruth>,
    contention: Vec<(u64, u64, f64)>,
    kv_events: Option<KvEventPublisher>,
}

/// The engine: shared by handlers, driven by [`Engine::run`].
pub struct Engine {
    cfg: EngineConfig,
    state: Mutex<State>,
    notify: Notify,
    truth: Arc<JsonlWriter>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

/// Handle of a submitted sequence.
#[derive(Debug)]
pub struct Submitted {
    /// Engine-internal id (for [`Engine::client_gone`]).
    pub id: u64,
    /// Tokens and the final summary.
    pub rx: mpsc::Receiver<SeqEvent>,
    /// Whether it arrived while the process was still cold.
    pub cold: bool,
}

impl Engine {
    /// A new engine writing truth to `truth`.
    pub fn new(cfg: EngineConfig, truth: Arc<JsonlWriter>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: Vec::new(),
                kv: KvCache::new(cfg.kv_blocks),
                next_id: 1,
                first_token_ns: None,
                cold: None,
                contention: Vec::new(),
                kv_events: None,
            }),
            cfg,
            notify: Notify::new(),
            truth,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.cfg.policy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for a simulator.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Record the start-up phases; completed and written at the first token.
    pub fn set_cold_start(&self, cs: ColdStartTruth) {
        self.lock().cold = Some(cs);
    }

    /// Publish KV events (BlockStored at prefill for the prompt's new full blocks and at the
    /// end for the output's, BlockRemoved at eviction) through `publisher`.
    pub fn set_kv_events(&self, publisher: KvEventPublisher) {
        self.lock().kv_events = Some(publisher);
    }

    /// Install contention intervals (absolute unix ns) and write their truth records.
    pub fn set_contention(&self, intervals: Vec<ContentionTruth>) {
        self.schedule_contention(&intervals);
        for c in intervals {
            self.truth.write(&TruthRecord::Contention(c));
        }
    }

    /// Install contention intervals without writing their truth (the caller writes it once it
    /// knows the neighbour process that plays each).
    pub fn schedule_contention(&self, intervals: &[ContentionTruth]) {
        let mut st = self.lock();
        for c in intervals {
            st.contention.push((c.start_ns, c.end_ns, c.factor));
        }
    }

    /// Queue a request.
    pub fn submit(&self, req: SeqRequest) -> Result<Submitted, SubmitError> {
        let cap = self.cfg.kv_blocks * BLOCK_SIZE;
        let need = req.prompt.len() + req.max_tokens as usize;
        if need.div_ceil(BLOCK_SIZE) > self.cfg.kv_blocks || req.max_tokens == 0 {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                max: req.max_tokens,
                cap,
            });
        }
        let mut st = self.lock();
        if st.waiting.len() >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull);
        }
        let id = st.next_id;
        st.next_id += 1;
        let salt = if self.cfg.tenant_salt {
            kv::tenant_salt(&req.tenant)
        } else {
            0
        };
        let cold = st.first_token_ns.is_none();
        if let Some(cs) = st.cold.as_mut()
            && cs.first_request_ns.is_none()
        {
            cs.first_request_ns = Some(req.arrival_ns);
        }
        // Capacity covers every token plus the final summary, so try_send never finds it full.
        let (tx, rx) = mpsc::channel(req.max_tokens as usize + 2);
        let seq = Seq {
            id,
            hashes: kv::block_hashes(&req.prompt, salt),
            salt,
            out_seed: tokens::seq_hash(&req.prompt),
            output: Vec::new(),
            alloc: None,
            tx,
            sum: SeqSummary {
                prompt_tokens: req.prompt.len() as u64,
                cold,
                ..SeqSummary::default()
            },
            abort_at: None,
            prefilled: false,
            req,
        };
        st.waiting.push_back(seq);
        drop(st);
        self.notify.notify_one();
        Ok(Submitted { id, rx, cold })
    }

    /// The handler saw the client leave at `seen_ns`: schedule the abort per policy.
    pub fn client_gone(&self, id: u64, seen_ns: u64) {
        let Some(at) = self.cfg.policy.deadline(seen_ns) else {
            return;
        };
        let mut st = self.lock();
        let State {
            waiting, running, ..
        } = &mut *st;
        if let Some(s) = waiting
            .iter_mut()
            .chain(running.iter_mut())
            .find(|s| s.id == id)
        {
            s.abort_at = Some(s.abort_at.map_or(at, |a| a.min(at)));
        }
        drop(st);
        self.notify.notify_one();
    }

    /// The decode slow-down in force at `now` (1 outside contention intervals).
    pub fn contention_factor_at(&self, now: u64) -> f64 {
        Self::contention_factor(&self.lock(), now)
    }

    fn contention_factor(st: &State, now: u64) -> f64 {
        st.contention
            .iter()
            .filter(|(s, e, _)| *s <= now && now < *e)
            .map(|(_, _, f)| *f)
            .fold(1.0, f64::max)
    }

    /// Abort every sequence whose abort deadline passed; returns true if any remain.
    fn reap_aborts(&self, st: &mut State, now: u64) {
        let mut i = 0;
        while i < st.waiting.len() {
            if st.waiting[i].abort_at.is_some_and(|a| a <= now) {
                if let Some(s) = st.waiting.remove(i) {
                    self.finish(st, s, "abort", now);
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < st.running.len() {
            if st.running[i].abort_at.is_some_and(|a| a <= now) {
                let s = st.running.swap_remove(i);
                self.finish(st, s, "abort", now);
            } else {
                i += 1;
            }
        }
    }

    /// Admit from the waiting queue; returns the uncached prompt tokens to prefill.
    fn admit(&self, st: &mut State, now: u64) -> usize {
        let mut prefill = 0usize;
        let mut admitted = 0usize;
        while st.running.len() < self.cfg.max_running {
            let Some(seq) = st.waiting.front() else { break };
            let prompt_len = seq.req.prompt.len();
            // vLLM always computes at least the last prompt token.
            let max_hits = prompt_len.saturating_sub(1) / BLOCK_SIZE;
            let hits = st.kv.lookup(&seq.hashes).min(max_hits);
            let uncached = prompt_len - hits * BLOCK_SIZE;
            let decode_tokens = st.running.len() - admitted;
            if admitted > 0 && decode_tokens + prefill + uncached > self.cfg.token_budget {
                break;
            }
            let total_blocks = (prompt_len + seq.req.max_tokens as usize).div_ceil(BLOCK_SIZE);
            let Ok((alloc, evicted)) =
                st.kv
                    .allocate(&seq.hashes, hits, total_blocks.saturating_sub(hits))
            else {
                break;
            };
            let Some(mut seq) = st.waiting.pop_front() else {
                break;
            };
            if let Some(publisher) = &st.kv_events {
                let mut events = Vec::new();
                if !evicted.is_empty() {
                    events.push(KvCacheEvent::Removed {
                        hashes: evicted.iter().map(|e| e.hash).collect(),
                    });
                }
                // vLLM caches each full prompt block as its prefill computes it.
                let new: Vec<u64> = seq.hashes[alloc.hit_blocks..]
                    .iter()
                    .copied()
                    .filter(|h| !st.kv.is_cached(*h))
                    .collect();
                if !new.is_empty() {
                    events.push(KvCacheEvent::Stored {
                        parent: alloc.hit_blocks.checked_sub(1).map(|i| seq.hashes[i]),
                        hashes: new,
                    });
                }
                publisher.publish(now, events);
            }
            if !evicted.is_empty() {
                self.write_evictions(&seq.req, evicted, now);
            }
            seq.sum.cached_tokens = (alloc.hit_blocks * BLOCK_SIZE) as u64;
            seq.sum.hit_blocks = seq.hashes[..alloc.hit_blocks].to_vec();
            seq.sum.scheduled_ns = Some(now);
            seq.alloc = Some(alloc);
            prefill += uncached;
            admitted += 1;
            st.running.push(seq);
        }
        prefill
    }

    fn write_evictions(&self, by: &SeqRequest, evicted: Vec<kv::Evicted>, now: u64) {
        let mut groups: Vec<(Owner, Vec<u64>)> = Vec::new();
        for e in evicted {
            match groups.iter_mut().find(|(o, _)| *o == e.owner) {
                Some((_, v)) => v.push(e.hash),
                None => groups.push((e.owner, vec![e.hash])),
            }
        }
        for (owner, blocks) in groups {
            self.truth.write(&TruthRecord::Eviction(EvictionTruth {
                time_ns: now,
                victim_tenant: owner.tenant,
                victim_conversation: owner.conversation,
                victim_blocks: blocks,
                by_tenant: by.tenant.clone(),
                by_conversation: by.conversation.clone(),
                by_request_id: by.request_id.clone(),
            }));
        }
    }

    fn finish(&self, st: &mut State, mut s: Seq, reason: &str, now: u64) {
        if let Some(alloc) = s.alloc.take() {
            let mut content = s.req.prompt.clone();
            content.extend_from_slice(&s.output);
            let hashes = kv::block_hashes(&content, s.salt);
            s.sum.stored_blocks = st.kv.free(
                &alloc,
                &hashes,
                &Owner {
                    tenant: s.req.tenant.clone(),
                    conversation: s.req.conversation.clone(),
                },
            );
            if let Some(publisher) = &st.kv_events {
                // Prompt blocks were announced at prefill; the output's full blocks now.
                let prompt_blocks = s.hashes.len();
                let outputs: Vec<u64> = s
                    .sum
                    .stored_blocks
                    .iter()
                    .copied()
                    .filter(|h| !s.hashes.contains(h))
                    .collect();
                if !outputs.is_empty() {
                    publisher.publish(
                        now,
                        vec![KvCacheEvent::Stored {
                            parent: prompt_blocks.checked_sub(1).map(|i| s.hashes[i]),
                            hashes: outputs,
                        }],
                    );
                }
            }
        }
        s.sum.output_tokens = s.output.len() as u64;
        s.sum.finish_reason = reason.to_string();
        s.sum.stop_ns = now;
        // The handler may be gone (its task failed); the engine does not care.
        let _ = s.tx.try_send(SeqEvent::Done(s.sum));
    }

    /// One scheduling step's plan: how long the forward pass takes.
    fn plan(&self) -> Option<Duration> {
        let mut st = self.lock();
        let now = now_ns();
        self.reap_aborts(&mut st, now);
        let prefill = self.admit(&mut st, now);
        if st.running.is_empty() {
            return None;
        }
        let batch = st.running.len() as f64;
        let factor = Self::contention_factor(&st, now);
        let decode =
            self.cfg.decode_ns * (1.0 + self.cfg.decode_batch_growth * (batch - 1.0)) * factor;
        let ns = prefill as f64 * self.cfg.prefill_ns_per_token + decode;
        Some(Duration::from_nanos(ns.max(0.0) as u64))
    }

    /// End of a step: every running sequence produces one token.
    fn complete_step(&self, step: Duration) {
        let mut st = self.lock();
        let now = now_ns();
        let step_ns = step.as_nanos() as u64;
        let mut first_of_process = false;
        let mut i = 0;
        while i < st.running.len() {
            let s = &mut st.running[i];
            s.prefilled = true;
            s.sum.execute_ns += step_ns;
            let index = s.output.len() as u32;
            let word = tokens::output_word(s.out_seed, index);
            s.output.push(tokens::word_token(&word));
            if s.sum.first_token_ns.is_none() {
                s.sum.first_token_ns = Some(now);
            }
            s.sum.last_token_ns = Some(now);
            let _ = s.tx.try_send(SeqEvent::Token {
                index,
                text: word,
                time_ns: now,
            });
            if s.output.len() >= s.req.max_tokens as usize {
                let s = st.running.swap_remove(i);
                self.finish(&mut st, s, "length", now);
            } else {
                i += 1;
            }
            if st.first_token_ns.is_none() {
                st.first_token_ns = Some(now);
                first_of_process = true;
            }
        }
        if first_of_process && let Some(mut cs) = st.cold.take() {
            cs.first_token_ns = Some(now);
            self.truth.write(&TruthRecord::ColdStart(cs));
        }
    }

    /// Drive the engine until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.plan() {
                None => {
                    // Wake on a new request or an abort; re-check periodically so delayed
                    // aborts of waiting requests fire.
                    let _ = tokio::time::timeout(Duration::from_millis(50), self.notify.notified())
                        .await;
                }
                Some(step) => {
                    tokio::time::sleep(step).await;
                    self.complete_step(step);
                }
            }
        }
    }

    /// Write the cold-start record if no token was ever produced (at shutdown).
    pub fn flush_cold_start(&self) {
        if let Some(cs) = self.lock().cold.take() {
            self.truth.write(&TruthRecord::ColdStart(cs));
        }
    }

    /// Running and waiting counts (for tests and logs).
    pub fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.running.len(), st.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(policy: Policy) -> EngineConfig {
        EngineConfig {
            max_running: 2,
            token_budget: 64,
            kv_blocks: 64,
            tenant_salt: false,
            prefill_ns_per_token: 1_000.0,
            decode_ns: 1_000_000.0,
            decode_batch_growth: 0.5,
            policy,
            max_waiting: 16,
        }
    }

    fn req(id: &str, prompt: Vec<u32>, max: u32) -> SeqRequest {
        SeqRequest {
            request_id: id.into(),
            tenant: "t".into(),
            conversation: id.into(),
            prompt,
            max_tokens: max,
            arrival_ns: now_ns(),
        }
    }

    async fn drain(rx: &mut mpsc::Receiver<SeqEvent>) -> (Vec<u64>, SeqSummary) {
        let mut times = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                SeqEvent::Token { time_ns, .. } => times.push(time_ns),
                SeqEvent::Done(s) => return (times, s),
            }
        }
        (times, SeqSummary::default())
    }

    #[test]
    fn policy_parse() {
        assert_eq!(Policy::parse("immediate").unwrap(), Policy::Immediate);
        assert_eq!(Policy::parse("never").unwrap(), Policy::Never);
        assert_eq!(
            Policy::parse("delayed:250").unwrap(),
            Policy::Delayed(Duration::from_millis(250))
        );
        assert!(Policy::parse("delayed:x").is_err());
        assert_eq!(Policy::Never.deadline(5), None);
        assert_eq!(
            Policy::Delayed(Duration::from_millis(1)).deadline(5),
            Some(1_000_005)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn batches_respect_max_running_and_queue() {
        let truth = Arc::new(JsonlWriter::create(None).unwrap());
        let e = Engine::new(cfg(Policy::Immediate), truth);
        let task = tokio::spawn(e.clone().run());
        let mut subs: Vec<_> = (0..3)
            .map(|i| {
                e.submit(req(&format!("r{i}"), (0..40).collect(), 5))
                    .unwrap()
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (running, waiting) = e.load();
        assert!(running <= 2, "running {running}");
        assert!(running + waiting <= 3);
        let mut sums = Vec::new();
        for s in &mut subs {
            let (times, sum) = drain(&mut s.rx).await;
            assert_eq!(times.len(), 5);
            assert!(times.windows(2).all(|w| w[0] <= w[1]));
            sums.push(sum);
        }
        // The third waited for a slot: scheduled after the first finished.
        let third = sums[2].scheduled_ns.unwrap();
        assert!(third >= sums[0].stop_ns.min(sums[1].stop_ns));
        // The same prompt hits the cache once stored (2 full blocks of 40 tokens).
        assert_eq!(sums[2].cached_tokens, 32);
        assert_eq!(sums[0].cached_tokens, 0);
        task.abort();
    }

    async fn abort_case(policy: Policy) -> (Vec<u64>, SeqSummary, u64) {
        let truth = Arc::new(JsonlWriter::create(None).unwrap());
        let e = Engine::new(cfg(policy), truth);
        let task = tokio::spawn(e.clone().run());
        let mut s = e.submit(req("a", (0..20).collect(), 40)).unwrap();
        let mut times = Vec::new();
        let mut gone = 0;
        let sum = loop {
            match s.rx.recv().await {
                Some(SeqEvent::Token { time_ns, .. }) => {
                    times.push(time_ns);
                    if times.len() == 3 {
                        gone = now_ns();
                        e.client_gone(s.id, gone);
                    }
                }
                Some(SeqEvent::Done(sum)) => break sum,
                None => break SeqSummary::default(),
            }
        };
        task.abort();
        (times, sum, gone)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn disconnect_policies() {
        let (times, sum, gone) = abort_case(Policy::Immediate).await;
        assert_eq!(sum.finish_reason, "abort");
        let after = times.iter().filter(|&&t| t > gone).count();
        assert!(after <= 1, "immediate: {after} tokens after abort");
        assert!(sum.stop_ns >= gone);

        let (times, sum, gone) = abort_case(Policy::Delayed(Duration::from_millis(10))).await;
        assert_eq!(sum.finish_reason, "abort");
        let after = times.iter().filter(|&&t| t > gone).count();
        assert!((3..=12).contains(&after), "delayed: {after}");
        assert!(sum.stop_ns >= gone + 10_000_000);

        let (times, sum, _) = abort_case(Policy::Never).await;
        assert_eq!(sum.finish_reason, "length");
        assert_eq!(times.len(), 40);
        assert_eq!(sum.output_tokens, 40);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn decode_slows_in_contention() {
        let truth = Arc::new(JsonlWriter::create(None).unwrap());
        // 10 ms steps: on a loaded 2-core box a 1 ms sleep can take 5 ms, which would hide a
        // 4x slowdown of 1 ms steps.
        let config = EngineConfig {
            decode_ns: 10_000_000.0,
            ..cfg(Policy::Never)
        };
        let e = Engine::new(config, truth);
        let task = tokio::spawn(e.clone().run());
        let mut s = e.submit(req("base", vec![1; 8], 10)).unwrap();
        let (t, _) = drain(&mut s.rx).await;
        let base = t[t.len() - 1] - t[1];
        let now = now_ns();
        e.set_contention(vec![ContentionTruth {
            start_ns: now,
            end_ns: now + 10_000_000_000,
            factor: 4.0,
            neighbour: "x".into(),
            neighbour_sm_util: 90,
            neighbour_pid: None,
            neighbour_executable: None,
        }]);
        let mut s = e.submit(req("slow", vec![2; 8], 10)).unwrap();
        let (t, _) = drain(&mut s.rx).await;
        let slow = t[t.len() - 1] - t[1];
        assert!(slow > base * 2, "base {base} slow {slow}");
        task.abort();
    }
}
