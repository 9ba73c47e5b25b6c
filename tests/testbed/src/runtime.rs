//! Starting the simulated runtime: the cold-start phases (CUDA init, weight loading) before
//! listening, the contention schedule, the engine task and the HTTP server; with an NVML
//! script, the GPU side of all of it for the fake NVML (see [`crate::nvml`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::RuntimeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::nvml::{self, NvmlScript};
use crate::otel::SpanSink;
use crate::server::{self, Server};
use crate::truth::{ColdStartTruth, ContentionTruth, JsonlWriter, TruthRecord, now_ns};

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
    /// The fake NVML's script to write (None: no GPU side).
    pub nvml_script: Option<PathBuf>,
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
    gpu: Option<Arc<GpuPlay>>,
}

/// The GPU side of a running instance: the script, the engine child that holds the GPU and the
/// neighbour processes alive.
#[derive(Debug)]
struct GpuPlay {
    script: NvmlScript,
    engine: nvml::EngineChild,
    neighbours: Mutex<Vec<u32>>,
}

impl GpuPlay {
    fn neighbours(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.neighbours.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Running {
    /// A graceful drain: waits (at most `limit`) until no request is running or waiting, then
    /// a little longer for the last responses' final writes.
    pub async fn drain(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.engine.load() != (0, 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    /// Stop serving, flush spans; the runtime leaves the GPU and neighbours still alive end.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(gpu) = &self.gpu {
            for pid in gpu.neighbours().drain(..) {
                nvml::kill_neighbour(pid);
            }
            let t = gpu.script.t(now_ns());
            let _ = gpu
                .script
                .update_process(gpu.engine.pid(), |p| {
                    p.insert("end_s".into(), serde_json::json!(t));
                })
                .inspect_err(|e| tracing::warn!(error = %e, "NVML script"));
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
    let spans = Arc::new(SpanSink::for_flavor(
        opts.otlp_endpoint.as_deref(),
        opts.runtime.flavor,
        opts.runtime.resource_pid,
    )?);
    let cfg = EngineConfig::from_runtime(&opts.runtime, scale)?;
    let engine = Engine::new(cfg, truth.clone());

    let gpu = match &opts.nvml_script {
        Some(path) => Some(Arc::new(GpuPlay {
            script: NvmlScript::open(path)?,
            // As vLLM's EngineCore: a child of the serving process holds the GPU.
            engine: nvml::EngineChild::spawn(nvml::engine_comm(opts.runtime.flavor))?,
            neighbours: Mutex::new(Vec::new()),
        })),
        None => None,
    };
    // The instance is the serving process (it reads the requests); its GPU process is the
    // engine child.
    let pid = std::process::id();
    let cuda_init_start_ns = now_ns();
    if let Some(gpu) = &gpu {
        // CUDA init: the engine appears on the GPU holding its context.
        let t = gpu.script.t(cuda_init_start_ns);
        gpu.script.update_process(gpu.engine.pid(), |p| {
            p.insert("start_s".into(), serde_json::json!(t));
            p.remove("end_s");
            p.insert(
                "memory".into(),
                serde_json::json!([[t, nvml::CONTEXT_BYTES]]),
            );
            p.insert("sm_util".into(), serde_json::json!([[t, 0]]));
            p.insert("mem_util".into(), serde_json::json!([[t, 0]]));
        })?;
    }
    tokio::time::sleep(Duration::from_secs_f64(
        opts.runtime.cuda_init_ms * scale / 1e3,
    ))
    .await;
    let weights_start_ns = now_ns();
    let load = Duration::from_secs_f64(opts.runtime.load_weights_ms * scale / 1e3);
    if let Some(gpu) = &gpu {
        // The weights fill GPU memory linearly over the load, then it stays on the plateau
        // (the agent's `t_weights`).
        let (t0, t1) = (
            gpu.script.t(cuda_init_start_ns),
            gpu.script.t(weights_start_ns),
        );
        let t2 = gpu.script.t(weights_start_ns + load.as_nanos() as u64);
        gpu.script.update_process(gpu.engine.pid(), |p| {
            p.insert(
                "memory".into(),
                serde_json::json!([
                    [t0, nvml::CONTEXT_BYTES],
                    [t1, nvml::CONTEXT_BYTES],
                    [t2, nvml::CONTEXT_BYTES + nvml::WEIGHTS_BYTES]
                ]),
            );
        })?;
    }
    tracing::info!("loading weights");
    tokio::time::sleep(load).await;
    let weights_done_ns = now_ns();
    let listener = TcpListener::bind(opts.listen).await?;
    let listen_ns = now_ns();
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    engine.set_cold_start(ColdStartTruth {
        pid,
        exec_ns,
        cuda_init_start_ns,
        weights_start_ns,
        weights_done_ns,
        listen_ns,
        port: addr.port(),
        first_request_ns: None,
        first_token_ns: None,
    });
    let intervals: Vec<ContentionTruth> = opts
        .runtime
        .contention
        .iter()
        .map(|c| ContentionTruth {
            start_ns: listen_ns + (c.start_s * scale * 1e9) as u64,
            end_ns: listen_ns + (c.end_s * scale * 1e9) as u64,
            factor: c.factor,
            neighbour: c.neighbour.clone(),
            neighbour_sm_util: c.neighbour_sm_util,
            neighbour_pid: None,
            neighbour_executable: None,
        })
        .collect();
    let mut tasks = Vec::new();
    match &gpu {
        Some(gpu) => {
            // Each interval's truth is written once its neighbour process runs (with its pid).
            engine.schedule_contention(&intervals);
            for c in intervals {
                tasks.push(tokio::spawn(play_neighbour(gpu.clone(), truth.clone(), c)));
            }
            tasks.push(tokio::spawn(follow_decode(gpu.clone(), engine.clone())));
        }
        None => engine.set_contention(intervals),
    }
    let mut kv_task = None;
    let mut kv_events_endpoint = None;
    if let Some(ep) = &opts.runtime.kv_events_endpoint {
        // vLLM 0.32 publishes map-encoded events; SGLang and older vLLM the tagged arrays.
        let encoding = if opts.runtime.flavor == crate::flavor::Flavor::Vllm {
            crate::kvevents::Encoding::Map
        } else {
            crate::kvevents::Encoding::Array
        };
        let (publisher, bound, task) = crate::kvevents::start(ep, encoding).await?;
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
        abort_spans: opts.runtime.abort_spans,
        omit_disconnected_root: opts.runtime.omit_disconnected_root,
    });
    tasks.push(tokio::spawn(engine.clone().run()));
    tasks.push(tokio::spawn(server::serve(server, listener)));
    tasks.extend(kv_task);
    Ok(Running {
        addr,
        engine,
        spans,
        kv_events_endpoint,
        tasks,
        gpu,
    })
}

/// How long before its interval a neighbour process is started (and after it killed): the
/// fake NVML lists it exactly over the interval, and the process must exist whenever it is
/// listed, so that the agent can read its identity.
const NEIGHBOUR_MARGIN: Duration = Duration::from_millis(300);

async fn sleep_until_ns(ns: u64) {
    let now = now_ns();
    if ns > now {
        tokio::time::sleep(Duration::from_nanos(ns - now)).await;
    }
}

/// Plays one contention interval's neighbour: a real process, listed by the fake NVML with the
/// interval's SM share and some memory from its start to its end.
async fn play_neighbour(gpu: Arc<GpuPlay>, truth: Arc<JsonlWriter>, mut c: ContentionTruth) {
    let margin = NEIGHBOUR_MARGIN.as_nanos() as u64;
    sleep_until_ns(c.start_ns.saturating_sub(margin)).await;
    let life_s = (c.end_ns.saturating_sub(now_ns()) + 2 * margin) as f64 / 1e9 + 5.0;
    let pid = match nvml::spawn_neighbour(&c.neighbour, life_s).await {
        Ok(pid) => pid,
        Err(e) => {
            tracing::warn!(error = %e, neighbour = %c.neighbour, "cannot start the neighbour");
            truth.write(&TruthRecord::Contention(c));
            return;
        }
    };
    gpu.neighbours().push(pid);
    // Listed from the interval's start, or from now when the spawn ran late.
    let from = gpu.script.t(c.start_ns.max(now_ns()));
    let to = gpu.script.t(c.end_ns);
    let sm = f64::from(c.neighbour_sm_util);
    let listed = gpu.script.update_process(pid, |p| {
        p.insert("start_s".into(), serde_json::json!(from));
        p.insert("end_s".into(), serde_json::json!(to));
        p.insert(
            "memory".into(),
            serde_json::json!([[from, nvml::NEIGHBOUR_BYTES]]),
        );
        p.insert("sm_util".into(), serde_json::json!([[from, sm]]));
        p.insert("mem_util".into(), serde_json::json!([[from, sm / 4.0]]));
    });
    if let Err(e) = listed {
        tracing::warn!(error = %e, "NVML script");
    }
    c.neighbour_pid = Some(pid);
    c.neighbour_executable = Some(nvml::neighbour_comm(&c.neighbour));
    tracing::info!(pid, neighbour = %c.neighbour, "neighbour on the GPU");
    let end_ns = c.end_ns;
    truth.write(&TruthRecord::Contention(c));
    sleep_until_ns(end_ns + margin).await;
    gpu.neighbours().retain(|p| *p != pid);
    nvml::kill_neighbour(pid);
}

/// The runtime's SM utilisation as its decode activity: 0 when idle, more with more running
/// sequences, less while a contention interval slows it. Written when it changes, at most every
/// 100 ms.
async fn follow_decode(gpu: Arc<GpuPlay>, engine: Arc<Engine>) {
    let pid = gpu.engine.pid();
    let mut last: Option<u32> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = now_ns();
        let (running, _) = engine.load();
        let sm = if running == 0 {
            0
        } else {
            let busy = (30 + 5 * running as u32).min(90);
            (f64::from(busy) / engine.contention_factor_at(now)).round() as u32
        };
        if last == Some(sm) {
            continue;
        }
        last = Some(sm);
        let t = gpu.script.t(now);
        if let Err(e) = gpu.script.push_point(pid, "sm_util", t, f64::from(sm)) {
            tracing::warn!(error = %e, "NVML script");
        }
    }
}
