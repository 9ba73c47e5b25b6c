//! The correlator's outputs as OTLP: each finding as spans in the affected request's trace
//! (contract §4.1), and a joined request's facts as attributes appended to its runtime span.
//!
//! Pure functions of the outputs: the pipeline's correlate stage decides where the spans go
//! (which held span, which batch); this module only decides what they say.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::correlator::{
    AbortFinding, ColdStartFinding, ColdStartPhase, GpuContentionFinding, JoinedRequest,
    KvEvictionFinding, LostInFlightFinding, NoisyNeighbour, Output, RequestGpuFacts,
};
use crate::otlp_wire::batch::{EncodedSpan, finding_span, kv_f64, kv_i64, kv_str, new_span_id};

/// Appends the spans of a finding to `out`; the outputs that are not findings (`Joined`,
/// `ClientAbort`, `RequestGpu`) make none.
pub fn finding_spans(output: &Output, out: &mut Vec<Span>) {
    match output {
        Output::Abort(finding) => out.push(abort(finding)),
        Output::GpuContention(finding) => gpu_contention(finding, out),
        Output::KvEviction(finding) => out.push(kv_eviction(finding)),
        Output::ColdStart(finding) => cold_start(finding, out),
        Output::LostInFlight(finding) => out.push(lost_in_flight(finding)),
        Output::Joined(_) | Output::ClientAbort(_) | Output::RequestGpu(_) => {}
    }
}

/// Marks a settled runtime span with the rule that joined it and, when it came through a
/// gateway that did not propagate the client's trace, moves it into that trace (SPEC 2.1).
pub fn joined(span: &mut EncodedSpan, joined: &JoinedRequest) {
    let request = &joined.request;
    span.add_str_attribute("inferwatch.join", joined.join.as_str());
    if let Some(tp) = joined.client_trace {
        // Into the client's trace (SPEC 2.1); the trace it came in is kept as an attribute.
        span.add_str_attribute(
            "inferwatch.runtime_trace_id",
            &hex::encode(request.trace_id),
        );
        span.move_to_trace(&tp.trace_id, &tp.parent_id);
    }
}

/// The GPU side of a settled request: its start kind, its GPU and the noisy neighbour.
pub fn request_gpu(span: &mut EncodedSpan, facts: &RequestGpuFacts) {
    span.add_str_attribute("inferwatch.start", facts.start.as_str());
    if let Some(wait) = facts.start_wait_ns {
        span.add_attributes([kv_f64("inferwatch.start.wait_ms", wait as f64 / 1e6)]);
    }
    if let Some(gpu) = facts.gpus.first() {
        span.add_str_attribute("inferwatch.gpu.uuid", &gpu.uuid);
        if let Some(sm) = gpu.sm_util {
            span.add_attributes([kv_f64("inferwatch.gpu.sm_util", sm)]);
        }
    }
    if let Some(n) = &facts.neighbour {
        span.add_attributes(neighbour_attributes(n));
    }
}

fn gpu_contention(finding: &GpuContentionFinding, out: &mut Vec<Span>) {
    let mut attributes = vec![
        kv_str("inferwatch.gpu.uuid", &finding.gpu_uuid),
        kv_f64("inferwatch.contention.tpot_inflation", finding.inflation),
        kv_f64(
            "inferwatch.contention.tpot_baseline_ms",
            finding.tpot_baseline_ns as f64 / 1e6,
        ),
        kv_f64(
            "inferwatch.contention.tpot_ms",
            finding.tpot_ns as f64 / 1e6,
        ),
        kv_f64("inferwatch.contention.others_sm_pct", finding.others_sm_pct),
        kv_i64("process.pid", i64::from(finding.runtime_pid)),
    ];
    attributes.extend(neighbour_attributes(&finding.neighbour));
    // One span in each affected request's trace, so the backend shows it inside the
    // request (contract §4.1); the list is bounded by the correlator.
    for affected in &finding.affected {
        out.push(finding_span(
            "inferwatch.gpu_contention",
            affected.trace_id,
            affected.span_id,
            finding.start,
            finding.end,
            attributes.clone(),
        ));
    }
    if finding.affected.is_empty() {
        out.push(in_trace_or_own(
            "inferwatch.gpu_contention",
            None,
            None,
            finding.start,
            finding.end,
            attributes,
        ));
    }
}

fn kv_eviction(finding: &KvEvictionFinding) -> Span {
    let mut attributes = vec![
        kv_str("inferwatch.kv_eviction.method", finding.method.as_str()),
        kv_str("inferwatch.kv.evidence", finding.evidence.as_str()),
        kv_i64(
            "inferwatch.kv_eviction.expected_cached_tokens",
            finding.expected_cached_tokens as i64,
        ),
        kv_i64(
            "inferwatch.kv_eviction.cached_tokens",
            finding.cached_tokens as i64,
        ),
        kv_f64("inferwatch.noisy_neighbour.share", finding.neighbour_share),
        kv_str("gen_ai.conversation.id", &finding.victim_conversation),
        kv_str(
            "inferwatch.kv_eviction.top_tenants",
            &finding
                .top_tenants
                .iter()
                .map(|t| format!("{}={:.3}", t.tenant, t.share))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    if let Some(n) = &finding.neighbour_tenant {
        attributes.push(kv_str("inferwatch.noisy_neighbour.tenant", n));
    }
    request_attributes(
        &mut attributes,
        finding.victim_request_id.as_deref(),
        finding.victim_tenant.as_deref(),
        finding.model.as_deref(),
    );
    if let Some(p) = finding.ttft_penalty_ns {
        attributes.push(kv_f64(
            "inferwatch.kv_eviction.ttft_penalty_ms",
            p as f64 / 1e6,
        ));
    }
    if let Some(t) = finding.ttft_ns {
        attributes.push(kv_f64("gen_ai.latency.time_to_first_token", t as f64 / 1e9));
    }
    if let Some(b) = finding.victim_blocks_removed {
        attributes.push(kv_i64(
            "inferwatch.kv_eviction.victim_blocks_removed",
            b as i64,
        ));
    }
    let mut span = finding_span(
        "inferwatch.kv_eviction",
        finding.trace_id,
        finding.parent_span_id,
        finding.window_start,
        finding.window_end,
        attributes,
    );
    // Links to the neighbour's requests in the window: the backend can jump to them.
    span.links = finding
        .neighbour_links
        .iter()
        .map(|l| opentelemetry_proto::tonic::trace::v1::span::Link {
            trace_id: l.trace_id.to_vec(),
            span_id: l.span_id.to_vec(),
            ..Default::default()
        })
        .collect();
    span
}

/// The root `inferwatch.cold_start` span after one `inferwatch.cold_start.<phase>` span per
/// phase under it.
fn cold_start(finding: &ColdStartFinding, out: &mut Vec<Span>) {
    let mut attributes = vec![
        kv_f64(
            "inferwatch.cold_start.floor_ms",
            finding.floor_ns as f64 / 1e6,
        ),
        kv_str("inferwatch.cold_start.floor_from", &finding.floor_from),
        kv_i64(
            "inferwatch.cold_start.runtime_spans",
            finding.runtime_spans as i64,
        ),
        kv_i64("process.pid", i64::from(finding.pid)),
    ];
    if let Some(exe) = &finding.executable {
        attributes.push(kv_str("process.executable.name", exe));
    }
    if let Some(id) = &finding.container_id {
        attributes.push(kv_str("container.id", id));
    }
    if let Some(uid) = &finding.pod_uid {
        attributes.push(kv_str("k8s.pod.uid", uid));
    }
    if let Some(uuid) = finding.gpu_uuids.first() {
        attributes.push(kv_str("inferwatch.gpu.uuid", uuid));
    }
    if let Some(bytes) = finding.weights_bytes {
        attributes.push(kv_i64("inferwatch.cold_start.weights_bytes", bytes as i64));
    }
    if finding.refused_connections > 0 {
        attributes.push(kv_i64(
            "inferwatch.cold_start.refused_connections",
            finding.refused_connections as i64,
        ));
    }
    if let Some(wait) = finding.refused_wait_ns {
        attributes.push(kv_f64(
            "inferwatch.cold_start.refused_wait_ms",
            wait as f64 / 1e6,
        ));
    }
    let start = finding
        .t_exec
        .unwrap_or(finding.t_first_token.saturating_sub(finding.floor_ns));
    let root = finding_span(
        "inferwatch.cold_start",
        finding.trace_id,
        finding.span_id,
        start,
        finding.t_first_token,
        attributes,
    );
    let root_id: [u8; 8] = root.span_id.as_slice().try_into().unwrap_or([0; 8]);
    for phase in &finding.phases {
        out.push(finding_span(
            &format!("inferwatch.cold_start.{}", phase.name),
            finding.trace_id,
            root_id,
            phase.start,
            phase.end,
            phase_attributes(phase),
        ));
    }
    out.push(root);
}

fn lost_in_flight(finding: &LostInFlightFinding) -> Span {
    let mut attributes = vec![
        kv_str("inferwatch.lost.cause", finding.cause.as_str()),
        kv_f64("inferwatch.lost.ran_ms", finding.ran_ns() as f64 / 1e6),
        kv_i64("process.pid", i64::from(finding.pid)),
    ];
    if let Some(code) = finding.exit_code {
        attributes.push(kv_i64("inferwatch.lost.exit_code", i64::from(code)));
    }
    if let Some(signal) = finding.signal {
        attributes.push(kv_i64("inferwatch.lost.signal", i64::from(signal)));
    }
    if let Some(tokens) = finding.tokens_delivered {
        attributes.push(kv_i64("inferwatch.lost.tokens_delivered", tokens as i64));
    }
    request_attributes(
        &mut attributes,
        finding.request_id.as_deref(),
        finding.tenant.as_deref(),
        finding.model.as_deref(),
    );
    in_trace_or_own(
        "inferwatch.lost_in_flight",
        finding.trace_id,
        finding.parent_span_id,
        finding.started,
        finding.lost_at,
        attributes,
    )
}

fn abort(finding: &AbortFinding) -> Span {
    let mut attributes = vec![
        kv_i64("inferwatch.abort.tokens_after", finding.tokens_after as i64),
        kv_str("inferwatch.abort.method", finding.method.as_str()),
        kv_f64("inferwatch.abort.lag_ms", finding.lag_ns as f64 / 1e6),
        kv_str("inferwatch.abort.how", finding.how.as_str()),
        kv_str("inferwatch.join", finding.join.as_str()),
    ];
    if let Some(total) = finding.tokens_total {
        attributes.push(kv_i64("inferwatch.abort.tokens_total", total as i64));
    }
    // The boundaries a cancel crossed (SPEC 2.1), as unix nanos; t_g only through a
    // watched gateway, with the boundary that held it.
    attributes.push(kv_i64("inferwatch.abort.t_c", finding.t_c as i64));
    attributes.push(kv_i64("inferwatch.abort.t_s", finding.t_s as i64));
    if let Some(t_g) = finding.t_g {
        attributes.push(kv_i64("inferwatch.abort.t_g", t_g as i64));
    }
    if let Some(stalled) = finding.stalled_at {
        attributes.push(kv_str("inferwatch.abort.stalled_at", stalled.as_str()));
    }
    request_attributes(
        &mut attributes,
        finding.request_id.as_deref(),
        finding.tenant.as_deref(),
        finding.model.as_deref(),
    );
    // With neither a span nor a traceparent the finding starts its own trace.
    in_trace_or_own(
        "inferwatch.abort",
        finding.trace_id,
        finding.parent_span_id,
        finding.t_c,
        finding.t_s,
        attributes,
    )
}

/// The attributes of one `inferwatch.cold_start.<phase>` span.
fn phase_attributes(phase: &ColdStartPhase) -> Vec<KeyValue> {
    let mut attributes = vec![
        kv_f64(
            "inferwatch.cold_start.phase_ms",
            phase.duration_ns() as f64 / 1e6,
        ),
        kv_str("inferwatch.cold_start.phase_source", phase.source.as_str()),
    ];
    if let Some(name) = &phase.runtime_span {
        attributes.push(kv_str("inferwatch.cold_start.runtime_span", name));
    }
    attributes
}

/// `inferwatch.noisy_neighbour.*` for a process neighbour.
fn neighbour_attributes(n: &NoisyNeighbour) -> Vec<KeyValue> {
    let mut out = vec![
        kv_i64("inferwatch.noisy_neighbour.pid", i64::from(n.pid)),
        // The correlator keeps SM shares in percent (as NVML reports them); the attribute is a
        // share in 0..1, like the KV-eviction one.
        kv_f64("inferwatch.noisy_neighbour.share", n.sm_share / 100.0),
    ];
    if let Some(exe) = &n.executable {
        out.push(kv_str("inferwatch.noisy_neighbour.executable", exe));
    }
    if let Some(id) = &n.container_id {
        out.push(kv_str("inferwatch.noisy_neighbour.container_id", id));
    }
    if let Some(uid) = &n.pod_uid {
        out.push(kv_str("inferwatch.noisy_neighbour.pod_uid", uid));
    }
    out
}

/// `gen_ai.request.id`, `tenant.id` and `gen_ai.request.model` of the request a finding is
/// about, those known.
fn request_attributes(
    attributes: &mut Vec<KeyValue>,
    request_id: Option<&str>,
    tenant: Option<&str>,
    model: Option<&str>,
) {
    let known = [
        ("gen_ai.request.id", request_id),
        ("tenant.id", tenant),
        ("gen_ai.request.model", model),
    ];
    attributes.extend(
        known
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| kv_str(key, v))),
    );
}

/// A finding span in the request's trace under `parent` when they are known; else a root span
/// (no parent) in `trace_id`, or in a trace of its own.
fn in_trace_or_own(
    name: &str,
    trace_id: Option<[u8; 16]>,
    parent: Option<[u8; 8]>,
    start: u64,
    end: u64,
    attributes: Vec<KeyValue>,
) -> Span {
    let trace_id = trace_id.unwrap_or_else(new_trace_id);
    let mut span = finding_span(
        name,
        trace_id,
        parent.unwrap_or([0; 8]),
        start,
        end,
        attributes,
    );
    if parent.is_none() {
        span.parent_span_id.clear();
    }
    span
}

/// A random, non-zero trace id for findings that have no trace of their own.
fn new_trace_id() -> [u8; 16] {
    let a = new_span_id();
    let b = new_span_id();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a);
    id[8..].copy_from_slice(&b);
    id
}
