//! `cargo xtask bench <which>`: runs a benchmark binary (release build) and prints its table.

use clap::ValueEnum;

use crate::util::{cargo, run};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// Loopback request loop with the programs attached vs detached, and the reader's ceiling
    /// (root).
    Kernel,
    /// OTLP spans/s through receive -> correlate stage -> export encode vs prost decode alone.
    Otlp,
    /// The KV-eviction conversation table: bytes per conversation, lookups/s at 1M.
    Conversations,
}

pub fn task(which: Which) -> anyhow::Result<()> {
    let bench = match which {
        Which::Kernel => "kernel",
        Which::Otlp => "otlp_throughput",
        Which::Conversations => "conversations",
    };
    run(cargo().args(["bench", "-p", "inferwatch", "--bench", bench]))
}
