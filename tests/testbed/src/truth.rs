//! Ground-truth records written by the simulated runtime (`--truth`) and by the traffic
//! generator (`--client-truth`), one JSON object per line, tagged by `kind`.
//!
//! The agent's end-to-end tests read these to score findings, so the shapes are stable:
//! add fields, never rename them. All times are unix nanoseconds.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How a client connection ended, as the client did it or as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseHow {
    /// Orderly close: FIN.
    Fin,
    /// Abortive close: RST (SO_LINGER 0).
    Rst,
    /// The server's write failed before any read saw the close.
    WriteError,
}

/// One server-side record; the `kind` field names the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Records are built once and written; boxing would only complicate the readers' matching.
#[allow(clippy::large_enum_variant)]
pub enum TruthRecord {
    /// A finished (completed or aborted) request.
    Request(RequestTruth),
    /// Blocks of one conversation evicted by one allocating request.
    Eviction(EvictionTruth),
    /// The process's start-up phases.
    ColdStart(ColdStartTruth),
    /// A scheduled GPU contention interval.
    Contention(ContentionTruth),
}

/// Ground truth of one request, written when the runtime stops working on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestTruth {
    /// The client's `X-Request-Id` (or a generated id when absent).
    pub request_id: String,
    /// The runtime's id, the response's `id`: as vLLM forms it (`chatcmpl-<x-request-id>` /
    /// `cmpl-<..>`, the span's `gen_ai.request.id`), SGLang's rid (a uuid4 hex, also the
    /// span's `gen_ai.request.id`), or TGI's empty string.
    pub runtime_request_id: String,
    /// Trace id (32 hex) of the exported span; from `traceparent` when given.
    pub trace_id: String,
    /// Span id (16 hex) of the exported request span (`llm_request`, SGLang's root, TGI's
    /// handler span).
    pub span_id: String,
    /// Tenant (`x-tenant-id`), empty when absent.
    pub tenant: String,
    /// Conversation (`x-conversation-id`), empty when absent.
    pub conversation: String,
    /// Turn number in the conversation (count of user messages), 1-based; 0 for completions.
    pub turn: u32,
    /// `true` when the response was streamed (SSE).
    pub stream: bool,
    /// Disconnect policy in force (`immediate`, `delayed:<ms>`, `never`).
    pub policy: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache (multiple of the block size).
    pub cached_tokens: u64,
    /// Output tokens generated (and billed) by the runtime.
    pub output_tokens: u64,
    /// `max_tokens` requested.
    pub max_tokens: u64,
    /// Output tokens generated strictly after the server saw the client leave.
    pub tokens_after_abort: u64,
    /// When each output token was generated, for requests whose client left (empty
    /// otherwise): lets a scorer place the abort at the client's close instead of at the
    /// moment the server noticed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_times_ns: Vec<u64>,
    /// For the same requests, when each write of the streamed body (token chunks and the
    /// closing chunk) began and returned: the kernel counts writes after the peer's FIN, so a
    /// token generated before the client's close can still be written after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_writes_ns: Vec<(u64, u64)>,
    /// Output tokens that reached the socket successfully (write returned Ok).
    pub tokens_written: u64,
    /// `length`, `stop` or `abort`.
    pub finish_reason: String,
    /// When the request head arrived (span start).
    pub arrival_ns: u64,
    /// When the scheduler first admitted it (end of queueing).
    pub scheduled_ns: Option<u64>,
    /// When its first output token was produced.
    pub first_token_ns: Option<u64>,
    /// When the runtime stopped working on it (span end).
    pub stop_ns: u64,
    /// When the server first saw the client leave (EOF / RST on read, or a failed write).
    pub client_abort_ns: Option<u64>,
    /// How the server saw the client leave.
    pub client_abort_how: Option<CloseHow>,
    /// Hashes of the full KV blocks this request added to the prefix cache.
    pub stored_blocks: Vec<u64>,
    /// Hashes of the prefix blocks it found in the cache.
    pub hit_blocks: Vec<u64>,
    /// True when the request arrived before the process served its first token.
    pub cold: bool,
}

/// Blocks of one victim conversation evicted to make room for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvictionTruth {
    /// When the blocks were evicted.
    pub time_ns: u64,
    /// Tenant whose blocks were evicted.
    pub victim_tenant: String,
    /// Conversation whose blocks were evicted.
    pub victim_conversation: String,
    /// Hashes of the evicted blocks.
    pub victim_blocks: Vec<u64>,
    /// Tenant of the request whose allocation displaced them.
    pub by_tenant: String,
    /// Conversation of that request.
    pub by_conversation: String,
    /// Request id of that request.
    pub by_request_id: String,
}

/// Start-up phases of one runtime process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStartTruth {
    /// Process id of the runtime.
    pub pid: u32,
    /// Process start (exec), as read from the process start time.
    pub exec_ns: u64,
    /// Start of the (simulated) CUDA initialisation.
    pub cuda_init_start_ns: u64,
    /// Start of weight loading.
    pub weights_start_ns: u64,
    /// Weights loaded.
    pub weights_done_ns: u64,
    /// Listening socket bound and `listen()`ed.
    pub listen_ns: u64,
    /// Port listened on.
    pub port: u16,
    /// Arrival of the first request (None if none came).
    pub first_request_ns: Option<u64>,
    /// First output token produced (None if none).
    pub first_token_ns: Option<u64>,
}

/// One interval in which decode was slowed, playing a neighbour process hogging the GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentionTruth {
    /// Interval start.
    pub start_ns: u64,
    /// Interval end.
    pub end_ns: u64,
    /// Decode slow-down factor.
    pub factor: f64,
    /// Name of the simulated neighbour (for scoring only).
    pub neighbour: String,
    /// Simulated SM utilisation of the neighbour (0..=100).
    pub neighbour_sm_util: u32,
    /// Pid of the real process that played the neighbour (with `--nvml-script`; the fake NVML
    /// lists it on the GPU from `start_ns` to `end_ns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_pid: Option<u32>,
    /// Its command name (`/proc/<pid>/comm`), as the agent should name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_executable: Option<String>,
}

/// One client-side record, written by the traffic generator per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientTruth {
    /// The `X-Request-Id` sent.
    pub request_id: String,
    /// Trace id of the `traceparent` sent.
    pub trace_id: String,
    /// Parent span id of the `traceparent` sent.
    pub parent_span_id: String,
    /// Tenant sent.
    pub tenant: String,
    /// Conversation sent.
    pub conversation: String,
    /// Turn (1-based).
    pub turn: u32,
    /// Streaming request.
    pub stream: bool,
    /// Local port of the client's connection (the agent keys connections by 4-tuple).
    pub local_port: u16,
    /// First connect attempt.
    pub start_ns: u64,
    /// Connect attempts the server's port refused before one was accepted (the runtime was not
    /// listening yet: a cold start), each retried like a gateway would.
    #[serde(default)]
    pub refused_attempts: u32,
    /// Request fully written.
    pub sent_ns: u64,
    /// First content token received.
    pub first_token_ns: Option<u64>,
    /// When the client closed the connection.
    pub close_ns: u64,
    /// `complete`, `fin`, `rst` or `error`.
    pub close: String,
    /// Content tokens received.
    pub tokens_received: u64,
    /// Tokens the client meant to read before aborting (None: read to the end).
    pub abort_after_tokens: Option<u64>,
    /// HTTP status (0 when none was read).
    pub status: u16,
    /// `usage.prompt_tokens` reported, when a usage object arrived.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens` reported.
    pub completion_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens` reported.
    pub cached_tokens: Option<u64>,
    /// Error text, when the request failed.
    pub error: Option<String>,
}

/// Appends JSON lines to a file; shared by tasks. Each record is one `write` so lines never
/// interleave; failures are logged, never fatal (the truth file is a test aid).
#[derive(Debug)]
pub struct JsonlWriter {
    file: Mutex<Option<File>>,
}

impl JsonlWriter {
    /// Create (truncate) `path`; `None` gives a writer that drops everything.
    pub fn create(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(File::create(p)?),
            None => None,
        };
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Write one record as a line.
    pub fn write<T: Serialize>(&self, rec: &T) {
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialise truth record");
                return;
            }
        };
        line.push(b'\n');
        let mut guard = match self.file.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(f) = guard.as_mut()
            && let Err(e) = f.write_all(&line)
        {
            tracing::warn!(error = %e, "cannot write truth record");
        }
    }
}

/// Errors reading a truth file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// I/O error.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A line that is not a record.
    #[error("{path}:{line}: {source}")]
    Parse {
        /// File.
        path: String,
        /// 1-based line.
        line: usize,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Read a JSONL file of `T` (server `TruthRecord`s or `ClientTruth`s).
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, ReadError> {
    let name = path.display().to_string();
    let f = File::open(path).map_err(|source| ReadError::Io {
        path: name.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| ReadError::Io {
            path: name.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|source| ReadError::Parse {
                path: name.clone(),
                line: i + 1,
                source,
            })?,
        );
    }
    Ok(out)
}

/// Wall clock now, unix nanoseconds.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
