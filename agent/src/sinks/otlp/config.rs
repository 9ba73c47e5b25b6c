//! Configuration of the OTLP exporter, with the standard `OTEL_EXPORTER_OTLP_*` variables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportProtocol {
    /// OTLP/gRPC (port 4317 by convention).
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Compression of export requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportCompression {
    /// None.
    None,
    /// gzip.
    Gzip,
}

/// The OTLP trace exporter (`[export]`). Unset fields fall back to the standard
/// `OTEL_EXPORTER_OTLP_TRACES_*` then `OTEL_EXPORTER_OTLP_*` variables (see
/// [`ExportConfig::resolve`]); explicit config wins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Turn span export on. Off, or on without any endpoint, means spans are not forwarded
    /// (the file sink may still write them).
    pub enabled: bool,
    /// The backend's URL. gRPC: `http://collector:4317`. HTTP: the full traces URL
    /// (`http://collector:4318/v1/traces`). Falls back to
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT` (to which
    /// `/v1/traces` is appended for HTTP).
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Falls back to `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, then `grpc`.
    pub protocol: Option<ExportProtocol>,
    /// Extra request headers (gRPC metadata), e.g. an API key. Merged over
    /// `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (`k=v,k2=v2`).
    pub headers: BTreeMap<String, String>,
    /// `none` or `gzip`. Falls back to `OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION`, then none.
    pub compression: Option<ExportCompression>,
    /// Per-request timeout in milliseconds. Falls back to `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`,
    /// then 10 000.
    pub timeout_ms: Option<u64>,
    /// Most spans waiting for export; beyond it new batches are dropped and counted.
    pub queue_max_spans: usize,
    /// Most batches waiting for export.
    pub queue_max_batches: usize,
    /// Most spans merged into one export request.
    pub max_batch_spans: usize,
    /// Least time between the starts of two export requests, in milliseconds. Spans that
    /// come sooner wait and go together (or once `send_batch_spans` are waiting); after a
    /// quiet spell the first batch goes at once. 0 sends each batch as it comes.
    pub min_send_interval_ms: u64,
    /// Waiting spans that make an export request go before `min_send_interval_ms` is up.
    /// Waiting spans are held in memory (a vLLM span is ~0.75 KB on the wire), so this bounds
    /// what the interval adds to the agent's RSS; at high rates each tick's batch is more
    /// than this and goes at once.
    pub send_batch_spans: usize,
    /// First retry delay after a retryable failure, in milliseconds (doubles per attempt).
    pub retry_initial_ms: u64,
    /// Longest retry delay, in milliseconds.
    pub retry_max_ms: u64,
    /// How long shutdown may spend flushing the queue, in milliseconds.
    pub shutdown_flush_ms: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            protocol: None,
            headers: BTreeMap::new(),
            compression: None,
            timeout_ms: None,
            queue_max_spans: 65_536,
            queue_max_batches: 1024,
            max_batch_spans: 4096,
            min_send_interval_ms: 1_000,
            send_batch_spans: 512,
            retry_initial_ms: 100,
            retry_max_ms: 5_000,
            shutdown_flush_ms: 5_000,
        }
    }
}

/// The exporter settings after the environment was applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedExport {
    /// The URL requests go to.
    pub endpoint: String,
    /// The protocol.
    pub protocol: ExportProtocol,
    /// Headers / metadata, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Compression.
    pub compression: ExportCompression,
    /// Per-request timeout.
    pub timeout: std::time::Duration,
}

/// An invalid `OTEL_EXPORTER_OTLP_*` value.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}={value:?}: {reason}")]
pub struct EnvError {
    /// The variable.
    pub var: String,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl ExportConfig {
    /// Applies the `OTEL_EXPORTER_OTLP_*` variables in `env` under the explicit config.
    /// Returns `Ok(None)` when export is off or no endpoint is configured anywhere.
    ///
    /// # Errors
    /// An unknown protocol or compression, or a timeout that is not a number.
    pub fn resolve(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<ResolvedExport>, EnvError> {
        if !self.enabled {
            return Ok(None);
        }
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("OTEL_EXPORTER_OTLP_"))
            .collect();
        let pick = |name: &str| -> Option<(String, String)> {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{name}");
            let general = format!("OTEL_EXPORTER_OTLP_{name}");
            env.get(&traces)
                .map(|v| (traces, v.clone()))
                .or_else(|| env.get(&general).map(|v| (general, v.clone())))
                .filter(|(_, v)| !v.trim().is_empty())
        };
        let protocol = match (self.protocol, pick("PROTOCOL")) {
            (Some(p), _) => p,
            (None, Some((var, v))) => match v.trim() {
                "grpc" => ExportProtocol::Grpc,
                "http/protobuf" => ExportProtocol::HttpProtobuf,
                _ => {
                    return Err(EnvError {
                        var,
                        value: v,
                        reason: "supported protocols are grpc and http/protobuf",
                    });
                }
            },
            (None, None) => ExportProtocol::Grpc,
        };
        let endpoint = match &self.endpoint {
            Some(e) => Some(e.clone()),
            None => env
                .get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.trim().to_owned())
                .or_else(|| {
                    env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .filter(|v| !v.trim().is_empty())
                        .map(|v| match protocol {
                            // The spec: the general endpoint is a base URL for HTTP.
                            ExportProtocol::HttpProtobuf => {
                                format!("{}/v1/traces", v.trim().trim_end_matches('/'))
                            }
                            ExportProtocol::Grpc => v.trim().to_owned(),
                        })
                }),
        };
        let Some(endpoint) = endpoint else {
            return Ok(None);
        };
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = env.get(name) {
                for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
                    let Some((k, v)) = pair.split_once('=') else {
                        return Err(EnvError {
                            var: name.into(),
                            value: v.clone(),
                            reason: "headers are key=value pairs separated by commas",
                        });
                    };
                    headers.insert(k.trim().to_ascii_lowercase(), percent_decode(v.trim()));
                }
            }
        }
        for (k, v) in &self.headers {
            headers.insert(k.to_ascii_lowercase(), v.clone());
        }
        let compression = match (self.compression, pick("COMPRESSION")) {
            (Some(c), _) => c,
            (None, Some((var, v))) => match v.trim() {
                "gzip" => ExportCompression::Gzip,
                "none" => ExportCompression::None,
                _ => {
                    return Err(EnvError {
                        var,
                        value: v,
                        reason: "supported compressions are gzip and none",
                    });
                }
            },
            (None, None) => ExportCompression::None,
        };
        let timeout_ms = match (self.timeout_ms, pick("TIMEOUT")) {
            (Some(t), _) => t,
            (None, Some((var, v))) => v.trim().parse().map_err(|_| EnvError {
                var,
                value: v.clone(),
                reason: "timeout is a number of milliseconds",
            })?,
            (None, None) => 10_000,
        };
        Ok(Some(ResolvedExport {
            endpoint,
            protocol,
            headers: headers.into_iter().collect(),
            compression,
            timeout: std::time::Duration::from_millis(timeout_ms.max(1)),
        }))
    }
}

/// Decodes `%XX` escapes (the W3C baggage format `OTEL_EXPORTER_OTLP_HEADERS` uses).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn no_endpoint_means_no_export() {
        let r = ExportConfig::default().resolve(env(&[])).expect("resolves");
        assert_eq!(r, None);
    }

    #[test]
    fn general_endpoint_gets_traces_path_for_http() {
        let r = ExportConfig::default()
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,X-Org=acme"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]))
            .expect("resolves")
            .expect("endpoint");
        assert_eq!(r.endpoint, "http://c:4318/v1/traces");
        assert_eq!(r.protocol, ExportProtocol::HttpProtobuf);
        assert_eq!(
            r.headers,
            vec![
                ("api-key".to_string(), "a b".to_string()),
                ("x-org".to_string(), "acme".to_string())
            ]
        );
        assert_eq!(r.compression, ExportCompression::Gzip);
        assert_eq!(r.timeout, std::time::Duration::from_millis(2500));
    }

    #[test]
    fn traces_endpoint_and_config_win() {
        let config = ExportConfig {
            protocol: Some(ExportProtocol::Grpc),
            ..Default::default()
        };
        let r = config
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]))
            .expect("resolves")
            .expect("endpoint");
        assert_eq!(r.endpoint, "http://traces:4317");
        assert_eq!(r.protocol, ExportProtocol::Grpc);
    }

    #[test]
    fn bad_protocol_is_an_error() {
        let err = ExportConfig::default()
            .resolve(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ]))
            .expect_err("unsupported");
        assert_eq!(err.var, "OTEL_EXPORTER_OTLP_PROTOCOL");
    }
}
