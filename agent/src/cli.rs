//! Command-line interface: parsed values only; resolution against the config file and the
//! environment happens in `config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// inferwatch: finds tokens billed after the client left, cold-start floors, cross-tenant
/// KV-cache evictions and GPU contention on an inference node.
#[derive(Debug, Parser)]
#[command(name = "inferwatch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Print, per source, whether it works on this node and why not.
    Check(CheckArgs),
}

/// Options shared by every subcommand.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    /// The TOML config file.
    #[arg(long, short = 'c', env = "INFERWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// A local TCP port to watch (repeatable); added to the config file's ports.
    #[arg(long = "watch-port", value_name = "PORT")]
    pub watch_ports: Vec<u16>,
}

/// Options of `inferwatch check`.
#[derive(Debug, Args, Clone, Default)]
pub struct CheckArgs {
    /// Options shared with `run`.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Exit non-zero when any check fails (by default only an invalid configuration does: the
    /// agent runs on whatever sources work).
    #[arg(long)]
    pub strict: bool,
}

/// Options of `inferwatch run`.
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// Options shared with `check`.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print each kernel event as a JSON line on stdout (debugging).
    #[arg(long)]
    pub print_events: bool,
    /// Stop after this many seconds (tests, demos); runs until SIGTERM / SIGINT otherwise.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
