//! inferwatch testbed: a vLLM-compatible simulated inference runtime that writes down the
//! ground truth of what it did, and a traffic generator that plays tenants, conversations,
//! aborting clients and public traces against it.
//!
//! The agent's end-to-end tests read the truth files through [`truth`].

pub mod config;
pub mod engine;
pub mod flavor;
pub mod kv;
pub mod kvevents;
pub mod load;
pub mod nvml;
pub mod otel;
pub mod runtime;
pub mod server;
pub mod shapes;
pub mod tokens;
pub mod traffic;
pub mod truth;
