//! `cargo xtask bench <which>`: runs a benchmark binary in release mode.

use clap::ValueEnum;

use crate::util::{cargo, run};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// Loopback request loop with the programs attached vs detached, and the reader's ceiling.
    Kernel,
    /// OTLP spans/s through receive -> correlate stage -> export encode vs prost decode alone.
    Otlp,
}

pub fn task(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Kernel => run_kernel(),
        Which::Otlp => run_otlp(),
    }
}

fn run_kernel() -> anyhow::Result<()> {
    run(cargo().args(["bench", "-p", "inferwatch", "--bench", "kernel"]))
}

fn run_otlp() -> anyhow::Result<()> {
    run(cargo().args(["bench", "-p", "inferwatch", "--bench", "otlp_throughput"]))
}
