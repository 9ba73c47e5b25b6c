//! End-to-end tests: the real agent (kernel programs on the real kernel, the OTLP receiver, the
//! correlator, the OTLP exporter) against the testbed runtime and a real OTLP collector, scored
//! against the testbed's ground truth.
//!
//! Needs root for the kernel programs: without it each test prints a loud SKIPPED line, unless
//! `INFERWATCH_REQUIRE_KERNEL_TESTS=1` (set by `cargo xtask test`).

mod abort;
mod abort_truth;
mod faults;
mod gateway;
mod gpu;
mod harness;
mod lifecycle;
mod openai_client;
mod peers;
mod runtimes;
mod security;
