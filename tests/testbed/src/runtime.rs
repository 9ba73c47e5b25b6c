//! Starting the simulated runtime: the cold-start phases (CUDA init, weight loading) before
//! listening, the contention schedule, the engine task and the HTTP server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::RuntimeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::otel::SpanSink;
use crate::server::{self, Server};
use crate::truth::{ColdStartTruth, ContentionTruth, JsonlWriter, now_ns};

/// Options of one runtime instance.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0: any).
    pub listen: SocketAddr,
    /// Runtime settings.
    pub runtime: RuntimeConfig,
    /// Multiplies every duration.
    pub duration_scale: f64,
    /// Truth file (None: not written).
    pub truth: Option<PathBuf>,
    /// OTLP/gRPC endpoint (None: no export).
    pub otlp_endpoint: Option<String>,
}

/// A running instance.
#[derive(Debug)]
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// The engine.
    pub engine: Arc<Engine>,
    /// Span sink (call [`Running::shutdown`] to flush).
    pub spans: Arc<SpanSink>,
    /// The bound KV event endpoint, when KV events are published.
    pub kv_events_endpoint: Option<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stop serving, flush spans.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.engine.flush_cold_start();
        let spans = self.spans.clone();
        // The SDK's flush blocks; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || spans.shutdown()).await;
    }
}

/// Process start time from /proc (falls back to `fallback`).
fn process_start_ns(fallback: u64) -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    // Field 22 (starttime, clock ticks since boot) follows the parenthesised comm.
    let start_ticks = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|s| s.parse::<u64>().ok());
    let up = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok());
    match (start_ticks, up) {
        (Some(t), Some(up)) => {
            // USER_HZ is 100 on Linux x86_64/arm64.
            let since_start = up - t as f64 / 100.0;
            now_ns().saturating_sub((since_start.max(0.0) * 1e9) as u64)
        }
        _ => fallback,
    }
}

/// Play the cold start, bind, and start serving.
pub async fn start(opts: ServeOptions) -> anyhow::Result<Running> {
    let scale = opts.duration_scale.max(0.0);
    let t0 = now_ns();
    let exec_ns = process_start_ns(t0).min(t0);
    let truth = Arc::new(JsonlWriter::create(opts.truth.as_deref())?);
    let spans = Arc::new(SpanSink::new(opts.otlp_endpoint.as_deref(), "vllm")?);
    let cfg = EngineConfig::from_runtime(&opts.runtime, scale)?;
    let engine = Engine::new(cfg, truth.clone());

    let cuda_init_start_ns = now_ns();
    tokio::time::sleep(Duration::from_secs_f64(
        opts.runtime.cuda_init_ms * scale / 1e3,
    ))
    .await;
    let weights_start_ns = now_ns();
    tracing::info!("loading weights");
    tokio::time::sleep(Duration::from_secs_f64(
        opts.runtime.load_weights_ms * scale / 1e3,
    ))
    .await;
    let weights_done_ns = now_ns();
    let listener = TcpListener::bind(opts.listen).await?;
    let listen_ns = now_ns();
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    engine.set_cold_start(ColdStartTruth {
        pid: std::process::id(),
        exec_ns,
        cuda_init_start_ns,
        weights_start_ns,
        weights_done_ns,
        listen_ns,
        port: addr.port(),
        first_request_ns: None,
        first_token_ns: None,
    });
    engine.set_contention(
        opts.runtime
            .contention
            .iter()
            .map(|c| ContentionTruth {
                start_ns: listen_ns + (c.start_s * scale * 1e9) as u64,
                end_ns: listen_ns + (c.end_s * scale * 1e9) as u64,
                factor: c.factor,
                neighbour: c.neighbour.clone(),
                neighbour_sm_util: c.neighbour_sm_util,
            })
            .collect(),
    );
    let mut kv_task = None;
    let mut kv_events_endpoint = None;
    if let Some(ep) = &opts.runtime.kv_events_endpoint {
        let (publisher, bound, task) = crate::kvevents::start(ep).await?;
        tracing::info!(endpoint = %bound, "publishing KV events");
        engine.set_kv_events(publisher);
        kv_events_endpoint = Some(bound);
        kv_task = Some(task);
    }
    let server = Arc::new(Server {
        engine: engine.clone(),
        spans: spans.clone(),
        truth,
        model: opts.runtime.model.clone(),
        token_events: opts.runtime.token_events,
    });
    let mut tasks = vec![
        tokio::spawn(engine.clone().run()),
        tokio::spawn(server::serve(server, listener)),
    ];
    tasks.extend(kv_task);
    Ok(Running {
        addr,
        engine,
        spans,
        kv_events_endpoint,
        tasks,
    })
}
