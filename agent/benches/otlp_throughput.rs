//! OTLP throughput on one core: receive (prost decode + limit checks) -> adapt -> enrich ->
//! export-encode (prost encode, discarded), against a decode-only baseline of the same bytes,
//! in the same run. Realistic vLLM `llm_request` spans in batches of 512.
//!
//! Run: `cargo bench -p inferwatch --bench otlp_throughput`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use inferwatch::sinks::SpanBatch;
use inferwatch::sinks::batch::{agent_resource, kv_str};
use inferwatch::sinks::otlp::encode_request;
use inferwatch::sources::otlp::adapters::{AdapterOptions, adapt};
use inferwatch::sources::otlp::sample::vllm_request;
use inferwatch::sources::otlp::{OtlpReceiverConfig, validate};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

const BATCH: usize = 512;
const BATCHES: usize = 16;

fn run(name: &str, min: Duration, bodies: &[Vec<u8>], mut f: impl FnMut(&[u8]) -> usize) -> f64 {
    // Warm-up.
    for b in bodies {
        black_box(f(b));
    }
    let start = Instant::now();
    let mut spans = 0usize;
    while start.elapsed() < min {
        for b in bodies {
            spans += f(b);
        }
    }
    let rate = spans as f64 / start.elapsed().as_secs_f64();
    println!("| {name:<38} | {:>12.0} |", rate);
    rate
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let bodies: Vec<Vec<u8>> = (0..BATCHES)
        .map(|i| vllm_request((i * BATCH) as u64, BATCH).encode_to_vec())
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "{BATCHES} requests x {BATCH} vLLM spans, {} bytes/span on the wire",
        bytes / (BATCHES * BATCH)
    );
    let config = OtlpReceiverConfig::default();
    let options = AdapterOptions::from(&config);
    let resource = agent_resource(Some("bench"));
    let min = Duration::from_secs(2);

    println!("| path                                   |      spans/s |");
    println!("|----------------------------------------|--------------|");
    let decode = run("decode only (prost)", min, &bodies, |b| {
        let r = ExportTraceServiceRequest::decode(b).expect("valid bench input");
        black_box(&r);
        r.resource_spans[0].scope_spans[0].spans.len()
    });
    run("decode+adapt", min, &bodies, |b| {
        let r = ExportTraceServiceRequest::decode(b).expect("valid bench input");
        let batch = SpanBatch::from(r);
        let adapted: Vec<_> = batch
            .spans()
            .filter_map(|(res, s)| adapt(s, res, &options))
            .collect();
        black_box(adapted).len()
    });
    run("decode+encode (pass-through)", min, &bodies, |b| {
        let r = ExportTraceServiceRequest::decode(b).expect("valid bench input");
        let n = r.resource_spans[0].scope_spans[0].spans.len();
        black_box(encode_request(&r, false).expect("encode"));
        n
    });
    let full = run("decode+validate+adapt+enrich+encode", min, &bodies, |b| {
        let r = ExportTraceServiceRequest::decode(b).expect("valid bench input");
        validate(&r, &config).expect("within limits");
        let mut batch = SpanBatch::from(r);
        let mut adapted = Vec::with_capacity(BATCH);
        batch.for_each_span_mut(|resource, span| {
            if let Some(req) = adapt(span, resource, &options) {
                span.attributes
                    .push(kv_str("inferwatch.join", "traceparent"));
                adapted.push(req);
            }
        });
        let n = batch.span_count();
        let out = encode_request(&batch.into_request(&resource), false).expect("encode");
        black_box(out);
        black_box(adapted);
        n
    });
    println!();
    println!(
        "pipeline / decode-only: {:.0}%   peak RSS: {} MiB",
        100.0 * full / decode,
        peak_rss_kib().map(|k| k / 1024).unwrap_or(0)
    );
}
