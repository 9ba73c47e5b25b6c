//! The timestamped events that sources hand to the correlator.
//!
//! Sources (kernel, OTLP, NVML, procfs) turn what they observe into these plain values; the
//! correlator (`crate::correlator`) consumes them without doing any I/O. Every timestamp is
//! wall-clock unix nanoseconds, converted once at the source.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Wall-clock time in nanoseconds since the unix epoch.
pub type UnixNanos = u64;

/// A connection key: the kernel address of the `struct sock`.
///
/// The key is the socket, not the pid: the peer-side transitions (FIN, RST) run in softirq
/// context where the current task is unrelated to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// How the peer left a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseHow {
    /// The peer sent FIN: the server socket entered CLOSE_WAIT.
    Fin,
    /// The peer sent RST.
    Rst,
}

impl CloseHow {
    /// The label used in metrics and span attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseHow::Fin => "fin",
            CloseHow::Rst => "rst",
        }
    }
}

/// A W3C `traceparent` header value, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceParent {
    /// The 16-byte trace id.
    pub trace_id: [u8; 16],
    /// The 8-byte parent span id.
    pub parent_id: [u8; 8],
    /// The trace flags byte.
    pub flags: u8,
}

/// The parsed part of an HTTP/1.1 request head: the request line and the allow-listed
/// headers. Nothing else of the request ever leaves the kernel source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// The request method (`POST`).
    pub method: String,
    /// The request target without the query string (`/v1/chat/completions`).
    pub path: String,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// `traceparent`, when it parsed.
    pub traceparent: Option<TraceParent>,
    /// The configured tenant header (default `x-tenant-id`).
    pub tenant: Option<String>,
    /// The configured conversation header (default `x-conversation-id`).
    pub conversation: Option<String>,
    /// The top-level `"model"` of a JSON body, when the captured bytes reach it (vLLM's span
    /// carries no model name; this one stands in).
    pub model: Option<String>,
}

/// One event from the kernel source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEvent {
    /// When the kernel saw it.
    pub ts: UnixNanos,
    /// The process of the current task, when the event ran in process context.
    pub pid: Option<u32>,
    /// What happened.
    pub kind: KernelEventKind,
}

/// The kinds of kernel events (contract §1.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KernelEventKind {
    /// A process started listening on a watched port: a runtime became ready to accept.
    Listen {
        /// The listening socket.
        conn: ConnId,
        /// The local port.
        port: u16,
    },
    /// A connection to a watched port completed its handshake (the server's accept() may come
    /// later; the kernel reports it from softirq, so `pid` is `None`).
    Accepted {
        /// The connection.
        conn: ConnId,
        /// The server's address.
        local: SocketAddr,
        /// The client's address.
        peer: SocketAddr,
    },
    /// A connection attempt to a watched port that no socket took: the kernel answered the
    /// client's SYN with a reset (nothing listened there yet, or any more). Softirq: `pid` is
    /// `None`; there is no connection: [`KernelEventKind::conn`] is `ConnId(0)`.
    Refused {
        /// The watched address the client tried.
        local: SocketAddr,
        /// The client's address.
        peer: SocketAddr,
    },
    /// An HTTP/1.1 request arrived on a watched connection and the server read it (the time and
    /// pid are those of the server's first read of it).
    RequestHead {
        /// The connection.
        conn: ConnId,
        /// The reader's file descriptor of the socket.
        fd: i32,
        /// The parsed request line and allow-listed headers.
        head: RequestHead,
        /// The connection's send sequence when the head was read (the socket's `write_seq`:
        /// bytes the server had written on it, mod 2^32), when the kernel gave it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send_seq: Option<u32>,
    },
    /// The peer left (FIN or RST) while the connection was open.
    PeerClosed {
        /// The connection.
        conn: ConnId,
        /// FIN or RST.
        how: CloseHow,
        /// The connection's send sequence when the peer left, when the kernel gave it. Equal
        /// to the current request head's: the response had not started (a non-streaming
        /// request, whose body is one write at the end), so writes after the close are not
        /// token chunks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send_seq: Option<u32>,
    },
    /// The server wrote to a connection after its peer had left.
    WriteAfterPeerClose {
        /// The connection.
        conn: ConnId,
        /// Bytes the write accepted (0 when it failed).
        bytes: u64,
        /// The write's errno (0 when it succeeded).
        errno: i32,
    },
    /// One of the server's first sends after a request head on a watched connection, as read
    /// from its first bytes: the response's own id when it held one (the first SSE chunk's or
    /// the JSON body's `"id"`, or an `x-request-id` response header), and whether it carried
    /// no token (a bare response head, a role-only SSE chunk); every other byte was dropped.
    ResponseId {
        /// The connection.
        conn: ConnId,
        /// The id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The send carried no output token.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tokenless: bool,
    },
    /// The server closed its side of the connection (sent FIN, or released a reset socket).
    LocalClosed {
        /// The connection.
        conn: ConnId,
        /// The server's sends of the response under way (since the connection's last request
        /// head, while the peer was there), when the kernel counted them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response_sends: Option<u32>,
    },
    /// The socket reached TCP_CLOSE.
    Closed {
        /// The connection.
        conn: ConnId,
    },
    /// A process ended (its last thread exited); the event's `pid` is the process. Not about a
    /// connection: [`KernelEventKind::conn`] is `ConnId(0)`.
    ProcessExit {
        /// The wait status its parent sees: `(code & 0xff) << 8` for `exit(code)`, the signal
        /// number (`| 0x80` with a core dump) for a death by signal.
        exit_code: u32,
        /// Its parent process.
        parent_pid: u32,
    },
    /// The kernel's OOM killer chose the process `pid` (its SIGKILL and exit follow). Not about
    /// a connection: [`KernelEventKind::conn`] is `ConnId(0)`.
    OomVictim,
}

impl KernelEventKind {
    /// The connection this event is about (`ConnId(0)` for the process events).
    pub fn conn(&self) -> ConnId {
        match self {
            KernelEventKind::Listen { conn, .. }
            | KernelEventKind::Accepted { conn, .. }
            | KernelEventKind::RequestHead { conn, .. }
            | KernelEventKind::PeerClosed { conn, .. }
            | KernelEventKind::WriteAfterPeerClose { conn, .. }
            | KernelEventKind::ResponseId { conn, .. }
            | KernelEventKind::LocalClosed { conn, .. }
            | KernelEventKind::Closed { conn } => *conn,
            KernelEventKind::Refused { .. }
            | KernelEventKind::ProcessExit { .. }
            | KernelEventKind::OomVictim => ConnId(0),
        }
    }
}

/// Which runtime (or convention) a request span came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// vLLM's `llm_request` span.
    Vllm,
    /// SGLang's `Req <rid>` span tree.
    Sglang,
    /// Text Generation Inference's `generate_stream` / `generate` spans.
    Tgi,
    /// Any span that follows the OTel GenAI semantic conventions.
    GenAi,
}

impl RuntimeKind {
    /// The label used in metrics and attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Vllm => "vllm",
            RuntimeKind::Sglang => "sglang",
            RuntimeKind::Tgi => "tgi",
            RuntimeKind::GenAi => "gen_ai",
        }
    }
}

/// The identity of the process that exported a span (its OTel resource).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceIdentity {
    /// `service.name`.
    pub service_name: Option<Arc<str>>,
    /// `service.instance.id`.
    pub service_instance_id: Option<Arc<str>>,
    /// `process.pid`, else `vllm.process_id` (vLLM's API server): an alias of the instance
    /// (contract §1.4), which the kernel side names by the process reading its requests.
    pub pid: Option<u32>,
    /// `host.name`.
    pub host_name: Option<Arc<str>>,
}

/// One inference request as the runtime reported it, whatever the runtime (contract §1.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeRequest {
    /// Which adapter produced it.
    pub runtime: RuntimeKind,
    /// The span's trace id.
    pub trace_id: [u8; 16],
    /// The span's id.
    pub span_id: [u8; 8],
    /// The span's parent id (the client's span when `traceparent` was propagated).
    pub parent_span_id: Option<[u8; 8]>,
    /// The runtime's request id (`gen_ai.request.id`; vLLM derives it from `x-request-id`).
    pub request_id: Option<String>,
    /// `gen_ai.request.model` / `gen_ai.response.model`.
    pub model: Option<String>,
    /// The tenant (`tenant.id` by default).
    pub tenant: Option<String>,
    /// The conversation (`gen_ai.conversation.id`).
    pub conversation: Option<String>,
    /// `client.address` / `client.port`, when the runtime recorded them.
    pub client: Option<SocketAddr>,
    /// The exporting process.
    pub instance: InstanceIdentity,
    /// Arrival: the span's start.
    pub arrival: UnixNanos,
    /// Time spent waiting in the scheduler's queue, in nanoseconds.
    pub queue_ns: Option<u64>,
    /// The runtime's own prefill time, scheduled to first token, in nanoseconds
    /// (`gen_ai.latency.time_in_model_prefill`). Unlike `first_token - arrival - queue`, it
    /// leaves out the tokenizer and the hops between the API server and the engine.
    #[serde(default)]
    pub prefill_ns: Option<u64>,
    /// When the first output token was produced.
    pub first_token: Option<UnixNanos>,
    /// The span's end: the runtime stopped working on the request.
    pub end: UnixNanos,
    /// Prompt (input) tokens.
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: Option<u64>,
    /// Output tokens generated (and billed).
    pub output_tokens: Option<u64>,
    /// Why generation stopped (`stop`, `length`, `abort`, ...).
    pub finish_reason: Option<String>,
    /// Per-token times, when the runtime exported one span event per token.
    pub token_times: Vec<UnixNanos>,
}

/// One batch of KV-cache events from a runtime's publisher (vLLM's / SGLang's `KVEventBatch`),
/// tagged with the instance it came from. Token ids are dropped at the source: they are prompt
/// content and never leave the subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    /// The batch's timestamp (the publisher's float seconds, converted).
    pub ts: UnixNanos,
    /// The runtime instance, by the key spans of that instance get
    /// (`correlator::instance_key`: `service.instance.id`, else `pid:<pid>`, else
    /// `svc:<service.name>@<host.name>`).
    pub instance: String,
    /// The publisher's sequence number of the message, when it had one.
    pub seq: Option<u64>,
    /// vLLM's data-parallel rank, when sent.
    pub data_parallel_rank: Option<i64>,
    /// Events of a type this agent does not know, skipped by the decoder (counted so that a
    /// runtime that adds an event type shows up instead of silently thinning the evidence).
    #[serde(default)]
    pub unknown_events: u32,
    /// The events, in order.
    pub events: Vec<KvEvent>,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEvent {
    /// Full blocks entered the prefix cache.
    BlockStored {
        /// The blocks' hashes (64-bit; longer hashes are folded), in sequence order.
        block_hashes: Vec<u64>,
        /// The hash of the block before the first one, when any.
        parent_block_hash: Option<u64>,
        /// How many tokens the blocks hold (the token ids themselves are dropped).
        num_tokens: u32,
        /// Tokens per block.
        block_size: u32,
        /// The LoRA adapter, when any.
        lora_id: Option<i64>,
        /// The storage medium (`GPU`, `CPU`, ...), when sent.
        medium: Option<String>,
    },
    /// Blocks left the prefix cache (evicted).
    BlockRemoved {
        /// The blocks' hashes.
        block_hashes: Vec<u64>,
        /// The storage medium, when sent.
        medium: Option<String>,
    },
    /// The whole cache was cleared (reset or restart).
    AllBlocksCleared,
}

/// One GPU as the NVML source saw it at a sample (contract §1.3). A field is `None` when its NVML
/// call failed this time (not supported on this GPU, MIG, a transient error).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStat {
    /// The NVML index (not stable across reboots; the uuid is the key).
    pub index: u32,
    /// `GPU-...` uuid.
    pub uuid: String,
    /// The product name.
    pub name: String,
    /// Percent of the last sample period during which a kernel ran on the GPU.
    pub sm_util: Option<u32>,
    /// Percent of the last sample period during which device memory was read or written.
    pub mem_util: Option<u32>,
    /// Device memory in use, in bytes.
    pub memory_used: Option<u64>,
    /// Device memory installed, in bytes.
    pub memory_total: Option<u64>,
}

/// One process on one GPU at a sample (contract §1.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcessStat {
    /// The GPU's uuid.
    pub gpu_uuid: String,
    /// The process id, as NVML reports it (the host pid namespace).
    pub pid: u32,
    /// Device memory the process holds, in bytes (`None`: listed by the utilisation samples
    /// only, or the driver does not report it).
    pub used_memory: Option<u64>,
    /// Mean SM utilisation share of this process over the samples NVML kept since the last
    /// poll, in percent (`None`: no sample since the last poll).
    pub sm_util: Option<u32>,
    /// Mean memory-controller utilisation share over the same samples, in percent.
    pub mem_util: Option<u32>,
}

/// Everything the NVML source saw in one poll.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSample {
    /// When the poll started.
    pub ts: UnixNanos,
    /// Every GPU that answered.
    pub gpus: Vec<GpuStat>,
    /// Every process on those GPUs (compute processes and processes with utilisation samples).
    pub processes: Vec<GpuProcessStat>,
}

/// Who a process is (contract §1.4), from `/proc/<pid>/comm`, `/proc/<pid>/cgroup` and
/// `/proc/<pid>/stat`. Exported as `process.pid`, `process.executable.name`, `container.id`,
/// `k8s.pod.uid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The process id (host namespace).
    pub pid: u32,
    /// The executable's name (`comm`, up to 15 bytes, or the `exe` link's file name).
    pub executable: Option<String>,
    /// The container id (64 hex digits), when the process runs in a container.
    pub container_id: Option<String>,
    /// The Kubernetes pod uid, when the process runs in a pod.
    pub pod_uid: Option<String>,
    /// When the process started (its `t_exec`).
    pub start_time: Option<UnixNanos>,
    /// The parent process: a runtime's GPU worker (vLLM's engine core, a tensor-parallel
    /// rank) is the child of the process that listens and exports spans.
    pub parent_pid: Option<u32>,
}

/// One start-up span of a runtime: its own account of a cold-start phase (contract §1.2,
/// §3.2), such as vLLM's `Overall Loading`, `Load weights` or `Warmup (CPU)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupSpan {
    /// Which runtime sent it.
    pub runtime: RuntimeKind,
    /// The span's trace id: vLLM puts every start-up span of one start in one trace.
    pub trace_id: [u8; 16],
    /// The span's id.
    pub span_id: [u8; 8],
    /// Its parent; `None` for the start's root (`Overall Loading`, which ends last).
    pub parent_span_id: Option<[u8; 8]>,
    /// The span name as the runtime sent it.
    pub name: String,
    /// The phase it stands for (`overall_loading`, `load_weights`, `warmup`, ...).
    pub phase: String,
    /// `code.function`, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_function: Option<String>,
    /// The span's start.
    pub start: UnixNanos,
    /// The span's end.
    pub end: UnixNanos,
    /// The emitting process: `vllm.process_id`, else `process.pid`.
    pub process_pid: Option<u32>,
    /// `vllm.process_kind` (`engine_core`, `worker`); `None` for the process that serves the
    /// API (the one that listens and exports the request spans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_kind: Option<String>,
}
