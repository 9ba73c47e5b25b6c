//! Project tasks: `cargo xtask <setup|build|test|bench|demo|deploy-check|gpu-check|fuzz>`.
//!
//! One file per subcommand; every external command goes through `util::run`, which prints it
//! and names it when it fails. `setup` decides what each task needs installed.

mod bench;
mod build;
mod demo;
mod deploy_check;
mod doc_links;
mod fuzz;
mod gpu_check;
mod real_vllm;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "inferwatch project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the demo or the tests need (Debian packages as root, the Python venv,
    /// cargo-deny); without root, name what is missing and the command that installs it.
    Setup(setup::SetupArgs),
    /// Build the agent (debug unless --release).
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Setup, then fmt --check, clippy -D warnings, unit tests and the kernel tests (as root).
    Test,
    /// The agent against the bundled testbed: a scenario mixing the four problems, findings live.
    /// Installs what the build needs first (as root; without root it says what to run).
    Demo {
        /// Scenario name under tests/scenarios/ (testbed runtime).
        #[arg(long, default_value = "demo")]
        scenario: String,
        /// The runtime: the bundled testbed (default, fast) or the real vLLM.
        #[arg(long, value_enum, default_value = "testbed")]
        runtime: demo::Runtime,
    },
    /// The NVML source on a real NVIDIA GPU with PyTorch (tests/gpu-check/gpu_check.sh): builds
    /// the `nvml_dump` example (release) unless `--bin` names a prebuilt one.
    GpuCheck {
        /// A prebuilt `nvml_dump` (carried to the GPU machine) instead of building one.
        #[arg(long)]
        bin: Option<std::path::PathBuf>,
    },
    /// Validate deploy/: alert rules (promtool), manifests, the ConfigMap's config, the dashboard,
    /// and that the docs list every config key, metric and span attribute.
    DeployCheck,
    /// Benchmarks: `kernel` (overhead of the attached programs, reader throughput), `otlp`,
    /// `conversations`, `agent` (the whole agent under load from the testbed, and vs rotel).
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        which: bench::Which,
        #[command(flatten)]
        agent: bench::AgentArgs,
        #[command(flatten)]
        kernel: bench::KernelArgs,
    },
    /// The libFuzzer targets of fuzz/ through cargo-fuzz (installed if missing), 600 s each.
    Fuzz(fuzz::FuzzArgs),
}

/// Runs the task; an error is printed as one paragraph (the `{:#}` chain), never as a debug
/// dump with a backtrace, whatever `RUST_BACKTRACE` says.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup(args) => setup::task(&args),
        Task::Build { release } => build::task(release),
        Task::Test => test::task(),
        Task::Bench {
            which,
            agent,
            kernel,
        } => bench::task(which, &agent, &kernel),
        Task::Demo { scenario, runtime } => demo::task(&scenario, runtime),
        Task::GpuCheck { bin } => gpu_check::task(bin.as_deref()),
        Task::DeployCheck => deploy_check::run(),
        Task::Fuzz(args) => fuzz::task(args),
    }
}
