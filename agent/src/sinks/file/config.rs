//! Configuration of the OTLP JSON lines file sink.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The file sink (`[file]`): every batch as one line of OTLP JSON
/// (`ExportTraceServiceRequest`), for runs without a backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileSinkConfig {
    /// Turn the sink on.
    pub enabled: bool,
    /// The file to append to (created when missing).
    pub path: PathBuf,
    /// Most spans waiting to be written; beyond it new batches are dropped and counted.
    pub queue_max_spans: usize,
    /// Most batches waiting to be written.
    pub queue_max_batches: usize,
}

impl Default for FileSinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("inferwatch-spans.jsonl"),
            queue_max_spans: 65_536,
            queue_max_batches: 1024,
        }
    }
}
