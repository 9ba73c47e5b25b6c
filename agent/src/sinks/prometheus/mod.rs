//! The Prometheus text endpoint (`/metrics`) with `/healthz` and `/readyz`.
//!
//! The metric families are created and registered once, at start-up ([`metrics::AgentMetrics`]
//! and whatever else the pipeline registers in the same [`Registry`]); the scrape handler only
//! encodes the registry.

pub mod config;
pub mod metrics;

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
