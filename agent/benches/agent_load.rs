//! The whole agent under load (`sudo cargo xtask bench agent`).
//!
//! Runs the real `inferwatch run` binary (release) with its kernel source on the runtime's
//! port, its OTLP receiver taking the runtime's spans and its exporter sending to a real
//! OTLP/gRPC peer (a tonic trace service in this process that counts what arrives). The runtime
//! is `iw-testbed serve` in its fast mode (tests/scenarios/bench-load.toml), driven by
//! `iw-testbed load` at fixed rates, one connection per request, a share of them closing
//! mid-stream. Per rate, the same load first runs without the agent (the runtime exports
//! straight to the peer): that is the baseline the agent's cost is compared with.
//!
//! Measured per rate, over the window after a warm-up: the agent's CPU (utime + stime of
//! `/proc/<pid>/stat`, as a share of one core), its peak RSS (`VmHWM`), the requests served per
//! second (client side) and runtime spans received per second (agent side), the drop counters
//! of its Prometheus metrics, and the detection delay of every abort (client close -> the
//! `inferwatch.abort` span at the peer). The in-kernel cost of the programs is charged to the
//! processes that make the syscalls, so it shows in the runtime's and client's CPU, next to the
//! no-agent baseline.
//!
//! Then, when `INFERWATCH_BENCH_ROTEL` names a `rotel-agent` binary, the OTLP pass-through
//! alone: the same pre-encoded requests of vLLM-shaped spans sent to rotel (blackhole
//! exporter, and OTLP export to the same peer) and to the agent (kernel source off, exporting
//! to the peer), alternating, rounds of the same size: spans/s and CPU per span of the
//! receiving process.
//!
//! Environment: `INFERWATCH_BENCH_RATES` (requests/s, comma-separated; default 1000,10000),
//! `INFERWATCH_BENCH_DURATION` (seconds measured per rate; default 30), `_WARMUP` (5),
//! `_PERF_FREQ` (the `--perf` sampling frequency, Hz; 499), `_DELAYS_FILE` (a path: every
//! abort's rate, client close time and detection delay, or `missed`, appended to it),
//! `_ABORT_SHARE` (0.02), `_NO_BASELINE=1`, `_PEER_ROUNDS` (5), `_PERF` (a path: `perf record`
//! the agent over the window of the highest rate), `_COMPARE_AGENT` (another `inferwatch`
//! binary, e.g. a build from before a change: run too at each rate, before this one),
//! `IW_TESTBED_BIN` (else the release build in the target directory). Needs root (the kernel
//! source).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use inferwatch::sources::otlp::sample::vllm_request;
use inferwatch_testbed::truth::{ClientTruth, read_jsonl};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The OTLP peer: a tonic trace service that counts spans and keeps the arrival time of each
/// `inferwatch.abort` span by trace id (nothing else, so a 10-minute run stays small).
#[derive(Clone, Default)]
struct Peer {
    spans: Arc<AtomicU64>,
    aborts: Arc<Mutex<Vec<AbortArrival>>>,
}

/// An `inferwatch.abort` span's trace id, and when the peer received it (unix ns).
type AbortArrival = (Vec<u8>, u64);

#[tonic::async_trait]
impl TraceService for Peer {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let at = now_ns();
        let mut n = 0;
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                n += ss.spans.len() as u64;
                for s in ss.spans.iter().filter(|s| s.name == "inferwatch.abort") {
                    if let Ok(mut a) = self.aborts.lock() {
                        a.push((s.trace_id.clone(), at));
                    }
                }
            }
        }
        self.spans.fetch_add(n, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Peer {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind peer");
        let addr = listener.local_addr().expect("peer addr");
        // Compressed requests too: rotel's OTLP exporter may compress whatever it is told.
        let service = TraceServiceServer::new(self.clone())
            .max_decoding_message_size(64 << 20)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        addr
    }

    fn count(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

/// utime + stime of a process, seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Fields 14 and 15 of stat(5); the slice starts at field 3.
    (ticks(11) + ticks(12)) as f64 / hz
}

/// A `/proc/<pid>/status` value in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Context switches of every thread of a process (voluntary: it slept waiting for work).
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|st| {
            st.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// Sum of every series of a metric (with or without the `_total` suffix).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name || metric.strip_suffix("_total") == Some(name))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

const DROP_METRICS: &[&str] = &[
    "inferwatch_events_dropped",
    "inferwatch_spans_dropped",
    "inferwatch_kernel_ringbuf_drops",
    "inferwatch_otlp_requests_rejected",
    "inferwatch_export_errors",
];

/// A child process killed (SIGKILL) if still running when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { child, name })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait (SIGKILL after `grace`).
    async fn stop(self, grace: Duration) {
        self.stop_with(libc::SIGTERM, grace).await;
    }

    /// `signal`, then wait (SIGKILL after `grace`).
    async fn stop_with(mut self, signal: libc::c_int, grace: Duration) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{} did not stop in {grace:?}; killing it", self.name);
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(addr: SocketAddr, what: &str, p: &mut Proc) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !p.alive() {
            bail!("{what} exited before listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} not listening on {addr} after 30 s")
}

struct Settings {
    agent: PathBuf,
    testbed: PathBuf,
    scratch: PathBuf,
    rates: Vec<f64>,
    duration: f64,
    warmup: f64,
    abort_share: f64,
    baseline: bool,
    perf: Option<PathBuf>,
    compare: Option<PathBuf>,
    rotel: Option<PathBuf>,
    peer_rounds: usize,
}

/// The agent, a separate process as deployed.
struct AgentProc {
    proc: Proc,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

async fn start_agent(
    s: &Settings,
    bin: &Path,
    tag: &str,
    watch_port: Option<u16>,
    peer: SocketAddr,
) -> anyhow::Result<AgentProc> {
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(s.scratch.join(format!("agent-{tag}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .env("INFERWATCH_OTLP__GRPC_PORT", grpc.to_string())
        .env("INFERWATCH_OTLP__HTTP_PORT", http.to_string())
        .env("INFERWATCH_PROMETHEUS__PORT", metrics.to_string())
        .env("INFERWATCH_PROMETHEUS__BIND_ADDRESS", "127.0.0.1")
        .env("INFERWATCH_EXPORT__ENDPOINT", format!("http://{peer}"))
        .env("INFERWATCH_NVML__ENABLED", "false")
        .env("INFERWATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    match watch_port {
        Some(p) => {
            cmd.arg("--watch-port").arg(p.to_string());
        }
        None => {
            cmd.env("INFERWATCH_KERNEL__ENABLED", "false");
        }
    }
    let mut proc = Proc::spawn("inferwatch", &mut cmd)?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = http_get(metrics, "/readyz").await
            && r.starts_with("HTTP/1.1 200")
        {
            break;
        }
        if !proc.alive() || Instant::now() > until {
            bail!(
                "the agent did not become ready; see {}",
                s.scratch.join(format!("agent-{tag}.log")).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(AgentProc {
        proc,
        grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
        metrics,
    })
}

/// One load phase's figures.
#[derive(Debug, Default, Clone)]
struct Phase {
    window_s: f64,
    served_per_s: f64,
    skipped: u64,
    errors: u64,
    agent_cpu_pct: f64,
    agent_switches_per_s: f64,
    agent_hwm_mib: f64,
    rss_series: Vec<f64>,
    agent_rss_end_mib: f64,
    spans_in_per_s: f64,
    kernel_events_per_s: f64,
    runtime_cpu_pct: f64,
    client_cpu_pct: f64,
    drops: Vec<(&'static str, f64)>,
    aborts_sent: usize,
    aborts_found: usize,
    delay_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One rate, with or without the agent.
async fn phase(
    s: &Settings,
    peer: &Peer,
    rate: f64,
    agent_bin: Option<(&str, &Path)>,
) -> anyhow::Result<Phase> {
    let peer_addr = peer.start().await;
    let tag = format!("{}-{rate}", agent_bin.map_or("none", |a| a.0));
    let port = free_port();
    let agent = match agent_bin {
        Some((_, bin)) => Some(start_agent(s, bin, &tag, Some(port), peer_addr).await?),
        None => None,
    };
    let otlp = agent.as_ref().map_or(peer_addr, |a| a.grpc);
    let mut runtime = Proc::spawn(
        "iw-testbed serve",
        Command::new(&s.testbed)
            .args(["serve", "--port", &port.to_string(), "--scenario"])
            .arg(workspace().join("tests/scenarios/bench-load.toml"))
            .arg("--otlp-endpoint")
            .arg(format!("http://{otlp}"))
            // The runtime's span exporter: 100 ms batches, a queue deep enough for 10k/s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_BSP_MAX_QUEUE_SIZE", "65536")
            .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1024")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                s.scratch.join(format!("runtime-{tag}.log")),
            )?),
    )?;
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(target, "iw-testbed serve", &mut runtime).await?;
    let truth = s.scratch.join(format!("aborts-{tag}.jsonl"));
    let _ = std::fs::remove_file(&truth);
    let mut load = Proc::spawn(
        "iw-testbed load",
        Command::new(&s.testbed)
            .args(["load", "--target", &target.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--duration", &(s.warmup + s.duration).to_string()])
            .args(["--abort-share", &s.abort_share.to_string()])
            .arg("--abort-truth")
            .arg(&truth)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    tokio::time::sleep(Duration::from_secs_f64(s.warmup)).await;

    let sample = async |agent: Option<&AgentProc>| {
        let m = match agent {
            Some(a) => http_get(a.metrics, "/metrics").await.unwrap_or_default(),
            None => String::new(),
        };
        (
            Instant::now(),
            agent.map_or(0.0, |a| cpu_s(a.proc.pid())),
            agent.map_or(0, |a| ctx_switches(a.proc.pid())),
            cpu_s(runtime.pid()),
            cpu_s(load.pid()),
            m,
        )
    };
    let (t0, a0, x0, r0, l0, m0) = sample(agent.as_ref()).await;
    let mut perf = match (&s.perf, &agent) {
        (Some(path), Some(a)) if rate == s.rates.iter().copied().fold(0.0, f64::max) => {
            Some(Proc::spawn(
                "perf record",
                Command::new("perf")
                    // DWARF unwinding: the release build has no frame pointers, and the
                    // allocator's callers are what a profile of this agent needs.
                    // INFERWATCH_BENCH_PERF_FREQ: at 1k requests/s the agent is busy ~3 % of
                    // the time, so 499 Hz gives too few samples to read a profile from.
                    .args([
                        "record",
                        "-F",
                        &perf_frequency(),
                        "--call-graph",
                        "dwarf,16384",
                    ])
                    .arg("-o")
                    .arg(path)
                    .args(["-p", &a.proc.pid().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?)
        }
        _ => None,
    };
    // The agent's RSS over the window, ten points (for the long run: does it level off?).
    let step = Duration::from_secs_f64(s.duration / 10.0);
    let end = t0 + Duration::from_secs_f64(s.duration);
    let mut rss_series = Vec::new();
    while Instant::now() + step / 2 < end {
        tokio::time::sleep(step.min(end - Instant::now())).await;
        if let Some(a) = &agent {
            rss_series.push(status_kib(a.proc.pid(), "VmRSS") as f64 / 1024.0);
        }
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    let (t1, a1, x1, r1, l1, m1) = sample(agent.as_ref()).await;
    if let Some(p) = perf.take() {
        p.stop_with(libc::SIGINT, Duration::from_secs(60)).await;
    }
    let window = (t1 - t0).as_secs_f64();
    let mut out = Phase {
        window_s: window,
        agent_cpu_pct: 100.0 * (a1 - a0) / window,
        agent_switches_per_s: x1.saturating_sub(x0) as f64 / window,
        rss_series,
        runtime_cpu_pct: 100.0 * (r1 - r0) / window,
        client_cpu_pct: 100.0 * (l1 - l0) / window,
        spans_in_per_s: (metric(&m1, "inferwatch_otlp_spans_received")
            - metric(&m0, "inferwatch_otlp_spans_received"))
            / window,
        ..Phase::default()
    };
    let delta = |name: &str| {
        let sel = |t: &str| {
            t.lines()
                .filter(|l| l.contains("source=\"kernel\""))
                .collect::<Vec<_>>()
                .join("\n")
        };
        metric(&sel(&m1), name) - metric(&sel(&m0), name)
    };
    out.kernel_events_per_s = delta("inferwatch_events_received") / window;

    // The load's own summary (it counts what it served over its whole run).
    let mut stdout = String::new();
    if let Some(mut so) = load.child.stdout.take() {
        use std::io::Read;
        let r = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        stdout = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
    }
    let sum: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_default();
    let num = |k: &str| {
        sum.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    out.served_per_s = num("achieved_per_s");
    out.skipped = num("skipped") as u64;
    out.errors = num("errors") as u64;
    load.stop(Duration::from_secs(5)).await;

    // Let the agent settle and export the last findings, then read its counters and memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(a) = &agent {
        let m = http_get(a.metrics, "/metrics").await.unwrap_or_default();
        out.drops = DROP_METRICS.iter().map(|n| (*n, metric(&m, n))).collect();
        out.agent_hwm_mib = status_kib(a.proc.pid(), "VmHWM") as f64 / 1024.0;
        out.agent_rss_end_mib = status_kib(a.proc.pid(), "VmRSS") as f64 / 1024.0;
    }
    runtime.stop(Duration::from_secs(15)).await;
    if let Some(a) = agent {
        a.proc.stop(Duration::from_secs(15)).await;
    }

    // Detection delay: client close -> the abort span at the peer, by trace id.
    let sent: Vec<ClientTruth> = read_jsonl(&truth).unwrap_or_default();
    let arrived: std::collections::HashMap<String, u64> = peer
        .aborts
        .lock()
        .map(|a| {
            a.iter()
                .map(|(t, at)| (hex::encode(t), *at))
                .collect::<std::collections::HashMap<_, _>>()
        })
        .unwrap_or_default();
    out.aborts_sent = sent.len();
    for c in &sent {
        if let Some(at) = arrived.get(&c.trace_id) {
            out.aborts_found += 1;
            out.delay_ms
                .push(at.saturating_sub(c.close_ns) as f64 / 1e6);
        }
    }
    // INFERWATCH_BENCH_DELAYS_FILE: every abort's client close (unix ns) and delay (ms),
    // appended, to see when in the run the slow ones happened.
    if let Ok(path) = std::env::var("INFERWATCH_BENCH_DELAYS_FILE") {
        let lines: String = sent
            .iter()
            .map(|c| match arrived.get(&c.trace_id) {
                Some(at) => format!(
                    "{rate} {} {:.1}\n",
                    c.close_ns,
                    at.saturating_sub(c.close_ns) as f64 / 1e6
                ),
                None => format!("{rate} {} missed\n", c.close_ns),
            })
            .collect();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
        if let Err(e) = written {
            eprintln!("writing {path}: {e}");
        }
    }
    out.delay_ms.sort_by(f64::total_cmp);
    if let Ok(mut a) = peer.aborts.lock() {
        a.clear();
    }
    Ok(out)
}

fn print_phase(name: &str, p: &Phase) {
    println!(
        "  {name:<8} served {:>7.0} req/s (skipped {}, errors {}) | over {:.1} s: runtime {:>5.1} % | client {:>5.1} % of a core",
        p.served_per_s, p.skipped, p.errors, p.window_s, p.runtime_cpu_pct, p.client_cpu_pct
    );
    if name != "no agent" {
        println!(
            "           agent CPU {:.2} % of a core ({:.0} context switches/s) | VmHWM {:.1} MiB (RSS at end {:.1} MiB) | runtime spans in {:.0}/s | kernel events {:.0}/s",
            p.agent_cpu_pct,
            p.agent_switches_per_s,
            p.agent_hwm_mib,
            p.agent_rss_end_mib,
            p.spans_in_per_s,
            p.kernel_events_per_s
        );
        let series: Vec<String> = p.rss_series.iter().map(|m| format!("{m:.0}")).collect();
        println!(
            "           RSS over the window (MiB, every tenth): {}",
            series.join(" ")
        );
        let drops: Vec<String> = p
            .drops
            .iter()
            .map(|(n, v)| format!("{n} {}", v.abs() as u64))
            .collect();
        println!("           drops: {}", drops.join(", "));
        println!(
            "           detection delay (client close -> inferwatch.abort at the peer): {} of {} aborts found; p50 {:.0} ms, p99 {:.0} ms",
            p.aborts_found,
            p.aborts_sent,
            percentile(&p.delay_ms, 0.5),
            percentile(&p.delay_ms, 0.99)
        );
    }
}

/// One target of the pass-through comparison.
struct Target {
    name: &'static str,
    proc: Proc,
    grpc: SocketAddr,
    /// Forwards to the peer (wait until all arrived before reading its CPU).
    forwards: bool,
}

async fn start_rotel(
    s: &Settings,
    bin: &Path,
    name: &'static str,
    export: Option<SocketAddr>,
) -> anyhow::Result<Target> {
    let (grpc, http) = (free_port(), free_port());
    let mut cmd = Command::new(bin);
    cmd.arg("start")
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
        .arg("--pid-file")
        .arg(s.scratch.join(format!("{name}.pid")))
        .arg("--log-file")
        .arg(s.scratch.join(format!("{name}.log")))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            s.scratch.join(format!("{name}.err")),
        )?);
    match export {
        Some(peer) => {
            cmd.args(["--exporter", "otlp"])
                .args(["--otlp-exporter-endpoint", &format!("http://{peer}")])
                .args(["--otlp-exporter-compression", "none"]);
        }
        None => {
            cmd.args(["--exporter", "blackhole"]);
        }
    }
    let mut proc = Proc::spawn("rotel-agent", &mut cmd)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], grpc));
    wait_port(addr, name, &mut proc).await?;
    Ok(Target {
        name,
        proc,
        grpc: addr,
        forwards: export.is_some(),
    })
}

/// (spans per wall-second while sending, CPU-µs per span including the drain, failed requests)
async fn pass_round(
    t: &Target,
    peer: &Peer,
    requests: &Arc<Vec<ExportTraceServiceRequest>>,
) -> anyhow::Result<(f64, f64, u64)> {
    let spans: u64 = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len() as u64)
        .sum();
    const STREAMS: usize = 4;
    let before = peer.count();
    let c0 = cpu_s(t.proc.pid());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..STREAMS {
        let requests = requests.clone();
        let url = format!("http://{}", t.grpc);
        tasks.push(tokio::spawn(async move {
            let mut client = TraceServiceClient::connect(url)
                .await?
                .max_encoding_message_size(64 << 20);
            let mut failed = 0u64;
            for r in requests.iter().skip(k).step_by(STREAMS) {
                if client.export(r.clone()).await.is_err() {
                    failed += 1;
                }
            }
            anyhow::Ok(failed)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await??;
    }
    let wall = start.elapsed().as_secs_f64();
    if t.forwards {
        let waited = Instant::now();
        let until = waited + Duration::from_secs(30);
        while peer.count() < before + spans && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delivered = peer.count() - before;
        if delivered != spans {
            println!(
                "    {}: {delivered} of {spans} spans reached the peer ({:.1} s waited)",
                t.name,
                waited.elapsed().as_secs_f64()
            );
        }
    }
    // Whatever the process still does after the last response (batching, export).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = cpu_s(t.proc.pid()) - c0;
    Ok((spans as f64 / wall, 1e6 * cpu / spans as f64, failed))
}

async fn pass_through(s: &Settings, rotel: &Path) -> anyhow::Result<()> {
    const REQUESTS: usize = 160;
    const BATCH: usize = 512;
    let peer = Peer::default();
    let peer_addr = peer.start().await;
    // Fresh span ids for every round of every receiver (the agent treats a span it has seen
    // as a duplicate); built before the round, outside what is measured.
    let mut next = 0u64;
    let mut fresh = || {
        let first = next;
        next += (REQUESTS * BATCH) as u64;
        Arc::new(
            (0..REQUESTS)
                .map(|i| vllm_request(first + (i * BATCH) as u64, BATCH))
                .collect::<Vec<_>>(),
        )
    };
    let agent = start_agent(s, &s.agent, "pass-through", None, peer_addr).await?;
    let mut targets = vec![
        start_rotel(s, rotel, "rotel-blackhole", None).await?,
        start_rotel(s, rotel, "rotel-otlp", Some(peer_addr)).await?,
        Target {
            name: "inferwatch",
            proc: agent.proc,
            grpc: agent.grpc,
            forwards: true,
        },
    ];
    println!();
    println!(
        "OTLP pass-through: {REQUESTS} requests x {BATCH} vLLM spans per round, 4 gRPC streams, {} rounds, order alternating",
        s.peer_rounds
    );
    println!(
        "  rotel-blackhole: `rotel-agent start --exporter blackhole`; rotel-otlp: `--exporter otlp` to the peer, no compression;"
    );
    println!("  inferwatch: `inferwatch run` (kernel source off) exporting to the same peer");
    // Warm-up round, not counted.
    for t in &targets {
        pass_round(t, &peer, &fresh()).await?;
    }
    let n = targets.len();
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..s.peer_rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        };
        let mut line = format!("  round {}:", round + 1);
        for i in order {
            let (r, c, failed) = pass_round(&targets[i], &peer, &fresh()).await?;
            line += &format!(
                " {} {:.0} spans/s {:.2} µs/span{};",
                targets[i].name,
                r,
                c,
                if failed > 0 {
                    format!(" ({failed} requests failed)")
                } else {
                    String::new()
                }
            );
            rate[i].push(r);
            cpu[i].push(c);
        }
        println!("{line}");
    }
    println!(
        "  | receiver | spans/s while sending (median) | CPU µs per span (median) | peak RSS |"
    );
    println!("  |---|---|---|---|");
    let mut med_cpu = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let c = median(&mut cpu[i]);
        med_cpu.push(c);
        println!(
            "  | {} | {:.0} | {:.2} | {:.1} MiB |",
            t.name,
            median(&mut rate[i]),
            c,
            status_kib(t.proc.pid(), "VmHWM") as f64 / 1024.0
        );
    }
    println!(
        "  CPU per span, inferwatch / rotel-blackhole: {:.2}; inferwatch / rotel-otlp: {:.2}",
        med_cpu[2] / med_cpu[0],
        med_cpu[2] / med_cpu[1]
    );
    for t in targets.drain(..) {
        t.proc.stop(Duration::from_secs(10)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent load bench needs root (the agent's kernel source)");
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"));
    let testbed = std::env::var("IW_TESTBED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target_dir.join("release/iw-testbed"));
    if !testbed.exists() {
        bail!(
            "no iw-testbed at {} (cargo build --release -p inferwatch-testbed)",
            testbed.display()
        );
    }
    let scratch = target_dir.join("bench-agent");
    std::fs::create_dir_all(&scratch)?;
    let rates: Vec<f64> = std::env::var("INFERWATCH_BENCH_RATES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let s = Settings {
        agent: PathBuf::from(env!("CARGO_BIN_EXE_inferwatch")),
        testbed,
        scratch,
        rates,
        duration: env_or("INFERWATCH_BENCH_DURATION", 30.0),
        warmup: env_or("INFERWATCH_BENCH_WARMUP", 5.0),
        abort_share: env_or("INFERWATCH_BENCH_ABORT_SHARE", 0.02),
        baseline: std::env::var("INFERWATCH_BENCH_NO_BASELINE").is_err(),
        perf: std::env::var("INFERWATCH_BENCH_PERF")
            .ok()
            .map(PathBuf::from),
        compare: std::env::var("INFERWATCH_BENCH_COMPARE_AGENT")
            .ok()
            .map(PathBuf::from),
        rotel: std::env::var("INFERWATCH_BENCH_ROTEL")
            .ok()
            .map(PathBuf::from)
            .filter(|p| p.exists()),
        peer_rounds: env_or("INFERWATCH_BENCH_PEER_ROUNDS", 5),
    };
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "whole agent: `inferwatch run` (release) + `iw-testbed serve` (bench-load.toml) + `iw-testbed load`, {cores} cores; {:.0} s warm-up then {:.0} s measured per rate; {:.0} % of requests close after 2 tokens",
        s.warmup,
        s.duration,
        100.0 * s.abort_share
    );
    let peer = Peer::default();
    for &rate in &s.rates {
        println!("offered {rate:.0} req/s:");
        if s.baseline {
            let base = phase(&s, &peer, rate, None).await?;
            print_phase("no agent", &base);
        }
        if let Some(other) = &s.compare {
            let before = phase(&s, &peer, rate, Some(("compared", other))).await?;
            print_phase("compared", &before);
        }
        let with = phase(&s, &peer, rate, Some(("agent", &s.agent))).await?;
        print_phase("agent", &with);
    }
    match &s.rotel {
        Some(r) => pass_through(&s, r).await?,
        None => println!(
            "\nOTLP pass-through vs rotel skipped: INFERWATCH_BENCH_ROTEL names no rotel-agent binary"
        ),
    }
    Ok(())
}

/// The `perf record` sampling frequency (`INFERWATCH_BENCH_PERF_FREQ`, default 499 Hz).
fn perf_frequency() -> String {
    std::env::var("INFERWATCH_BENCH_PERF_FREQ")
        .ok()
        .filter(|f| f.parse::<u32>().is_ok_and(|f| f > 0))
        .unwrap_or_else(|| "499".to_owned())
}
