//! Sources: each observes one boundary and produces timestamped events. Each can be absent
//! without taking the agent down. Each sends to the pipeline on its own named, bounded
//! [`channel`].

pub mod channel;
pub mod kernel;
pub mod kvevents;
pub mod nvml;
pub mod otlp;
pub mod procfs;
