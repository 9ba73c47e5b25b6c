//! The kernel source: eBPF programs on TCP tracepoints and socket syscalls that report the
//! lifecycle of each HTTP request on a watched port.

mod config;

pub use config::{KernelConfig, RUNTIME_DEFAULT_PORTS};
