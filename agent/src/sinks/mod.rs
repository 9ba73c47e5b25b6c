//! Sinks: where spans and metrics leave the agent.
//!
//! - [`otlp`]: forwards every received span (plus the agent's attributes and finding spans) to
//!   a backend over OTLP/gRPC or OTLP/HTTP;
//! - [`file`]: writes the same batches as OTLP JSON lines, for runs without a backend;
//! - [`prometheus`]: serves the agent's metrics, `/healthz` and `/readyz`.
//!
//! Spans reach the span sinks as [`SpanBatch`]es through a [`queue::SinkSender`]: the pipeline
//! may enrich a batch (see [`crate::otlp_wire::batch`]) before sending it.
//!
//! [`SpanBatch`]: crate::otlp_wire::batch::SpanBatch

pub mod file;
pub mod otlp;
pub mod prometheus;
pub mod queue;

pub use queue::{SinkReceiver, SinkSender, sink_queue};
