//! Builds every stage, then runs them: sources -> correlate stage -> sinks.
//!
//! The pipeline is built from a [`RunConfig`] (the configuration resolved against this node).
//! `correlate` ([`CorrelateStage`]) routes the sources' inputs to the correlator and its
//! outputs to the sinks; `held` keeps runtime request spans until their join; `summary`
//! ([`FindingSummary`]) logs the findings.
//!
//! Every stage is constructed before any starts. A source that cannot be built here (no BTF, no
//! privileges, a port in use) is logged once and left out: the agent runs on what it has. The
//! queues between stages are bounded; a full queue drops and counts, it never blocks a source.
//!
//! Shutdown order: the sources stop first, the correlate stage settles what it holds and
//! forwards it, then the sinks flush (each for at most its configured time) and the kernel
//! programs are detached.

mod correlate;
mod held;
#[cfg(test)]
mod otlp_tests;
mod summary;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub use correlate::CorrelateStage;
pub use summary::FindingSummary;

use summary::log_findings;

use crate::config::RunConfig;
use crate::correlator::Correlator;
use crate::internal_events::{
    AgentMetrics, CpuLabels, ErrorChain, SourceDropLabels, SourceLabels, advance_to,
};
use crate::model::{GpuSample, KernelEvent, KvEventBatch, UnixNanos};
use crate::sinks::file::{FileSink, FileSinkError};
use crate::sinks::otlp::{OtlpExportError, OtlpExporter};
use crate::sinks::prometheus::findings::FindingMetrics;
use crate::sinks::prometheus::{PrometheusError, PrometheusSink, Readiness};
use crate::sinks::{SinkReceiver, SinkSender};
use crate::sources::channel::{SourceReceiver, source_channel};
use crate::sources::kernel::{CounterMap, KernelSource, KernelStats, batch_capacity};
use crate::sources::kvevents::{KvEventsCounters, KvEventsSource};
use crate::sources::nvml::{NvmlCounters, NvmlSource};
use crate::sources::otlp::{AdaptedRequest, OtlpReceiver};
use crate::sources::procfs::{ProcReader, ServedModels};

/// How often the correlator's clock advances (and settled spans are forwarded).
const TICK: Duration = Duration::from_millis(100);
/// How often source counters are copied into the metrics.
const MONITOR: Duration = Duration::from_secs(1);

/// No source could start: the agent has nothing to observe.
#[derive(Debug, thiserror::Error)]
#[error("no source could start ({})", reasons.join("; "))]
pub struct NoSourceError {
    /// Why each source is not running.
    pub reasons: Vec<String>,
}

/// Errors of building or running the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The configured OTLP exporter could not be built.
    #[error("building the OTLP exporter to {endpoint}")]
    Exporter {
        /// The export endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: OtlpExportError,
    },
    /// The configured file sink could not be opened.
    #[error("opening the file sink {path:?}")]
    FileSink {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: FileSinkError,
    },
    /// No source could start.
    #[error(transparent)]
    NoSource(#[from] NoSourceError),
    /// The Prometheus endpoint could not be started.
    #[error("starting the Prometheus endpoint")]
    Prometheus(#[source] PrometheusError),
    /// A kernel event could not be printed (`--print-events`).
    #[error("printing a kernel event")]
    PrintEvent(#[source] serde_json::Error),
}

/// Options of a run that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print each kernel event as a JSON line on stdout.
    pub print_events: bool,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// Addresses the running pipeline listens on (ephemeral ports resolved), for tests and logs.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// OTLP/gRPC receiver.
    pub otlp_grpc: Option<SocketAddr>,
    /// OTLP/HTTP receiver.
    pub otlp_http: Option<SocketAddr>,
    /// Prometheus `/metrics`.
    pub metrics: Option<SocketAddr>,
}

struct KernelParts {
    source: KernelSource,
    stats: Arc<KernelStats>,
    counters: Arc<CounterMap>,
}

/// The built pipeline.
pub struct Pipeline {
    options: RunOptions,
    kernel: Option<KernelParts>,
    kernel_capacity: usize,
    nvml: Option<NvmlSource>,
    nvml_capacity: usize,
    kv_events: Option<KvEventsSource>,
    kv_capacity: usize,
    otlp: Option<(OtlpReceiver, SourceReceiver<AdaptedRequest>)>,
    exporter: Option<(OtlpExporter, SinkReceiver)>,
    file: Option<(FileSink, SinkReceiver)>,
    prometheus: Option<PrometheusSink>,
    readiness: Readiness,
    stage: CorrelateStage,
    metrics: Arc<AgentMetrics>,
    endpoints: Endpoints,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("kernel", &self.kernel.is_some())
            .field("otlp", &self.otlp.is_some())
            .field("exporter", &self.exporter.is_some())
            .field("file", &self.file.is_some())
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn now_unix_nanos() -> UnixNanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Pipeline {
    /// Builds every stage. Sources that cannot run here are logged and left out; a sink that
    /// is configured but cannot be built is an error (its output would be lost silently).
    ///
    /// # Errors
    /// A configured sink that cannot be built, or [`NoSourceError`] when no source can run.
    pub async fn build(config: RunConfig, options: RunOptions) -> Result<Self, PipelineError> {
        let RunConfig {
            agent: config,
            export,
            listeners,
        } = config;
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let finding_metrics = Arc::new(FindingMetrics::register(&mut registry));
        let mut endpoints = Endpoints::default();

        // Sinks first: the sources' output needs somewhere to go.
        let mut sinks: Vec<SinkSender> = Vec::new();
        let exporter = match export {
            Some(resolved) => {
                let endpoint = resolved.endpoint.clone();
                let exporter = OtlpExporter::build(&config.export, resolved, Arc::clone(&metrics))
                    .map_err(|source| PipelineError::Exporter {
                        endpoint: endpoint.clone(),
                        source,
                    })?;
                let (tx, rx) = config.export.queue(Arc::clone(&metrics));
                sinks.push(tx);
                tracing::info!(%endpoint, "exporting spans over OTLP");
                Some((exporter, rx))
            }
            None => None,
        };
        let file = if config.file.enabled {
            let sink = FileSink::build(&config.file, Arc::clone(&metrics))
                .await
                .map_err(|source| PipelineError::FileSink {
                    path: config.file.path.clone(),
                    source,
                })?;
            let (tx, rx) = config.file.queue(Arc::clone(&metrics));
            sinks.push(tx);
            tracing::info!(path = ?config.file.path, "writing spans as OTLP JSON lines");
            Some((sink, rx))
        } else {
            None
        };
        if sinks.is_empty() {
            tracing::warn!(
                "no span sink configured (export.endpoint / OTEL_EXPORTER_OTLP_ENDPOINT or [file]); findings go to the log and metrics only"
            );
        }

        // Servers that listened before the agent started (found by `RunConfig::resolve`): the
        // programs only see later listen() calls.
        let watched = config.kernel.ports();
        let existing: Vec<KernelEvent> = listeners
            .iter()
            .filter(|l| watched.contains(&l.port))
            .map(|l| KernelEvent {
                ts: now_unix_nanos(),
                pid: Some(l.pid),
                kind: crate::model::KernelEventKind::Listen {
                    conn: crate::model::ConnId(0),
                    port: l.port,
                },
            })
            .collect();

        // Why each source is not running, for the one error when none is.
        let mut not_running: Vec<String> = Vec::new();
        let kernel = if !config.kernel.enabled {
            tracing::info!("kernel source disabled in the config");
            not_running.push("kernel: disabled in the config".into());
            None
        } else if config.kernel.ports().is_empty() {
            tracing::warn!(
                "kernel source: no port to watch (--watch-port or kernel.watch_ports); not started"
            );
            not_running.push("kernel: no port to watch".into());
            None
        } else {
            match KernelSource::build(&config.kernel) {
                Ok(source) => {
                    tracing::info!(ports = ?config.kernel.ports(), "kernel source attached");
                    Some(KernelParts {
                        stats: source.stats(),
                        counters: source.counters(),
                        source,
                    })
                }
                Err(err) => {
                    tracing::error!(error = %ErrorChain(&err), "kernel source unavailable; running without it");
                    not_running.push(format!("kernel: {}", ErrorChain(&err)));
                    None
                }
            }
        };

        let nvml = if config.nvml.enabled {
            match NvmlSource::build(&config.nvml) {
                Ok(source) => {
                    tracing::info!(
                        library = source.library(),
                        period_ms = config.nvml.period_ms,
                        "NVML source started"
                    );
                    Some(source)
                }
                Err(err) => {
                    tracing::warn!(error = %ErrorChain(&err), "NVML source unavailable; running without GPU data");
                    not_running.push(format!("NVML: {}", ErrorChain(&err)));
                    None
                }
            }
        } else {
            not_running.push("NVML: disabled in the config".into());
            None
        };

        let kv_events = if config.kv_events.endpoints.is_empty() && !config.kv_events.discover {
            None
        } else {
            match KvEventsSource::build(config.kv_events.clone()) {
                Ok(source) => Some(source),
                Err(err) => {
                    tracing::warn!(error = %ErrorChain(&err), "KV event source unavailable; evictions are attributed from spans only");
                    None
                }
            }
        };

        let otlp = if config.otlp.enabled {
            let (tx, rx) = crate::sources::otlp::channel(&config.otlp, &metrics);
            let receiver = OtlpReceiver::build(
                &config.otlp,
                tx,
                Arc::clone(&metrics),
                config.privacy.hasher(),
            );
            match receiver.await {
                Ok(receiver) => {
                    endpoints.otlp_grpc = Some(receiver.grpc_addr());
                    endpoints.otlp_http = Some(receiver.http_addr());
                    tracing::info!(grpc = %receiver.grpc_addr(), http = %receiver.http_addr(), "OTLP receiver listening");
                    Some((receiver, rx))
                }
                Err(err) => {
                    tracing::error!(error = %ErrorChain(&err), "OTLP receiver unavailable; running without runtime spans");
                    not_running.push(format!("OTLP receiver: {}", ErrorChain(&err)));
                    None
                }
            }
        } else {
            not_running.push("OTLP receiver: disabled in the config".into());
            None
        };
        // contract §6: run on whatever works; but with no source at all the agent would only
        // serve empty metrics, which hides the failure from the orchestrator. Exit instead.
        // A KV source that only looks for runtimes is not a source of its own.
        let kv_configured = kv_events.as_ref().is_some_and(|k| !k.discovery_only());
        if kernel.is_none() && nvml.is_none() && otlp.is_none() && !kv_configured {
            return Err(NoSourceError {
                reasons: not_running,
            }
            .into());
        }

        let readiness = Readiness::default();
        let prometheus = if config.prometheus.enabled {
            let sink = PrometheusSink::build(&config.prometheus, registry, readiness.clone())
                .await
                .map_err(PipelineError::Prometheus)?;
            endpoints.metrics = sink.local_addr();
            Some(sink)
        } else {
            None
        };

        // Identity of the processes the sources name, read once per pid from /proc.
        let mut procfs = ProcReader::new("/proc", config.correlator.gpu.max_processes.max(1));
        let mut stage = CorrelateStage::new(
            Correlator::new(config.correlator.clone()),
            Box::new(move |pid| procfs.lineage_if_new(pid)),
            sinks,
            Arc::clone(&finding_metrics),
        )
        .with_tenant_hasher(config.privacy.hasher())
        .with_served_models({
            let mut models = ServedModels::new("/proc", config.correlator.gpu.max_processes.max(1));
            Box::new(move |pid| models.model_of(pid))
        });
        for event in existing {
            stage.on_kernel(event);
        }
        Ok(Self {
            options,
            kernel,
            kernel_capacity: config.kernel.channel_capacity,
            nvml,
            nvml_capacity: config.nvml.channel_capacity,
            kv_events,
            kv_capacity: config.kv_events.channel_capacity,
            otlp,
            exporter,
            file,
            prometheus,
            readiness,
            stage,
            metrics,
            endpoints,
        })
    }

    /// Where the pipeline listens.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Runs until `shutdown` (SIGTERM / SIGINT) or the configured duration.
    ///
    /// # Errors
    /// [`PipelineError::PrintEvent`] when `--print-events` cannot write an event.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let Self {
            options,
            kernel,
            kernel_capacity,
            nvml,
            nvml_capacity,
            kv_events,
            kv_capacity,
            otlp,
            exporter,
            file,
            prometheus,
            readiness,
            mut stage,
            metrics,
            ..
        } = self;
        let sources_stop = CancellationToken::new();
        let sinks_stop = CancellationToken::new();
        let mut sources = tokio::task::JoinSet::new();
        let mut sinks = tokio::task::JoinSet::new();

        if let Some((exporter, rx)) = exporter {
            sinks.spawn(exporter.run(rx, sinks_stop.clone()));
        }
        if let Some((sink, rx)) = file {
            sinks.spawn(sink.run(rx, sinks_stop.clone()));
        }
        if let Some(prometheus) = prometheus {
            let token = sinks_stop.clone();
            sinks.spawn(async move {
                if let Err(err) = prometheus.run(token).await {
                    tracing::error!(error = %ErrorChain(&err), "Prometheus endpoint stopped");
                }
            });
        }

        let (kernel_tx, mut kernel_rx) =
            source_channel::<Vec<KernelEvent>>("kernel", batch_capacity(kernel_capacity), &metrics);
        let mut kernel_monitor = None;
        if let Some(parts) = kernel {
            kernel_monitor = Some((Arc::clone(&parts.stats), Arc::clone(&parts.counters)));
            let token = sources_stop.clone();
            sources.spawn(async move {
                match parts.source.run(kernel_tx, token).await {
                    // Dropping the probes detaches every program.
                    Ok(probes) => drop(probes),
                    Err(err) => {
                        tracing::error!(error = %ErrorChain(&err), "kernel source stopped")
                    }
                }
            });
        } else {
            drop(kernel_tx);
        }
        let (gpu_tx, mut gpu_rx) = source_channel::<GpuSample>("nvml", nvml_capacity, &metrics);
        let mut nvml_counters = None;
        let mut gpu_open = nvml.is_some();
        if let Some(source) = nvml {
            nvml_counters = Some(source.counters());
            let handle = source.spawn(gpu_tx, sources_stop.clone());
            sources.spawn(async move {
                if let Err(err) = handle.await {
                    tracing::error!(error = %err, "NVML poller stopped");
                }
            });
        } else {
            drop(gpu_tx);
        }
        let (kv_tx, mut kv_rx) = source_channel::<KvEventBatch>("kv_events", kv_capacity, &metrics);
        let mut kv_open = kv_events.is_some();
        let mut kv_counters = None;
        if let Some(source) = kv_events {
            kv_counters = Some(source.counters());
            sources.spawn(source.run(kv_tx, sources_stop.clone()));
        } else {
            drop(kv_tx);
        }
        let mut span_rx = match otlp {
            Some((receiver, rx)) => {
                let token = sources_stop.clone();
                sources.spawn(async move {
                    if let Err(err) = receiver.run(token).await {
                        tracing::error!(error = %ErrorChain(&err), "OTLP receiver stopped");
                    }
                });
                Some(rx)
            }
            None => None,
        };

        if let Some(limit) = options.duration {
            let token = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                token.cancel();
            });
        }
        readiness.set(true);

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut monitor = tokio::time::interval(MONITOR);
        let mut kernel_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = kernel_rx.recv(), if kernel_open => match batch {
                    Some(batch) => {
                        for event in batch {
                            if options.print_events {
                                println!("{}", serde_json::to_string(&event).map_err(PipelineError::PrintEvent)?);
                            }
                            stage.on_kernel(event);
                        }
                    }
                    None => kernel_open = false,
                },
                sample = gpu_rx.recv(), if gpu_open => match sample {
                    Some(sample) => stage.on_gpu(sample),
                    None => gpu_open = false,
                },
                batch = kv_rx.recv(), if kv_open => match batch {
                    Some(batch) => stage.on_kv_events(batch),
                    None => kv_open = false,
                },
                batch = recv_spans(&mut span_rx) => match batch {
                    Some(batch) => stage.on_spans(batch),
                    None => span_rx = None,
                },
                _ = tick.tick() => {
                    stage.on_tick(now_unix_nanos());
                    log_findings(&mut stage);
                }
                _ = monitor.tick() => {
                    if let Some((stats, counters)) = &kernel_monitor {
                        update_kernel_metrics(&metrics, stats, counters);
                    }
                    if let Some(counters) = &kv_counters {
                        update_kv_events_metrics(&metrics, counters);
                    }
                    if let Some(counters) = &nvml_counters {
                        update_nvml_metrics(&metrics, counters);
                    }
                    stage.sync_gpu_metrics();
                }
            }
        }

        readiness.set(false);
        sources_stop.cancel();
        while sources.join_next().await.is_some() {}
        // Whatever the sources had queued, then a final settle: everything pending becomes due.
        while let Ok(batch) = kernel_rx.try_recv() {
            for event in batch {
                stage.on_kernel(event);
            }
        }
        while let Ok(sample) = gpu_rx.try_recv() {
            stage.on_gpu(sample);
        }
        if let Some(rx) = span_rx.as_mut() {
            while let Ok(batch) = rx.try_recv() {
                stage.on_spans(batch);
            }
        }
        stage.on_tick(now_unix_nanos() + stage.correlator().config().settle_horizon_ns());
        log_findings(&mut stage);
        stage.drain();
        drop(stage);
        sinks_stop.cancel();
        while sinks.join_next().await.is_some() {}
        Ok(())
    }
}

async fn recv_spans(rx: &mut Option<SourceReceiver<AdaptedRequest>>) -> Option<AdaptedRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn update_nvml_metrics(metrics: &AgentMetrics, counters: &NvmlCounters) {
    let nvml = SourceLabels {
        source: "nvml".into(),
    };
    advance_to(
        &metrics.events_received.get_or_create(&nvml),
        counters.samples_sent.load(Ordering::Relaxed),
    );
    for (reason, value) in [
        (
            "channel_full",
            counters.samples_dropped.load(Ordering::Relaxed),
        ),
        ("call_error", counters.call_errors.load(Ordering::Relaxed)),
    ] {
        let labels = SourceDropLabels {
            source: "nvml".into(),
            reason: reason.into(),
        };
        advance_to(&metrics.events_dropped.get_or_create(&labels), value);
    }
}

fn update_kv_events_metrics(metrics: &AgentMetrics, counters: &KvEventsCounters) {
    let kv = SourceLabels {
        source: "kv_events".into(),
    };
    advance_to(
        &metrics.events_received.get_or_create(&kv),
        counters.messages.load(Ordering::Relaxed),
    );
    for (reason, value) in [
        ("channel_full", counters.dropped.load(Ordering::Relaxed)),
        (
            "decode_error",
            counters.decode_errors.load(Ordering::Relaxed),
        ),
        ("sequence_gap", counters.missing.load(Ordering::Relaxed)),
        (
            "unknown_type",
            counters.unknown_events.load(Ordering::Relaxed),
        ),
    ] {
        let labels = SourceDropLabels {
            source: "kv_events".into(),
            reason: reason.into(),
        };
        advance_to(&metrics.events_dropped.get_or_create(&labels), value);
    }
}

fn update_kernel_metrics(metrics: &AgentMetrics, stats: &KernelStats, counters: &CounterMap) {
    let kernel = SourceLabels {
        source: "kernel".into(),
    };
    advance_to(
        &metrics.events_received.get_or_create(&kernel),
        stats.events.load(Ordering::Relaxed),
    );
    for (reason, value) in [
        ("channel_full", stats.channel_full.load(Ordering::Relaxed)),
        ("decode_error", stats.decode_errors.load(Ordering::Relaxed)),
        ("unknown_type", stats.unknown_types.load(Ordering::Relaxed)),
        (
            "exit_ringbuf_full",
            stats.exit_ringbuf_drops.load(Ordering::Relaxed),
        ),
        (
            "unparsed_head",
            stats.unparsed_heads.load(Ordering::Relaxed),
        ),
        (
            "response_without_id",
            stats.responses_without_id.load(Ordering::Relaxed),
        ),
    ] {
        let labels = SourceDropLabels {
            source: "kernel".into(),
            reason: reason.into(),
        };
        advance_to(&metrics.events_dropped.get_or_create(&labels), value);
    }
    match counters.read() {
        Ok(c) => {
            for (cpu, drops) in c.ringbuf_drops.iter().enumerate() {
                advance_to(
                    &metrics.ringbuf_drops.get_or_create(&CpuLabels {
                        cpu: cpu.to_string(),
                    }),
                    *drops,
                );
            }
            // Reset connections the kernel could not mark (socket storage not allocated): the
            // LocalClosed of their release is lost before the ring, a drop of the kernel source.
            let labels = SourceDropLabels {
                source: "kernel".into(),
                reason: "conn_state_alloc".into(),
            };
            advance_to(
                &metrics.events_dropped.get_or_create(&labels),
                c.conn_state_alloc.iter().sum(),
            );
        }
        Err(err) => tracing::debug!(error = %ErrorChain(&err), "reading the kernel counters"),
    }
}
