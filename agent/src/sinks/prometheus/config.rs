//! Configuration of the Prometheus endpoint.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The metrics endpoint (`[prometheus]`): `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Turn the endpoint on.
    pub enabled: bool,
    /// Address to bind. Default 0.0.0.0 so that Prometheus and the kubelet's probes reach it.
    pub bind_address: IpAddr,
    /// Port (0 picks a free port).
    pub port: u16,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 9464,
        }
    }
}
