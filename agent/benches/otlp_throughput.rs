//! OTLP throughput on one core through the agent's real path, against a decode-only baseline
//! of the same bytes, in the same run. Realistic vLLM `llm_request` spans in requests of 512.
//!
//! - decode only: `prost` decode of each request, as the gRPC / HTTP receivers do first.
//! - full path: decode as the receiver does (spans kept encoded: [`RawTraceRequest`]) ->
//!   [`validate`] (every span walked, the receiver's limits) -> [`RequestAdapter::adapt`] (as
//!   the receiver does) -> [`CorrelateStage::on_spans`] (hold for the join, feed the
//!   correlator) -> [`CorrelateStage::on_tick`] far
//!   enough ahead that every span settles (enriched, regrouped, queued) -> drain the sink
//!   queue, merge and encode as the OTLP exporter does -> discard.
//!
//! The two paths alternate for `ROUNDS` rounds of at least `SECS` seconds of CPU time each;
//! the medians (spans per second of this thread's CPU time, and of wall time) and their ratio
//! are reported, with the peak RSS (`VmHWM`). Single thread throughout.
//!
//! Run: `cargo xtask bench otlp` (or `cargo bench -p inferwatch --bench otlp_throughput`).
//! `INFERWATCH_BENCH_ROUNDS` / `INFERWATCH_BENCH_SECS` override the rounds and their length;
//! `INFERWATCH_BENCH_ONLY=full|decode` runs one path only (for profiling under callgrind, with
//! `INFERWATCH_BENCH_SECS=0`: one warm-up pass and one measured pass).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferwatch::correlator::{Correlator, CorrelatorConfig};
use inferwatch::internal_events::AgentMetrics;
use inferwatch::otlp_wire::batch::agent_resource;
use inferwatch::otlp_wire::read::{SpanView, WireLimits};
use inferwatch::pipeline::CorrelateStage;
use inferwatch::sinks::SinkReceiver;
use inferwatch::sinks::otlp::{ExportConfig, encode_batch_body};
use inferwatch::sinks::prometheus::findings::FindingMetrics;
use inferwatch::sources::otlp::adapters::AdapterOptions;
use inferwatch::sources::otlp::sample::vllm_request;
use inferwatch::sources::otlp::{OtlpReceiverConfig, RawTraceRequest, RequestAdapter, validate};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::registry::Registry;
use prost::Message;

const BATCH: usize = 512;
const REQUESTS: usize = 16;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This thread's CPU time: on a machine shared with other work, spans per CPU-second is the
/// "per core" rate, where wall time also counts the time other processes held the core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spans per second of thread CPU time, and of wall time.
#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    cpu: f64,
    wall: f64,
}

/// Runs `f` over every request (one warm-up pass, then passes for at least `min` of CPU time,
/// at least one).
fn measure(min: Duration, bodies: &[Vec<u8>], f: &mut dyn FnMut(&[u8]) -> usize) -> Rate {
    for b in bodies {
        black_box(f(b));
    }
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let mut spans = 0usize;
    loop {
        for b in bodies {
            spans += f(b);
        }
        if thread_cpu() - cpu >= min {
            break;
        }
    }
    Rate {
        cpu: spans as f64 / (thread_cpu() - cpu).as_secs_f64(),
        wall: spans as f64 / wall.elapsed().as_secs_f64(),
    }
}

/// The receive -> correlate -> export path, built like `pipeline::Pipeline::build` builds it
/// (no identity reads: the resolver knows nobody), with the exporter's queue drained here.
struct FullPath {
    receiver: OtlpReceiverConfig,
    adapter: RequestAdapter,
    stage: CorrelateStage,
    queue: SinkReceiver,
    export: ExportConfig,
    resource: Resource,
    settle_horizon: u64,
}

impl FullPath {
    fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let finding_metrics = Arc::new(FindingMetrics::register(&mut registry));
        let export = ExportConfig::default();
        let (tx, queue) = export.queue(metrics);
        let config = CorrelatorConfig::default();
        let settle_horizon = config.settle_horizon_ns();
        let stage = CorrelateStage::new(
            Correlator::new(config),
            Box::new(|_pid| Vec::new()),
            vec![tx],
            finding_metrics,
        );
        Self {
            receiver: OtlpReceiverConfig::default(),
            adapter: RequestAdapter::new(AdapterOptions::default()),
            stage,
            queue,
            export,
            resource: agent_resource(Some("bench")),
            settle_horizon,
        }
    }

    /// One received request, all the way to encoded bytes; returns the spans exported.
    fn run(&mut self, body: &[u8]) -> usize {
        let mut request = RawTraceRequest::decode(body).expect("valid bench input");
        validate(&mut request, &self.receiver).expect("within limits");
        let received = request.span_count();
        // (Read here for the tick below; counted in the full path's time, against it.)
        let last_end = request
            .resource_spans
            .iter()
            .flat_map(|rs| rs.scope_spans.iter())
            .flat_map(|ss| ss.spans.iter())
            .filter_map(|s| SpanView::parse(s, WireLimits::unlimited()).ok())
            .map(|s| s.end_time_unix_nano)
            .max()
            .unwrap_or(0);
        self.stage.on_spans(self.adapter.adapt(request));
        self.stage.on_tick(last_end + self.settle_horizon);
        let mut exported = 0;
        while let Some(first) = self.queue.try_recv() {
            // The exporter's merge: one request of up to `max_batch_spans`.
            let mut batch = first;
            while batch.span_count() < self.export.max_batch_spans {
                match self.queue.try_recv() {
                    Some(next) => batch.append(next),
                    None => break,
                }
            }
            exported += batch.span_count();
            let body = encode_batch_body(batch, &self.resource, false).expect("encode");
            black_box(body);
        }
        assert_eq!(exported, received, "every span settles within the tick");
        assert_eq!(self.stage.held_len(), 0);
        exported
    }
}

fn decode_only(body: &[u8]) -> usize {
    let r = ExportTraceServiceRequest::decode(body).expect("valid bench input");
    let n = r.resource_spans[0].scope_spans[0].spans.len();
    black_box(r);
    n
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    // The allocator settings the agent binary runs with (agent/src/alloc.rs).
    inferwatch::alloc::tune();
    let rounds: usize = env_or("INFERWATCH_BENCH_ROUNDS", 5);
    let min = Duration::from_secs_f64(env_or("INFERWATCH_BENCH_SECS", 1.0));
    let only = std::env::var("INFERWATCH_BENCH_ONLY").unwrap_or_default();
    let bodies: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|i| vllm_request((i * BATCH) as u64, BATCH).encode_to_vec())
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "{REQUESTS} requests x {BATCH} vLLM spans, {} bytes/span on the wire; {rounds} rounds of >= {:.1} s per path, alternating, one thread",
        bytes / (REQUESTS * BATCH),
        min.as_secs_f64()
    );

    let mut full = FullPath::new();
    let (mut decode_cpu, mut full_cpu, mut decode_wall, mut full_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!("spans per second of thread CPU time (wall-time ratio in the last column)");
    println!("| round | decode only | full path | full / decode | (wall) |");
    println!("|-------|-------------|-----------|---------------|--------|");
    for round in 1..=rounds {
        let d = if only != "full" {
            measure(min, &bodies, &mut decode_only)
        } else {
            Rate::default()
        };
        let f = if only != "decode" {
            measure(min, &bodies, &mut |b| full.run(b))
        } else {
            Rate::default()
        };
        println!(
            "| {round:>5} | {:>11.0} | {:>9.0} | {:>12.1}% | {:>5.1}% |",
            d.cpu,
            f.cpu,
            100.0 * f.cpu / d.cpu.max(1.0),
            100.0 * f.wall / d.wall.max(1.0)
        );
        decode_cpu.push(d.cpu);
        full_cpu.push(f.cpu);
        decode_wall.push(d.wall);
        full_wall.push(f.wall);
    }
    let (d, f) = (median(&mut decode_cpu), median(&mut full_cpu));
    let (dw, fw) = (median(&mut decode_wall), median(&mut full_wall));
    println!();
    println!("medians, spans/s per CPU-second (per wall-second):");
    println!("  decode only (prost):                                     {d:>8.0} ({dw:.0})");
    println!("  full path (decode, validate, correlate, settle, encode): {f:>8.0} ({fw:.0})");
    println!(
        "  full / decode-only: {:.1}% ({:.1}% by wall time)",
        100.0 * f / d.max(1.0),
        100.0 * fw / dw.max(1.0)
    );
    println!(
        "peak RSS (VmHWM): {:.1} MiB",
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
}
