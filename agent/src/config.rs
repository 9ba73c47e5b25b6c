//! The agent's configuration: one TOML file, overridden by `INFERWATCH_*` environment variables,
//! then by flags, then resolved against the node it runs on.
//!
//! Two stages, as in ripgrep's low-level and high-level arguments:
//! 1. [`AgentConfig::resolve`] gathers the settings: the file, `INFERWATCH_*` variables, flags.
//!    Each component owns its `XxxConfig` (serde, `deny_unknown_fields`, `Default`); this
//!    module only composes them. Environment variables name a key as
//!    `INFERWATCH_<SECTION>__<KEY>` (double underscore between levels), and their values are
//!    read as TOML values where they parse as one (`INFERWATCH_KERNEL__WATCH_PORTS=[8000,8001]`),
//!    as a string otherwise.
//! 2. [`RunConfig::resolve`] turns them into what the pipeline builds from: the older KV-only
//!    privacy keys merged, the standard `OTEL_EXPORTER_OTLP_*` variables applied under the
//!    export settings, and the runtimes and gateways already listening on this node added to
//!    the watched ports.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::CommonArgs;
use crate::correlator::CorrelatorConfig;
use crate::privacy::PrivacyConfig;
use crate::sinks::file::FileSinkConfig;
use crate::sinks::otlp::config::EnvError;
use crate::sinks::otlp::{ExportConfig, ResolvedExport};
use crate::sinks::prometheus::PrometheusConfig;
use crate::sources::kernel::KernelConfig;
use crate::sources::kernel::discovery::{self, Listener};
use crate::sources::kvevents::KvEventsConfig;
use crate::sources::nvml::NvmlConfig;
use crate::sources::otlp::OtlpReceiverConfig;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "INFERWATCH_";

/// The whole agent configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The kernel (eBPF) source: watched ports and request-head parsing.
    pub kernel: KernelConfig,
    /// The OTLP trace receiver (runtime spans in).
    pub otlp: OtlpReceiverConfig,
    /// The OTLP trace exporter (spans out to a backend).
    pub export: ExportConfig,
    /// The OTLP JSON lines file sink.
    pub file: FileSinkConfig,
    /// The Prometheus metrics endpoint.
    pub prometheus: PrometheusConfig,
    /// The correlator: join windows, time-outs and the caps on its state.
    pub correlator: CorrelatorConfig,
    /// The NVML (GPU) source.
    pub nvml: NvmlConfig,
    /// The KV event source: runtimes' ZMQ publishers of KV-cache events (optional).
    pub kv_events: KvEventsConfig,
    /// Agent-wide privacy: tenant hashing in every export.
    pub privacy: PrivacyConfig,
}

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("parsing config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// The merged file and environment do not fit the config schema.
    #[error("invalid configuration (file {path:?} plus INFERWATCH_* variables)")]
    Schema {
        /// The file, if any.
        path: Option<PathBuf>,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// An environment variable names a key in a way that cannot be merged.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        reason: String,
    },
    /// An `OTEL_EXPORTER_OTLP_*` variable has a value the exporter cannot use.
    #[error("resolving the OTLP export settings")]
    Export(#[source] EnvError),
}

impl AgentConfig {
    /// Loads the config file (if any), applies `INFERWATCH_*` variables from `env`, then the
    /// flags in `args`.
    pub fn resolve(
        args: &CommonArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml_str(&text, path, env)?
            }
            None => Self::from_table(toml::Table::new(), None, env)?,
        };
        for port in &args.watch_ports {
            if !config.kernel.watch_ports.contains(port) {
                config.kernel.watch_ports.push(*port);
            }
        }
        Ok(config)
    }

    /// Parses `text`, the contents of the config file at `path` (only named in errors), and
    /// applies `INFERWATCH_*` variables from `env`: what [`AgentConfig::resolve`] does before
    /// the flags, without touching the file system.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for text that is not TOML, [`ConfigError::Env`] for a variable that
    /// cannot be merged, [`ConfigError::Schema`] when the result does not fit the schema.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        Self::from_table(table, Some(path), env)
    }

    fn from_table(
        mut table: toml::Table,
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        apply_env(&mut table, env)?;
        let mut config: Self =
            toml::Value::Table(table)
                .try_into()
                .map_err(|source| ConfigError::Schema {
                    path: path.map(Path::to_owned),
                    source,
                })?;
        // One tenant-hashing setting for every export; the older KV-only keys feed it.
        config
            .privacy
            .merge_legacy(&mut config.correlator.kv_eviction);
        Ok(config)
    }
}

/// The configuration the pipeline is built from: [`AgentConfig`] resolved against this run's
/// environment and node (see the module docs, stage 2).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The settings, with the older privacy keys merged and the discovered runtimes' and
    /// gateways' ports (when `kernel.watch_runtime_ports`) in `kernel.watch_ports`.
    pub agent: AgentConfig,
    /// Where spans are exported, `OTEL_EXPORTER_OTLP_*` applied; `None` when export is off or
    /// no endpoint is configured anywhere.
    pub export: Option<ResolvedExport>,
    /// Servers that were listening before the agent started: the kernel programs only see later
    /// `listen()` calls, so the pipeline tells the correlator about these itself.
    pub listeners: Vec<Listener>,
}

impl RunConfig {
    /// Resolves `config` against `env` (the process environment, for the `OTEL_*` variables)
    /// and the listening sockets under `proc_root` (`/proc`).
    ///
    /// # Errors
    /// [`ConfigError::Export`] when an `OTEL_EXPORTER_OTLP_*` variable has an unusable value.
    pub fn resolve(
        mut config: AgentConfig,
        env: impl IntoIterator<Item = (String, String)>,
        proc_root: &Path,
    ) -> Result<Self, ConfigError> {
        let export = config.export.resolve(env).map_err(ConfigError::Export)?;
        // Also done by `AgentConfig::resolve`; repeated for configs built in code.
        config
            .privacy
            .merge_legacy(&mut config.correlator.kv_eviction);
        let listeners = discovery::listeners(proc_root);
        if config.kernel.watch_runtime_ports {
            watch_discovered(&mut config.kernel.watch_ports, &listeners);
        }
        Ok(Self {
            agent: config,
            export,
            listeners,
        })
    }
}

/// Adds the ports of the known runtimes (and of the gateways in front of them) found listening
/// to `watch_ports`.
fn watch_discovered(watch_ports: &mut Vec<u16>, listeners: &[Listener]) {
    for l in listeners.iter().filter(|l| l.runtime.is_some()) {
        if !watch_ports.contains(&l.port) {
            tracing::info!(
                port = l.port,
                pid = l.pid,
                runtime = l.runtime,
                "watching a runtime found listening"
            );
            watch_ports.push(l.port);
        }
    }
    // Gateways in front of the runtimes (SPEC 2.1): their ports carry the clients'
    // connections, whose closes are the start of a cancel.
    for l in listeners
        .iter()
        .filter(|l| l.runtime.is_none() && l.gateway.is_some())
    {
        if !watch_ports.contains(&l.port) {
            tracing::info!(
                port = l.port,
                pid = l.pid,
                gateway = l.gateway,
                "watching a gateway found listening"
            );
            watch_ports.push(l.port);
        }
    }
}

/// Merges `INFERWATCH_SECTION__KEY=value` variables into `table`. `INFERWATCH_CONFIG` names the
/// file and is not a key.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // Every key lives in a section, so a key variable always has a `__`; the others
        // (INFERWATCH_CONFIG, INFERWATCH_LOG, and tools' own such as INFERWATCH_PYTHON) are
        // not configuration and must not make the agent refuse to start.
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                reason: "empty key segment".into(),
            });
        }
        let parsed = parse_env_value(&value);
        let (last, parents) = path.split_last().ok_or_else(|| ConfigError::Env {
            var: var.clone(),
            reason: "no key".into(),
        })?;
        let mut cursor = &mut *table;
        for part in parents {
            let entry = cursor
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var,
                        reason: format!("`{part}` is not a section"),
                    });
                }
            };
        }
        cursor.insert(last.clone(), parsed);
    }
    Ok(())
}

/// Reads a variable's value as a TOML value (number, bool, array, quoted string), falling back
/// to a plain string.
fn parse_env_value(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_file_or_env() {
        let config = AgentConfig::resolve(&CommonArgs::default(), env(&[])).expect("resolves");
        assert_eq!(config, AgentConfig::default());
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("iw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "[kernel]\nwatch_ports = [8000]\ntenant_header = \"x-org\"\n",
        )
        .expect("write");
        let args = CommonArgs {
            config: Some(file),
            watch_ports: vec![9000, 8000],
        };
        let config = AgentConfig::resolve(
            &args,
            env(&[
                ("INFERWATCH_KERNEL__CONVERSATION_HEADER", "x-thread"),
                ("UNRELATED", "1"),
                ("INFERWATCH_PYTHON", "/usr/bin/python3"),
                ("INFERWATCH_REQUIRE_KERNEL_TESTS", "1"),
            ]),
        )
        .expect("resolves");
        assert_eq!(config.kernel.watch_ports, vec![8000, 9000]);
        assert_eq!(config.kernel.tenant_header, "x-org");
        assert_eq!(config.kernel.conversation_header, "x-thread");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn env_array_values_parse_as_toml() {
        let config = AgentConfig::resolve(
            &CommonArgs::default(),
            env(&[("INFERWATCH_KERNEL__WATCH_PORTS", "[1, 2]")]),
        )
        .expect("resolves");
        assert_eq!(config.kernel.watch_ports, vec![1, 2]);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = AgentConfig::resolve(
            &CommonArgs::default(),
            env(&[("INFERWATCH_KERNEL__NO_SUCH_KEY", "1")]),
        )
        .expect_err("unknown key");
        assert!(matches!(err, ConfigError::Schema { .. }), "{err:?}");
    }

    #[test]
    fn the_run_config_applies_otel_variables_and_merges_legacy_privacy() {
        let mut config = AgentConfig::default();
        config.correlator.kv_eviction.hash_tenants = true;
        let run = RunConfig::resolve(
            config,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]),
            Path::new("/nonexistent"),
        )
        .expect("resolves");
        assert!(run.agent.privacy.hash_tenants);
        assert!(run.listeners.is_empty());
        let export = run.export.expect("an endpoint from OTEL_*");
        assert!(
            export.endpoint.contains("collector:4317"),
            "{}",
            export.endpoint
        );

        let err = RunConfig::resolve(
            AgentConfig::default(),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
            ]),
            Path::new("/nonexistent"),
        )
        .expect_err("unknown protocol");
        assert!(matches!(err, ConfigError::Export(_)), "{err:?}");
    }

    #[test]
    fn discovered_runtimes_and_gateways_are_watched_once() {
        let listener = |port, runtime, gateway| Listener {
            port,
            pid: 1,
            runtime,
            gateway,
        };
        let mut ports = vec![8000];
        watch_discovered(
            &mut ports,
            &[
                listener(8000, Some("vllm"), None),
                listener(8001, Some("sglang"), None),
                listener(4000, None, Some("litellm")),
                listener(22, None, None),
            ],
        );
        assert_eq!(ports, vec![8000, 8001, 4000]);
    }
}
