//! Configuration of the kernel source.

use serde::{Deserialize, Serialize};

/// Ports where the known runtimes listen by default (vLLM / TGI 8000 and 3000 / 8080, SGLang
/// 30000). Watched in addition to `watch_ports` when `watch_runtime_ports` is on.
pub const RUNTIME_DEFAULT_PORTS: &[u16] = &[8000, 8080, 3000, 30000];

/// The kernel (eBPF) source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// Turn the source on. When off (or when the kernel refuses the programs) the agent runs on
    /// its other sources.
    pub enabled: bool,
    /// Local TCP ports to watch (the runtimes' HTTP ports). `--watch-port` adds to this list.
    pub watch_ports: Vec<u16>,
    /// Also watch the default ports of vLLM, SGLang and TGI (8000, 8080, 3000, 30000), and
    /// the ports where a runtime (vLLM, SGLang, TGI) or a gateway in front of one (nginx,
    /// Envoy, LiteLLM's proxy) is found listening at start-up.
    pub watch_runtime_ports: bool,
    /// The request header that names the tenant (lower case).
    pub tenant_header: String,
    /// The request header that names the conversation (lower case).
    pub conversation_header: String,
    /// Size of the ring buffer between the kernel and the agent, in bytes. The loader rounds
    /// it up to a power-of-two number of pages (4 KiB at least).
    pub ring_buffer_bytes: u32,
    /// How often the reader drains the ring buffer, in milliseconds. The programs wake the
    /// reader only when the ring is a quarter full (a wakeup per event costs the traced
    /// process an inter-processor interrupt), so this bounds the delay of each event.
    pub poll_interval_ms: u64,
    /// Capacity of the bounded channel from the ring-buffer reader to the pipeline, in events.
    pub channel_capacity: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            watch_ports: Vec::new(),
            watch_runtime_ports: false,
            tenant_header: "x-tenant-id".into(),
            conversation_header: "x-conversation-id".into(),
            // Heads are recorded at their real length, so 2 MiB holds about half a second of
            // 10k requests/s: five times the reader's interval, and the programs wake the
            // reader at a quarter full (~125 ms at that rate). The agent's RSS counts the ring
            // twice (its pages are mapped twice so that a record can wrap around the end): 4
            // MiB was 8 MiB of the RSS target's 64 (docs/performance.md).
            ring_buffer_bytes: 2 * 1024 * 1024,
            // The correlator's tick: draining more often finds nothing sooner (see
            // docs/kernel-source.md) and each timer wakeup costs the agent CPU.
            poll_interval_ms: 100,
            channel_capacity: 65_536,
        }
    }
}

impl KernelConfig {
    /// The ports to watch: the configured ones plus, when asked, the runtimes' defaults;
    /// sorted, without duplicates.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports = self.watch_ports.clone();
        if self.watch_runtime_ports {
            ports.extend_from_slice(RUNTIME_DEFAULT_PORTS);
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}
