//! Sources: each observes one boundary and produces timestamped events. Each can be absent
//! without taking the agent down.

pub mod kernel;
pub mod kvevents;
pub mod nvml;
pub mod otlp;
pub mod procfs;
