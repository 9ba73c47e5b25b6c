//! Configuration of the NVML source.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The shortest poll period NVML is asked for: its process samples are not finer.
pub const MIN_PERIOD_MS: u64 = 100;

/// The NVML (GPU) source (contract §1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// Turn the source on. When off, or when no NVML library or GPU is found, the agent runs on
    /// its other sources.
    pub enabled: bool,
    /// Poll period in milliseconds (at least 100).
    pub period_ms: u64,
    /// Path of the NVML library to load instead of `libnvidia-ml.so.1` from the loader's path
    /// (e.g. a driver installed under `/usr/local/nvidia/lib64`).
    pub library_path: Option<PathBuf>,
    /// Capacity of the bounded channel from the poller to the pipeline, in samples; a sample
    /// that finds it full is dropped and counted.
    pub channel_capacity: usize,
    /// The same NVML error on the same GPU and call is logged at most once per this many
    /// seconds (the rest are counted).
    pub error_log_interval_s: u64,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            period_ms: 1000,
            library_path: None,
            channel_capacity: 64,
            error_log_interval_s: 300,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_rejects_unknown_keys() {
        let text = toml::to_string(&NvmlConfig::default()).expect("serialize default");
        let back: NvmlConfig = toml::from_str(&text).expect("parse default back");
        assert_eq!(back, NvmlConfig::default());
        assert!(
            toml::from_str::<NvmlConfig>("period = 5").is_err(),
            "unknown key must be rejected"
        );
        let partial: NvmlConfig =
            toml::from_str("period_ms = 250\nlibrary_path = \"/opt/nvml.so\"").expect("partial");
        assert_eq!(partial.period_ms, 250);
        assert_eq!(partial.library_path, Some(PathBuf::from("/opt/nvml.so")));
    }
}
