//! Starts the pieces of an end-to-end run: an OTLP collector that records what it receives and
//! when, the agent (in-process, through its own `Pipeline`), and the testbed (the `iw-testbed`
//! binary, a separate process as a real runtime would be).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use inferwatch::config::{AgentConfig, RunConfig};
use inferwatch::pipeline::{Pipeline, PipelineError, RunOptions};
use inferwatch_testbed::truth::{ClientTruth, TruthRecord, read_jsonl};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_util::sync::CancellationToken;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Whether the kernel-backed tests can run; panics when they must and cannot.
pub fn kernel_tests_enabled(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("INFERWATCH_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1") {
        panic!("{name}: end-to-end tests are required but not running as root");
    }
    eprintln!(
        "\n*** SKIPPED {name}: end-to-end tests need root (eBPF); run `sudo cargo xtask test` ***\n"
    );
    false
}

/// One end-to-end run at a time: they load kernel programs and time things on a 2-core box.
/// (A tokio mutex: the guard is held across the run's awaits.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A span as the collector received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the collector got it (unix ns).
    pub at: u64,
    /// The resource's `service.name`.
    pub service: String,
    /// The span.
    pub span: Span,
}

/// A real OTLP/gRPC trace receiver (tonic, the OTLP protobuf service) that records every span.
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let at = now_ns();
        let mut spans = self
            .spans
            .lock()
            .map_err(|_| tonic::Status::internal("lock"))?;
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        at,
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on 127.0.0.1:0; returns the address.
    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        addr
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The agent, running in this process.
pub struct Agent {
    pub otlp_grpc: SocketAddr,
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

impl Agent {
    /// Builds and starts the agent: kernel source on `watch_port`, OTLP receiver and metrics on
    /// ephemeral ports, spans exported over OTLP/gRPC to `export`.
    pub async fn start(watch_port: u16, export: SocketAddr) -> Agent {
        Self::start_with(watch_port, export, |_| {}).await
    }

    /// As [`Agent::start`], with `adjust` changing the configuration last (e.g. the NVML
    /// source's library and period).
    pub async fn start_with(
        watch_port: u16,
        export: SocketAddr,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> Agent {
        let mut config = AgentConfig::default();
        config.kernel.watch_ports = vec![watch_port];
        config.otlp.grpc_port = 0;
        config.otlp.http_port = 0;
        config.prometheus.port = 0;
        config.prometheus.bind_address = "127.0.0.1".parse().expect("ip");
        config.export.endpoint = Some(format!("http://{export}"));
        adjust(&mut config);
        let config = RunConfig::resolve(config, std::env::vars(), std::path::Path::new("/proc"))
            .expect("config resolves");
        let pipeline = Pipeline::build(config, RunOptions::default())
            .await
            .expect("agent builds");
        let endpoints = pipeline.endpoints().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pipeline.run(shutdown.clone()));
        Agent {
            otlp_grpc: endpoints.otlp_grpc.expect("OTLP receiver up"),
            metrics: endpoints.metrics.expect("metrics up"),
            shutdown,
            task,
        }
    }

    /// The Prometheus text the agent serves.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics).await
    }

    /// The Prometheus text once `metric` (summed over its label sets) reaches `at_least`, or
    /// after `secs`: requests with no runtime span are settled (and counted) only after the
    /// correlator's span wait.
    pub async fn scrape_when(&self, metric: &str, at_least: f64, secs: u64) -> String {
        let deadline = now_ns() + secs * 1_000_000_000;
        loop {
            let text = self.scrape().await;
            if metric_sum(&text, metric, "") >= at_least || now_ns() > deadline {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM-equivalent: stops, settles what is pending, flushes the exporter.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("agent task").expect("agent run");
    }
}

/// The Prometheus text served at `addr` (an in-process agent or the real binary).
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("scrape");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read metrics");
    out
}

/// The value of every sample of `metric` (a Prometheus text exposition), summed; `filter` must
/// appear in the sample's line.
pub fn metric_sum(text: &str, metric: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric)
                && matches!(l.as_bytes().get(metric.len()), Some(b'{' | b' '))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// LiteLLM's `litellm` program: `INFERWATCH_LITELLM`, else the workspace venv's. `None` (and a
/// loud SKIPPED line naming `test`) when it is not installed, unless
/// `INFERWATCH_REQUIRE_LITELLM=1` makes that a failure.
pub fn litellm(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("INFERWATCH_LITELLM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/litellm"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("INFERWATCH_REQUIRE_LITELLM").as_deref() != Ok("1"),
        "LiteLLM required (INFERWATCH_REQUIRE_LITELLM=1) but {} does not exist",
        path.display()
    );
    eprintln!(
        "\n*** SKIPPED {test}: no {} (pip install 'litellm[proxy]', or set INFERWATCH_LITELLM) ***\n",
        path.display()
    );
    None
}

/// The `iw-testbed` binary, built on first use.
pub fn testbed_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "inferwatch-testbed",
                "--bin",
                "iw-testbed",
            ])
            .current_dir(workspace())
            .status()
            .expect("run cargo build for the testbed");
        assert!(status.success(), "building iw-testbed failed");
        let bin = target_dir().join("debug/iw-testbed");
        assert!(bin.exists(), "no testbed binary at {}", bin.display());
        bin
    })
    .clone()
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"))
}

/// The fake `libnvidia-ml` (`tests/fake-nvml`), built on first use.
pub fn fake_nvml_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "fake-nvml"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build for the fake NVML");
        assert!(status.success(), "building fake-nvml failed");
        let lib = target_dir().join("debug/libnvidia_ml.so");
        assert!(lib.exists(), "no fake NVML at {}", lib.display());
        lib
    })
    .clone()
}

/// The fake NVML's script for this test process, at one fixed path: the fake reads the path
/// from `FAKE_NVML_SCRIPT`, an environment variable and so process-wide, set once here. Tests
/// that use it run one at a time ([`serial`]) and each starts it afresh with
/// [`reset_nvml_script`].
pub fn nvml_script_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("inferwatch-e2e-nvml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("NVML script dir");
        let path = dir.join("script.json");
        // SAFETY: set once, before any agent loads the fake (the only reader of the variable),
        // from the first test that needs it; no other code in this process reads it.
        unsafe { std::env::set_var("FAKE_NVML_SCRIPT", &path) };
        path
    })
    .clone()
}

/// Writes a fresh script: one idle GPU (the testbed's default), starting now, no process.
/// The agent's NVML source needs a GPU when it starts; the testbed adds its processes to it.
pub fn reset_nvml_script() -> PathBuf {
    let path = nvml_script_path();
    let script = serde_json::json!({
        "start_unix_ms": now_ns() / 1_000_000,
        "gpus": [inferwatch_testbed::nvml::default_gpu()],
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, script.to_string()).expect("write NVML script");
    std::fs::rename(&tmp, &path).expect("replace NVML script");
    path
}

/// The `inferwatch` binary, built on first use (tests that need a separate process: signals,
/// dropped capabilities, exit codes).
pub fn agent_bin() -> PathBuf {
    // Cargo builds the package's binary for its integration tests and names it here; building
    // it again from the test could rebuild it with other features while tests run.
    PathBuf::from(env!("CARGO_BIN_EXE_inferwatch"))
}

/// What the testbed recorded.
pub struct Truth {
    pub server: Vec<TruthRecord>,
    pub client: Vec<ClientTruth>,
}

/// Runs `iw-testbed run` for a scenario on `port`, exporting spans to `otlp`; waits for it.
pub async fn run_testbed(
    scenario: &str,
    port: u16,
    otlp: SocketAddr,
    extra: &[&str],
    dir: &Path,
) -> Truth {
    let truth = dir.join("truth.jsonl");
    let client = dir.join("client.jsonl");
    let status = tokio::process::Command::new(testbed_bin())
        .arg("run")
        .arg("--scenario")
        .arg(workspace().join("tests/scenarios").join(scenario))
        .arg("--port")
        .arg(port.to_string())
        .arg("--truth")
        .arg(&truth)
        .arg("--client-truth")
        .arg(&client)
        .arg("--otlp-endpoint")
        .arg(format!("http://{otlp}"))
        .args(extra)
        // The runtime's span exporter batches for 100 ms instead of the SDK's 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("run iw-testbed");
    assert!(status.success(), "iw-testbed failed: {status}");
    Truth {
        server: read_jsonl(&truth).expect("read server truth"),
        client: read_jsonl(&client).expect("read client truth"),
    }
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("inferwatch-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A span attribute as a string (ints and doubles formatted).
pub fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        _ => return None,
    })
}
