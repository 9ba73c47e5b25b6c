//! The agent's own health metrics, registered once at start-up with typed label sets.
//!
//! Everything here is updated by the `emit()` of an internal event (the parent module) or by a
//! queue's fill gauge; the Prometheus sink's scrape handler only encodes.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The OTLP transport a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with a protobuf body.
    HttpProtobuf,
    /// OTLP/HTTP with a JSON body.
    HttpJson,
}

/// Why the receiver refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The body did not decode.
    Malformed,
    /// The body was larger than `max_request_bytes`.
    TooLarge,
    /// The content type is not protobuf or JSON.
    UnsupportedMediaType,
    /// Too many attributes or too deep an `AnyValue`.
    LimitExceeded,
    /// Missing or wrong bearer token.
    Unauthenticated,
    /// The pipeline's queue was full.
    QueueFull,
}

/// Where spans were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropStage {
    /// The receiver -> pipeline queue was full.
    ReceiverQueue,
    /// A sink's queue was full.
    SinkQueue,
    /// The backend refused the spans with a non-retryable error.
    Rejected,
    /// Shutdown came before the spans could be flushed.
    Shutdown,
}

macro_rules! snake_label {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),*
                }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

snake_label!(Protocol { Grpc => "grpc", HttpProtobuf => "http_protobuf", HttpJson => "http_json" });
snake_label!(RejectReason {
    Malformed => "malformed",
    TooLarge => "too_large",
    UnsupportedMediaType => "unsupported_media_type",
    LimitExceeded => "limit_exceeded",
    Unauthenticated => "unauthenticated",
    QueueFull => "queue_full",
});
snake_label!(DropStage {
    ReceiverQueue => "receiver_queue",
    SinkQueue => "sink_queue",
    Rejected => "rejected",
    Shutdown => "shutdown",
});

/// Label set `{protocol}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// The transport.
    pub protocol: Protocol,
}

/// Label set `{protocol, reason}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    /// The transport.
    pub protocol: Protocol,
    /// Why.
    pub reason: RejectReason,
}

/// Label set `{sink}`: `otlp` or `file`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink's name.
    pub sink: &'static str,
}

/// Label set `{sink, stage}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DropLabels {
    /// The sink's (or `receiver`'s) name.
    pub sink: &'static str,
    /// Where.
    pub stage: DropStage,
}

/// Label set `{queue}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueueLabels {
    /// The queue's name.
    pub queue: &'static str,
}

/// Label set `{source}` of a source -> pipeline channel: `kernel`, `nvml`, `kv_events` or
/// `otlp`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceQueueLabels {
    /// The source's name.
    pub source: &'static str,
}

/// Label set `{source}` of `inferwatch_events_received_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// `kernel`, `otlp`, `nvml`, ...
    pub source: String,
}

/// Label set `{source, reason}` of `inferwatch_events_dropped_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceDropLabels {
    /// The source.
    pub source: String,
    /// Why the events were lost.
    pub reason: String,
}

/// Label set `{cpu}` of `inferwatch_kernel_ringbuf_drops_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CpuLabels {
    /// The CPU index.
    pub cpu: String,
}

/// Label set `{runtime, adapted}` of `inferwatch_runtime_spans_total`: the runtime a received
/// span came from (`vllm`, `sglang`, `tgi`, `genai`, `unknown`) and whether an adapter read it
/// as a request (`true` / `false`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuntimeSpanLabels {
    /// The runtime.
    pub runtime: &'static str,
    /// `true` when an adapter read the span as a request.
    pub adapted: &'static str,
}

/// The agent's health metrics. Create one at start-up, share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// `inferwatch_otlp_spans_received_total{protocol}`.
    pub spans_received: Family<ProtocolLabels, Counter>,
    /// `inferwatch_otlp_requests_rejected_total{protocol,reason}`.
    pub requests_rejected: Family<RejectLabels, Counter>,
    /// `inferwatch_spans_exported_total{sink}`.
    pub spans_exported: Family<SinkLabels, Counter>,
    /// `inferwatch_spans_dropped_total{sink,stage}`.
    pub spans_dropped: Family<DropLabels, Counter>,
    /// `inferwatch_export_errors_total{sink}`.
    pub export_errors: Family<SinkLabels, Counter>,
    /// `inferwatch_queue_depth{queue}`: spans waiting in a named queue.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// `inferwatch_queue_capacity{queue}`: the queue's bound, in spans.
    pub queue_capacity: Family<QueueLabels, Gauge>,
    /// `inferwatch_runtime_spans_total{runtime,adapted}`.
    pub runtime_spans: Family<RuntimeSpanLabels, Counter>,
    /// `inferwatch_events_received_total{source}`.
    pub events_received: Family<SourceLabels, Counter>,
    /// `inferwatch_events_dropped_total{source,reason}`.
    pub events_dropped: Family<SourceDropLabels, Counter>,
    /// `inferwatch_kernel_ringbuf_drops_total{cpu}`: records the kernel could not queue.
    pub ringbuf_drops: Family<CpuLabels, Counter>,
    /// `inferwatch_source_queue_depth{source}`: messages waiting in a source -> pipeline
    /// channel.
    pub source_queue_depth: Family<SourceQueueLabels, Gauge>,
    /// `inferwatch_source_queue_capacity{source}`: the channel's bound, in messages.
    pub source_queue_capacity: Family<SourceQueueLabels, Gauge>,
}

impl AgentMetrics {
    /// Creates the metrics and registers every family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "inferwatch_otlp_spans_received",
            "Spans received by the OTLP receiver",
            m.spans_received.clone(),
        );
        registry.register(
            "inferwatch_otlp_requests_rejected",
            "OTLP requests refused by the receiver",
            m.requests_rejected.clone(),
        );
        registry.register(
            "inferwatch_spans_exported",
            "Spans delivered by a sink",
            m.spans_exported.clone(),
        );
        registry.register(
            "inferwatch_spans_dropped",
            "Spans dropped before delivery",
            m.spans_dropped.clone(),
        );
        registry.register(
            "inferwatch_export_errors",
            "Failed export attempts",
            m.export_errors.clone(),
        );
        registry.register(
            "inferwatch_queue_depth",
            "Spans waiting in a named queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "inferwatch_queue_capacity",
            "Capacity of a named queue, in spans",
            m.queue_capacity.clone(),
        );
        registry.register(
            "inferwatch_runtime_spans",
            "Spans received, by the runtime that sent them and whether an adapter read them as a request",
            m.runtime_spans.clone(),
        );
        registry.register(
            "inferwatch_events_received",
            "Events received per source",
            m.events_received.clone(),
        );
        registry.register(
            "inferwatch_events_dropped",
            "Events lost per source and reason",
            m.events_dropped.clone(),
        );
        registry.register(
            "inferwatch_kernel_ringbuf_drops",
            "Kernel records lost because the ring buffer was full, per CPU",
            m.ringbuf_drops.clone(),
        );
        registry.register(
            "inferwatch_source_queue_depth",
            "Messages waiting in a source's channel to the pipeline",
            m.source_queue_depth.clone(),
        );
        registry.register(
            "inferwatch_source_queue_capacity",
            "Capacity of a source's channel to the pipeline, in messages",
            m.source_queue_capacity.clone(),
        );
        m
    }

    /// A value of `spans_dropped` (for tests and `inferwatch check`).
    pub fn dropped(&self, sink: &'static str, stage: DropStage) -> u64 {
        self.spans_dropped
            .get_or_create(&DropLabels { sink, stage })
            .get()
    }

    /// A value of `spans_exported`.
    pub fn exported(&self, sink: &'static str) -> u64 {
        self.spans_exported
            .get_or_create(&SinkLabels { sink })
            .get()
    }

    /// A value of `export_errors`.
    pub fn errors(&self, sink: &'static str) -> u64 {
        self.export_errors.get_or_create(&SinkLabels { sink }).get()
    }

    /// A value of `spans_received`.
    pub fn received(&self, protocol: Protocol) -> u64 {
        self.spans_received
            .get_or_create(&ProtocolLabels { protocol })
            .get()
    }

    /// A value of `requests_rejected`.
    pub fn rejected(&self, protocol: Protocol, reason: RejectReason) -> u64 {
        self.requests_rejected
            .get_or_create(&RejectLabels { protocol, reason })
            .get()
    }

    /// The current depth of a queue.
    pub fn depth(&self, queue: &'static str) -> i64 {
        self.queue_depth.get_or_create(&QueueLabels { queue }).get()
    }

    /// The current depth of a source's channel.
    pub fn source_depth(&self, source: &'static str) -> i64 {
        self.source_queue_depth
            .get_or_create(&SourceQueueLabels { source })
            .get()
    }

    /// The bound of a source's channel.
    pub fn source_capacity(&self, source: &'static str) -> i64 {
        self.source_queue_capacity
            .get_or_create(&SourceQueueLabels { source })
            .get()
    }
}

/// Adds to a counter so that it reaches `total` (for sources that keep their own monotonic
/// totals); never goes back.
pub fn advance_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_to_is_monotonic() {
        let c = Counter::<u64>::default();
        advance_to(&c, 5);
        advance_to(&c, 3);
        assert_eq!(c.get(), 5);
    }
}
