//! The `inferwatch` binary: parse, resolve the config, build every stage, run.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use inferwatch::cli::{Cli, Command};
use inferwatch::config::{AgentConfig, RunConfig};
use inferwatch::internal_events::ErrorChain;
use inferwatch::pipeline::{Pipeline, RunOptions};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    inferwatch::alloc::tune();
    let cli = Cli::parse();
    init_logging();
    // An error is one paragraph, its causes joined on one line, whatever RUST_BACKTRACE says
    // (returning `anyhow::Result` from `main` would print a debug dump with a backtrace).
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("inferwatch: {}", ErrorChain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFERWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(args) => {
            let config = AgentConfig::resolve(&args.common, std::env::vars())
                .context("loading the configuration")?;
            let mut items = inferwatch::check::kernel_checks(&config);
            items.extend(inferwatch::check::nvml_checks(&config.nvml));
            print!("{}", inferwatch::check::render(&items));
            let failed = items.iter().filter(|i| !i.ok).count();
            println!(
                "configuration ok; {} of {} checks pass",
                items.len() - failed,
                items.len()
            );
            Ok(if args.strict && failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run(args) => {
            let config = AgentConfig::resolve(&args.common, std::env::vars())
                .context("loading the configuration")?;
            let config =
                RunConfig::resolve(config, std::env::vars(), std::path::Path::new("/proc"))?;
            let options = RunOptions {
                print_events: args.print_events,
                duration: args.duration.map(Duration::from_secs_f64),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone())?;
                let pipeline = Pipeline::build(config, options).await?;
                // The pipeline's loop runs as a task on the workers, not on this thread inside
                // `block_on`: a task woken by the kernel reader or the OTLP receiver then runs
                // on the worker that woke it (tokio's LIFO slot) instead of unparking this
                // thread once per event (a futex wake and two context switches each).
                tokio::spawn(pipeline.run(shutdown))
                    .await
                    .context("the pipeline task panicked")??;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}
