//! The Prometheus text endpoint (`/metrics`) with `/healthz` and `/readyz`.
//!
//! The metric families are created and registered once, at start-up
//! ([`crate::internal_events::AgentMetrics`] and whatever else the pipeline registers in the
//! same [`Registry`]); the scrape handler only encodes the registry.

pub mod config;
pub mod findings;
mod record;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::config::PrometheusConfig;

/// Errors of the Prometheus endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// `bind(2)` failed.
    #[error("binding the metrics listener on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("serving metrics")]
    Serve(#[source] std::io::Error),
}

/// Readiness flag for `/readyz`: the pipeline sets it once every stage is running.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the agent ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the agent is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

struct AppState {
    registry: Registry,
    readiness: Readiness,
}

/// The metrics endpoint, bound and ready to serve.
#[derive(Debug)]
pub struct PrometheusSink {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl PrometheusSink {
    /// Binds the listener. `registry` holds every family, registered at start-up.
    ///
    /// # Errors
    /// [`PrometheusError::Bind`].
    pub async fn build(
        config: &PrometheusConfig,
        registry: Registry,
        readiness: Readiness,
    ) -> Result<Self, PrometheusError> {
        let addr = SocketAddr::new(config.bind_address, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| PrometheusError::Bind { addr, source })?;
        Ok(Self {
            listener,
            state: Arc::new(AppState {
                registry,
                readiness,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled.
    ///
    /// # Errors
    /// [`PrometheusError::Serve`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PrometheusError> {
        let app = Router::new()
            .route("/metrics", get(scrape))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(ready))
            .with_state(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(PrometheusError::Serve)
    }
}

async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response(),
    }
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.readiness.get() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal_events::{AgentMetrics, DropStage, Protocol};
    use crate::internal_events::{OtlpSpansReceived, SpansDropped};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        (status, out)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let metrics = AgentMetrics::register(&mut registry);
        OtlpSpansReceived {
            protocol: Protocol::Grpc,
            count: 7,
        }
        .emit(&metrics);
        SpansDropped {
            sink: "otlp",
            stage: DropStage::SinkQueue,
            count: 2,
        }
        .emit(&metrics);
        let readiness = Readiness::default();
        let config = PrometheusConfig {
            bind_address: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            ..Default::default()
        };
        let sink = PrometheusSink::build(&config, registry, readiness.clone())
            .await
            .expect("binds");
        let addr = sink.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sink.run(shutdown.clone()));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("inferwatch_otlp_spans_received_total{protocol=\"grpc\"} 7"),
            "{body}"
        );
        assert!(
            body.contains("inferwatch_spans_dropped_total{sink=\"otlp\",stage=\"sink_queue\"} 2"),
            "{body}"
        );
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        readiness.set(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        shutdown.cancel();
        task.await.expect("join").expect("clean shutdown");
    }
}
