//! The list of fuzz targets, shared by the agent (`inferwatch::fuzzing`, which runs their
//! bodies) and `cargo xtask fuzz` (which includes this file with `#[path]` to name and bound
//! the cargo-fuzz runs), so that a target is declared once. Depends on nothing but `core`.

/// The fuzz targets, by the name of their folders under `fuzz/regressions/` and the working
/// corpus `target/fuzz/corpus/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// OTLP/protobuf and OTLP/JSON trace requests through `validate` and the adapters.
    Otlp,
    /// Kernel ring-buffer records, HTTP request heads and `traceparent` values.
    KernelHead,
    /// KV event messages (vLLM's msgpack `KVEventBatch`).
    KvEvents,
    /// The agent's TOML config plus `INFERWATCH_*` overrides.
    Config,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 4] = [
        Target::Otlp,
        Target::KernelHead,
        Target::KvEvents,
        Target::Config,
    ];

    /// The cargo-fuzz target name (also the corpus folder name).
    pub fn name(self) -> &'static str {
        match self {
            Target::Otlp => "otlp",
            Target::KernelHead => "kernel_head",
            Target::KvEvents => "kv_events",
            Target::Config => "config",
        }
    }

    /// What the target feeds its input to, one line (the variants' docs, for `--help`).
    pub fn about(self) -> &'static str {
        match self {
            Target::Otlp => {
                "OTLP/protobuf and OTLP/JSON requests through `validate` and the runtime adapters"
            }
            Target::KernelHead => {
                "Kernel ring-buffer records, HTTP request heads, `traceparent` values"
            }
            Target::KvEvents => "vLLM KV event messages (msgpack)",
            Target::Config => "The TOML config plus `INFERWATCH_*` overrides",
        }
    }

    /// Longest input tried: above the largest real input of the kind (a kernel record is at
    /// most 24 + 16 + 2048 bytes), small enough to keep the executions fast.
    pub fn max_len(self) -> u32 {
        match self {
            Target::Otlp => 65_536,
            Target::KernelHead => 4_096,
            Target::KvEvents => 16_384,
            Target::Config => 8_192,
        }
    }
}
