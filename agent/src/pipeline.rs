//! Builds every stage, then runs them: sources -> correlator -> sinks.
//!
//! Every stage is constructed before any starts (a source that cannot be built is logged once
//! and left out); the queues between stages are bounded.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::check::error_chain;
use crate::config::AgentConfig;
use crate::model::KernelEvent;
use crate::sources::kernel::KernelSource;

/// Options of a run that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print each kernel event as a JSON line on stdout.
    pub print_events: bool,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// The built pipeline.
pub struct Pipeline {
    config: AgentConfig,
    options: RunOptions,
    kernel: Option<KernelSource>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("kernel", &self.kernel.is_some())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Builds every stage. Sources that cannot run here are logged and left out.
    pub fn build(config: AgentConfig, options: RunOptions) -> Self {
        let kernel = if !config.kernel.enabled {
            tracing::info!("kernel source disabled in the config");
            None
        } else if config.kernel.ports().is_empty() {
            tracing::warn!(
                "kernel source: no port to watch (--watch-port or kernel.watch_ports); not started"
            );
            None
        } else {
            match KernelSource::build(&config.kernel) {
                Ok(source) => {
                    tracing::info!(ports = ?config.kernel.ports(), "kernel source attached");
                    Some(source)
                }
                Err(err) => {
                    tracing::error!(error = %error_chain(&err), "kernel source unavailable; running without it");
                    None
                }
            }
        };
        Self {
            config,
            options,
            kernel,
        }
    }

    /// Runs until `shutdown` (SIGTERM / SIGINT) or the configured duration.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            options,
            kernel,
        } = self;
        let (kernel_tx, mut kernel_rx) =
            mpsc::channel::<KernelEvent>(config.kernel.channel_capacity);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(source) = kernel {
            let token = shutdown.clone();
            tasks.spawn(async move {
                match source.run(kernel_tx, token).await {
                    // Dropping the probes detaches every program.
                    Ok(probes) => drop(probes),
                    Err(err) => {
                        tracing::error!(error = %error_chain(&err), "kernel source stopped")
                    }
                }
            });
        } else {
            drop(kernel_tx);
        }
        if let Some(limit) = options.duration {
            let token = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                token.cancel();
            });
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = kernel_rx.recv() => match event {
                    Some(event) => {
                        if options.print_events {
                            println!("{}", serde_json::to_string(&event)?);
                        }
                    }
                    None => shutdown.cancelled().await,
                },
            }
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}
