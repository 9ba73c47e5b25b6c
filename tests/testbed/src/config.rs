//! Scenario files (TOML): the runtime's settings and the traffic, in one file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors loading a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// I/O error.
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    /// TOML error.
    #[error("parsing {0}: {1}")]
    Toml(String, toml::de::Error),
    /// A value out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// A whole scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Scenario name.
    pub name: String,
    /// What it plays and what the agent should find.
    #[serde(default)]
    pub description: String,
    /// RNG seed: the same seed gives the same plan.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Nominal length of the traffic in seconds (before `duration_scale`).
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// The simulated runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Tenants sending traffic.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Public trace files to replay.
    #[serde(default)]
    pub replay: Vec<ReplayConfig>,
    /// Directory the scenario was loaded from (relative replay paths resolve against it).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_seed() -> u64 {
    42
}
fn default_duration() -> f64 {
    10.0
}

/// Settings of the simulated runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Served model name.
    pub model: String,
    /// Max sequences running at once.
    pub max_running: usize,
    /// Max tokens scheduled per step (decode tokens + prefill tokens).
    pub token_budget: usize,
    /// KV cache size in blocks of 16 tokens.
    pub kv_blocks: usize,
    /// Salt prefix-cache hashes per tenant (no cross-tenant sharing).
    pub tenant_salt: bool,
    /// Prefill cost per uncached prompt token, microseconds.
    pub prefill_us_per_token: f64,
    /// Decode step time with one sequence, milliseconds.
    pub decode_ms: f64,
    /// Extra decode step time per additional running sequence, as a fraction of `decode_ms`.
    pub decode_batch_growth: f64,
    /// Disconnect policy: `immediate`, `delayed:<ms>`, `never`.
    pub disconnect_policy: String,
    /// Simulated CUDA init time before weight loading, ms.
    pub cuda_init_ms: f64,
    /// Simulated weight loading time before listening, ms.
    pub load_weights_ms: f64,
    /// Contention intervals, relative to the moment the server listens.
    pub contention: Vec<ContentionConfig>,
    /// Add one span event per output token.
    pub token_events: bool,
    /// Export a span for a request aborted because its client left. vLLM 0.32 exports none
    /// (its `llm_request` span is made only when the engine finishes a request; seen on the
    /// real vLLM): the default, so that the fast tier stays true to the real runtime.
    pub abort_spans: bool,
    /// `run` starts the runtime as a separate process (`iw-testbed serve`) so the agent sees
    /// a real scale-from-zero (exec, load, listen); otherwise in-process.
    pub separate_process: bool,
    /// Publish vLLM-compatible KV events (ZMQ PUB, msgpack `KVEventBatch`) on this endpoint
    /// (`tcp://127.0.0.1:5557`; port 0 picks one). None: no KV events.
    pub kv_events_endpoint: Option<String>,
    /// Which runtime's spans, ids and headers to produce: `vllm` (default), `sglang`, `tgi`.
    pub flavor: crate::flavor::Flavor,
    /// SGLang versions that never end the root of a request whose client disconnected: its
    /// thread and stage spans are exported, its root never is (`flavor = "sglang"` only).
    pub omit_disconnected_root: bool,
    /// Which pid the span resource names: none (the default: the OTel Python SDK's default
    /// resource has no `process.pid`, so the agent must find the instance from the kernel),
    /// `process_pid` (an SDK with the process detector) or `vllm_process_id` (vLLM 0.32's
    /// resource attribute). The pid named is the serving process's, not its engine child's.
    pub resource_pid: ResourcePid,
}

/// The pid attribute on the span resource (see [`RuntimeConfig::resource_pid`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourcePid {
    /// No pid attribute.
    #[default]
    None,
    /// `process.pid`.
    ProcessPid,
    /// `vllm.process_id`.
    VllmProcessId,
}

impl ResourcePid {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourcePid::None => "none",
            ResourcePid::ProcessPid => "process_pid",
            ResourcePid::VllmProcessId => "vllm_process_id",
        }
    }
}

impl std::str::FromStr for ResourcePid {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "none" => Ok(ResourcePid::None),
            "process_pid" => Ok(ResourcePid::ProcessPid),
            "vllm_process_id" => Ok(ResourcePid::VllmProcessId),
            other => anyhow::bail!(
                "resource pid {other:?}: expected none, process_pid or vllm_process_id"
            ),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model: "sim-llama-3-8b".into(),
            max_running: 32,
            token_budget: 4096,
            kv_blocks: 4096,
            tenant_salt: false,
            prefill_us_per_token: 20.0,
            decode_ms: 5.0,
            decode_batch_growth: 0.02,
            disconnect_policy: "immediate".into(),
            cuda_init_ms: 0.0,
            load_weights_ms: 0.0,
            contention: Vec::new(),
            token_events: false,
            abort_spans: false,
            separate_process: false,
            kv_events_endpoint: None,
            flavor: crate::flavor::Flavor::Vllm,
            omit_disconnected_root: false,
            resource_pid: ResourcePid::None,
        }
    }
}

/// One contention interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentionConfig {
    /// Start, seconds after listen.
    pub start_s: f64,
    /// End, seconds after listen.
    pub end_s: f64,
    /// Decode slow-down factor (>= 1).
    pub factor: f64,
    /// Name of the neighbour played.
    #[serde(default = "default_neighbour")]
    pub neighbour: String,
    /// SM utilisation the neighbour would show.
    #[serde(default = "default_sm")]
    pub neighbour_sm_util: u32,
}

fn default_neighbour() -> String {
    "batch-finetune".into()
}
fn default_sm() -> u32 {
    70
}

/// Arrival process of a tenant's conversations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Poisson process with `rate_per_s`.
    Poisson,
    /// `burst_size` conversations at once, every `burst_interval_s`.
    Bursty,
}

/// One tenant's traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id (`x-tenant-id`).
    pub name: String,
    /// Arrival process of new conversations.
    pub arrival: Arrival,
    /// Poisson rate (conversations per second).
    pub rate_per_s: f64,
    /// Bursty: conversations per burst.
    pub burst_size: u32,
    /// Bursty: seconds between bursts.
    pub burst_interval_s: f64,
    /// First arrival no earlier than this (seconds).
    pub start_s: f64,
    /// No new conversation after this (seconds; default: the scenario's duration).
    pub end_s: Option<f64>,
    /// Cap on conversations started.
    pub max_conversations: u32,
    /// Turns per conversation `[min, max]`.
    pub turns: [u32; 2],
    /// First-turn prompt tokens `[min, max]` (system + first user message).
    pub prompt_tokens: [u32; 2],
    /// Tokens of each later user message `[min, max]`.
    pub turn_tokens: [u32; 2],
    /// `max_tokens` `[min, max]`.
    pub max_tokens: [u32; 2],
    /// Think time between turns, ms `[min, max]`.
    pub think_ms: [u32; 2],
    /// Share of requests that stream.
    pub stream_share: f64,
    /// Share of streaming requests that abort mid-stream.
    pub abort_share: f64,
    /// Abort after this many tokens `[min, max]`.
    pub abort_after_tokens: [u32; 2],
    /// Share of aborts done by RST (the rest by FIN).
    pub rst_share: f64,
    /// Share of non-streaming requests whose client gives up after a timeout (FIN).
    pub timeout_share: f64,
    /// Client timeout range for those, in ms.
    pub timeout_ms: [u32; 2],
    /// Use `/v1/completions` instead of chat.
    pub completions: bool,
    /// Share of the first prompt that is the tenant's system prompt, shared by all its
    /// conversations (a prefix-cache hit across them); 0: every prompt is distinct.
    pub system_share: f64,
    /// The tenant's client sends no `traceparent` (the runtime then starts its own trace; the
    /// agent joins by the other rules).
    pub no_traceparent: bool,
}

impl Default for TenantConfig {
    fn default() -> Self {
        Self {
            name: "tenant".into(),
            arrival: Arrival::Poisson,
            rate_per_s: 1.0,
            burst_size: 4,
            burst_interval_s: 2.0,
            start_s: 0.0,
            end_s: None,
            max_conversations: 1000,
            turns: [1, 1],
            prompt_tokens: [64, 256],
            turn_tokens: [16, 64],
            max_tokens: [16, 64],
            think_ms: [50, 200],
            stream_share: 1.0,
            abort_share: 0.0,
            abort_after_tokens: [2, 10],
            rst_share: 0.5,
            timeout_share: 0.0,
            timeout_ms: [100, 500],
            completions: false,
            system_share: 0.75,
            no_traceparent: false,
        }
    }
}

/// A public trace file to replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// `azure` (CSV `TIMESTAMP,ContextTokens,GeneratedTokens`) or `mooncake`
    /// (JSONL `timestamp`, `input_length`, `output_length`, `hash_ids`).
    pub format: String,
    /// Path, relative to the scenario file.
    pub path: PathBuf,
    /// Tenant the replayed requests are sent as.
    #[serde(default = "default_replay_tenant")]
    pub tenant: String,
    /// Multiply trace time offsets by this.
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Multiply token counts by this (keeps replays short).
    #[serde(default = "one")]
    pub token_scale: f64,
    /// Cap on `max_tokens`.
    #[serde(default = "default_max_out")]
    pub max_output_tokens: u32,
    /// Mooncake: tokens per hash id.
    #[serde(default = "default_hash_block")]
    pub hash_block_tokens: u32,
    /// Start offset, seconds.
    #[serde(default)]
    pub start_s: f64,
}

fn default_replay_tenant() -> String {
    "replay".into()
}
fn one() -> f64 {
    1.0
}
fn default_max_out() -> u32 {
    64
}
fn default_hash_block() -> u32 {
    512
}

impl Scenario {
    /// Load and validate a scenario file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(name.clone(), e))?;
        let mut s: Scenario = toml::from_str(&text).map_err(|e| ConfigError::Toml(name, e))?;
        s.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        s.validate()?;
        Ok(s)
    }

    /// Check ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.runtime;
        if r.max_running == 0 || r.token_budget == 0 || r.kv_blocks < 2 {
            return Err(ConfigError::Invalid(
                "max_running, token_budget must be > 0 and kv_blocks >= 2".into(),
            ));
        }
        crate::engine::Policy::parse(&r.disconnect_policy)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if r.omit_disconnected_root && r.flavor != crate::flavor::Flavor::Sglang {
            return Err(ConfigError::Invalid(
                "omit_disconnected_root plays an SGLang behaviour: it needs flavor = \"sglang\""
                    .into(),
            ));
        }
        for c in &r.contention {
            if c.end_s < c.start_s || c.factor < 1.0 {
                return Err(ConfigError::Invalid(
                    "contention: end_s >= start_s and factor >= 1".into(),
                ));
            }
        }
        for t in &self.tenants {
            for (n, [a, b]) in [
                ("turns", t.turns),
                ("prompt_tokens", t.prompt_tokens),
                ("turn_tokens", t.turn_tokens),
                ("max_tokens", t.max_tokens),
                ("think_ms", t.think_ms),
                ("abort_after_tokens", t.abort_after_tokens),
            ] {
                if a > b {
                    return Err(ConfigError::Invalid(format!(
                        "tenant {}: {n} min > max",
                        t.name
                    )));
                }
            }
            if t.arrival == Arrival::Poisson && t.rate_per_s <= 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "tenant {}: rate_per_s must be > 0",
                    t.name
                )));
            }
            if t.arrival == Arrival::Bursty && t.burst_interval_s <= 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "tenant {}: burst_interval_s must be > 0",
                    t.name
                )));
            }
        }
        Ok(())
    }
}
