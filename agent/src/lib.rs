//! inferwatch: a node agent for GPU inference fleets.
//!
//! Sources (`sources::kernel`, `sources::otlp`, ...) turn what they observe into the timestamped
//! values of [`model`]; the sans-IO correlator joins them per request and returns findings; sinks
//! publish spans and metrics. `main.rs` only parses, builds and runs.

#![warn(missing_docs)]

pub mod alloc;
pub mod check;
pub mod cli;
pub mod config;
pub mod correlator;
#[doc(hidden)]
pub mod fuzzing;
pub mod internal_events;
pub mod labels;
pub mod model;
pub mod otlp_wire;
pub mod pipeline;
pub mod privacy;
pub mod sinks;
pub mod sources;
