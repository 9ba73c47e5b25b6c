//! The OTLP trace wire format, below both the OTLP source and the span sinks (STYLE rule 16):
//!
//! - [`read`]: a borrowing, allocation-free reader of a span's protobuf encoding
//!   ([`read::SpanView`]), checking what prost and the receiver's limits would check;
//! - [`write`](mod@write): protobuf writing of spans, byte for byte what prost writes, and
//!   the helpers that append attributes to a span held as bytes;
//! - [`batch`]: [`batch::SpanBatch`], the unit that travels from the OTLP receiver through
//!   the pipeline to the sinks, spans held encoded while they wait for their join, and the
//!   `kv_*` attribute builders.
//!
//! Imports go one way: `batch` uses `write`, `read` uses `write`'s length helpers, and nothing
//! here imports a source, the pipeline or a sink.

pub mod batch;
pub mod read;
pub mod write;
