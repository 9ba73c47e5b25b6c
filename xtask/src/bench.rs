//! `cargo xtask bench <which>`: runs a benchmark binary in release mode.

use clap::ValueEnum;

use crate::util::{cargo, run};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// Loopback request loop with the programs attached vs detached, and the reader's ceiling.
    Kernel,
}

pub fn task(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Kernel => run_kernel(),
    }
}

fn run_kernel() -> anyhow::Result<()> {
    run(cargo().args(["bench", "-p", "inferwatch", "--bench", "kernel"]))
}
