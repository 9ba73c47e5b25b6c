//! `cargo xtask bench <which>`: runs a benchmark binary (release build) and prints its table.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::util::{cargo, is_root, root, run};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// Loopback request loop with the programs attached vs detached, and the reader's ceiling
    /// (root).
    Kernel,
    /// OTLP spans/s through receive -> correlate stage -> export encode vs prost decode alone.
    Otlp,
    /// The KV-eviction conversation table: bytes per conversation, lookups/s at 1M.
    Conversations,
    /// The whole agent binary against the testbed at fixed request rates (CPU, peak RSS, drops,
    /// detection delay, each next to a no-agent baseline), then its OTLP pass-through vs rotel
    /// (root).
    Agent,
}

/// Options of `bench agent` (ignored by the others).
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Seconds measured per rate (after a 5 s warm-up); 600 for the 10-minute run.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Request rates offered, requests/s, comma-separated.
    #[arg(long, default_value = "1000,10000")]
    pub rates: String,
    /// Share of requests whose client closes mid-stream (for the detection delay).
    #[arg(long, default_value_t = 0.02)]
    pub abort_share: f64,
    /// Skip the no-agent baseline at each rate.
    #[arg(long)]
    pub no_baseline: bool,
    /// `perf record -g` the agent over the window of the highest rate, into this file.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Another `inferwatch` binary (say, a build from before a change) to run at each rate too,
    /// in the same run.
    #[arg(long)]
    pub compare_agent: Option<PathBuf>,
    /// Rounds of the rotel pass-through comparison (0: skip it).
    #[arg(long, default_value_t = 5)]
    pub peer_rounds: usize,
}

/// Options of `bench kernel` (ignored by the others).
#[derive(Debug, Clone, Args)]
pub struct KernelArgs {
    /// Also run the bench on two diagnostic builds of the programs, to split the overhead:
    /// every program returning at once (what the attachments alone cost), then everything but
    /// the ring-buffer records; the real programs last (each build recompiles the agent).
    #[arg(long)]
    pub floor: bool,
}

/// The diagnostic builds of `bench kernel --floor`: label and the clang flags
/// (`INFERWATCH_EBPF_CFLAGS`, read by agent/build.rs); the real build last, so that the target
/// directory is left with it.
const KERNEL_FLOOR_BUILDS: &[(&str, &str)] = &[
    (
        "attachments only: every program returns at once",
        "-DIW_DIAG_EMPTY",
    ),
    (
        "everything but the ring: no record written",
        "-DIW_DIAG_NO_RING",
    ),
    ("the real programs", ""),
];

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
}

/// The `rotel-agent` binary that the `rotel` wheel in .venv ships (`cargo xtask setup`).
fn rotel_agent() -> Option<PathBuf> {
    let lib = root().join(".venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/rotel/rotel-agent"))
        .find(|p| p.exists())
}

pub fn task(which: Which, agent: &AgentArgs, kernel: &KernelArgs) -> anyhow::Result<()> {
    if matches!(which, Which::Kernel) && kernel.floor {
        for (label, cflags) in KERNEL_FLOOR_BUILDS {
            println!("== {label} (INFERWATCH_EBPF_CFLAGS={cflags:?})");
            run(cargo()
                .args(["bench", "-p", "inferwatch", "--bench", "kernel"])
                .env("INFERWATCH_EBPF_CFLAGS", cflags))?;
        }
        return Ok(());
    }
    let bench = match which {
        Which::Kernel => "kernel",
        Which::Otlp => "otlp_throughput",
        Which::Conversations => "conversations",
        Which::Agent => return agent_task(agent),
    };
    run(cargo().args(["bench", "-p", "inferwatch", "--bench", bench]))
}

fn agent_task(a: &AgentArgs) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("`cargo xtask bench agent` loads the agent's eBPF programs: run it as root");
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "inferwatch-testbed",
        "--bin",
        "iw-testbed",
    ]))?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "inferwatch", "--bench", "agent_load"])
        .env("IW_TESTBED_BIN", target_dir().join("release/iw-testbed"))
        .env("INFERWATCH_BENCH_DURATION", a.duration.to_string())
        .env("INFERWATCH_BENCH_RATES", &a.rates)
        .env("INFERWATCH_BENCH_ABORT_SHARE", a.abort_share.to_string())
        .env("INFERWATCH_BENCH_PEER_ROUNDS", a.peer_rounds.to_string());
    if a.no_baseline {
        cmd.env("INFERWATCH_BENCH_NO_BASELINE", "1");
    }
    if let Some(p) = &a.perf {
        cmd.env("INFERWATCH_BENCH_PERF", std::path::absolute(p)?);
    }
    if let Some(p) = &a.compare_agent {
        cmd.env("INFERWATCH_BENCH_COMPARE_AGENT", std::path::absolute(p)?);
    }
    match rotel_agent() {
        Some(r) if a.peer_rounds > 0 => {
            cmd.env("INFERWATCH_BENCH_ROTEL", r);
        }
        Some(_) => {}
        None => eprintln!(
            "no rotel-agent under .venv (cargo xtask setup installs the rotel wheel): the rotel comparison is skipped"
        ),
    }
    run(&mut cmd)
}
