//! The agent observing itself: one struct per internal event, whose `emit()` logs and counts
//! with a fixed label set (STYLE rule 10). The metric families they count into, with their
//! typed label sets, are in `metrics.rs`; sources and sinks both update them, and the
//! Prometheus sink only serves the registry they are registered in.

mod metrics;

use tracing::{debug, warn};

pub use self::metrics::{
    AgentMetrics, CpuLabels, DropLabels, DropStage, Protocol, ProtocolLabels, QueueLabels,
    RejectLabels, RejectReason, RuntimeSpanLabels, SinkLabels, SourceDropLabels, SourceLabels,
    SourceQueueLabels, advance_to,
};

/// The OTLP receiver accepted a request.
#[derive(Debug)]
pub struct OtlpSpansReceived {
    /// The transport.
    pub protocol: Protocol,
    /// Spans in the request.
    pub count: usize,
}

impl OtlpSpansReceived {
    /// Counts the spans.
    pub fn emit(&self, metrics: &AgentMetrics) {
        debug!(protocol = ?self.protocol, count = self.count, "OTLP spans received");
        metrics
            .spans_received
            .get_or_create(&ProtocolLabels {
                protocol: self.protocol,
            })
            .inc_by(self.count as u64);
    }
}

/// The OTLP receiver refused a request.
#[derive(Debug)]
pub struct OtlpRequestRejected<'a> {
    /// The transport.
    pub protocol: Protocol,
    /// Why.
    pub reason: RejectReason,
    /// Details for the log line.
    pub detail: &'a str,
}

impl OtlpRequestRejected<'_> {
    /// Logs at debug (a hostile client must not flood the log) and counts.
    pub fn emit(&self, metrics: &AgentMetrics) {
        debug!(protocol = ?self.protocol, reason = ?self.reason, detail = self.detail, "OTLP request rejected");
        metrics
            .requests_rejected
            .get_or_create(&RejectLabels {
                protocol: self.protocol,
                reason: self.reason,
            })
            .inc();
    }
}

/// Spans were dropped.
#[derive(Debug)]
pub struct SpansDropped {
    /// The sink (or `receiver`) that dropped them.
    pub sink: &'static str,
    /// Where.
    pub stage: DropStage,
    /// How many.
    pub count: usize,
}

impl SpansDropped {
    /// Logs and counts.
    pub fn emit(&self, metrics: &AgentMetrics) {
        warn!(sink = self.sink, stage = ?self.stage, count = self.count, "spans dropped");
        metrics
            .spans_dropped
            .get_or_create(&DropLabels {
                sink: self.sink,
                stage: self.stage,
            })
            .inc_by(self.count as u64);
    }
}

/// A sink delivered spans.
#[derive(Debug)]
pub struct SpansExported {
    /// The sink.
    pub sink: &'static str,
    /// How many.
    pub count: usize,
}

impl SpansExported {
    /// Logs at debug and counts.
    pub fn emit(&self, metrics: &AgentMetrics) {
        debug!(sink = self.sink, count = self.count, "spans exported");
        metrics
            .spans_exported
            .get_or_create(&SinkLabels { sink: self.sink })
            .inc_by(self.count as u64);
    }
}

/// An export attempt failed.
#[derive(Debug)]
pub struct ExportFailed<'a> {
    /// The sink.
    pub sink: &'static str,
    /// The error.
    pub error: &'a (dyn std::error::Error + 'static),
    /// Whether the sink will retry.
    pub retryable: bool,
}

impl ExportFailed<'_> {
    /// Logs and counts.
    pub fn emit(&self, metrics: &AgentMetrics) {
        warn!(sink = self.sink, retryable = self.retryable, error = %ErrorChain(self.error), "export failed");
        metrics
            .export_errors
            .get_or_create(&SinkLabels { sink: self.sink })
            .inc();
    }
}

/// Formats an error with its `source()` chain on one line (`outer: cause: root cause`), the way
/// `anyhow`'s `{:#}` does, for logs and `inferwatch check`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            // Some errors repeat their cause in their own message (aya's map errors,
            // libloading's): a cause already said is not said twice.
            let text = e.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = e.source();
        }
        Ok(())
    }
}
