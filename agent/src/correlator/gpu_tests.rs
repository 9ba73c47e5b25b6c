//! Replay tables of the GPU detections: scripted NVML samples, process identities, listens,
//! heads and spans fed in time order with ticks, as the pipeline would.

use super::*;
use crate::model::{ConnId, GpuProcessStat, GpuStat, InstanceIdentity, RuntimeKind, StartupSpan};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
const T0: u64 = 1_700_000_000_000_000_000;
const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";
const RUNTIME: u32 = 100;
const HOG: u32 = 200;
const HOG2: u32 = 201;
const LIGHT: u32 = 300;
const GIB: u64 = 1 << 30;

/// Who uses the GPU when, and how hard: (pid, from s, to s, SM %, memory bytes).
type Usage = (u32, f64, f64, u32, u64);

fn sample(ts: u64, usage: &[Usage]) -> Input {
    let t = (ts - T0) as f64 / S as f64;
    let processes: Vec<GpuProcessStat> = usage
        .iter()
        .filter(|(_, from, to, _, _)| t >= *from && t < *to)
        .map(|(pid, _, _, sm, mem)| GpuProcessStat {
            gpu_uuid: GPU.into(),
            pid: *pid,
            used_memory: Some(*mem),
            sm_util: Some(*sm),
            mem_util: Some(sm / 4),
        })
        .collect();
    let total: u32 = processes.iter().filter_map(|p| p.sm_util).sum();
    Input::Gpu(GpuSample {
        ts,
        gpus: vec![GpuStat {
            index: 0,
            uuid: GPU.into(),
            name: "Fake H100".into(),
            sm_util: Some(total.min(100)),
            mem_util: Some(10),
            memory_used: Some(processes.iter().filter_map(|p| p.used_memory).sum()),
            memory_total: Some(80 * GIB),
        }],
        processes,
    })
}

fn identity(pid: u32, exe: &str, start: Option<u64>) -> Input {
    let in_pod = pid == HOG || pid == HOG2;
    Input::Process(ProcessIdentity {
        pid,
        executable: Some(exe.into()),
        container_id: in_pod.then(|| format!("{:064x}", pid)),
        pod_uid: in_pod.then(|| "0b6a3e5c-7d21-4f0e-9a8b-1c2d3e4f5a6b".into()),
        start_time: start,
        parent_pid: Some(1),
    })
}

fn request(n: u32, pid: u32, arrival: u64, ttft: u64, tpot: u64, tokens: u64) -> RuntimeRequest {
    let mut trace_id = [0u8; 16];
    trace_id[12..].copy_from_slice(&n.to_be_bytes());
    let mut span_id = [0u8; 8];
    span_id[4..].copy_from_slice(&n.to_be_bytes());
    let first = arrival + ttft;
    RuntimeRequest {
        runtime: RuntimeKind::Vllm,
        trace_id,
        span_id,
        parent_span_id: None,
        request_id: Some(format!("req-{n}")),
        model: Some("m".into()),
        tenant: None,
        conversation: None,
        client: None,
        instance: InstanceIdentity {
            pid: Some(pid),
            ..InstanceIdentity::default()
        },
        arrival,
        queue_ns: None,
        prefill_ns: None,
        first_token: Some(first),
        end: first + tpot * (tokens - 1),
        prompt_tokens: Some(100),
        cached_tokens: None,
        output_tokens: Some(tokens),
        finish_reason: Some("stop".into()),
        token_times: Vec::new(),
    }
}

/// Feeds `inputs` (each at its time; spans at their end) with a tick every 250 ms, and a
/// final tick long after; returns the outputs and the correlator.
fn replay(config: CorrelatorConfig, mut inputs: Vec<(u64, Input)>) -> (Vec<Output>, Correlator) {
    inputs.sort_by_key(|(t, _)| *t);
    let end = inputs.last().map_or(T0, |(t, _)| *t);
    let mut c = Correlator::new(config);
    let mut out = Vec::new();
    let mut next_tick = T0;
    for (t, input) in inputs {
        while next_tick <= t {
            out.extend(c.on_tick(next_tick));
            next_tick += 250 * MS;
        }
        out.extend(c.on_event(input));
    }
    out.extend(c.on_tick(end + 120 * S));
    (out, c)
}

/// [`replay`], checking that the GPU state stayed bounded.
fn run(config: CorrelatorConfig, inputs: Vec<(u64, Input)>) -> Vec<Output> {
    let (out, c) = replay(config, inputs);
    let sizes = c.gpu_state_sizes();
    assert!(
        sizes.0 <= 4096 && sizes.1 <= 4096,
        "GPU state stays bounded: {sizes:?}"
    );
    out
}

fn samples(from_s: u64, to_s: u64, period: u64, usage: &[Usage]) -> Vec<(u64, Input)> {
    (from_s * S..to_s * S)
        .step_by(period as usize)
        .map(|d| (T0 + d, sample(T0 + d, usage)))
        .collect()
}

/// A runtime serving one request every second for 150 s: 20 ms per token normally, `slow_tpot`
/// while `slow` (seconds) holds.
fn workload(slow: (f64, f64), slow_tpot: u64) -> Vec<(u64, Input)> {
    (0..150u32)
        .map(|i| {
            let arrival = T0 + u64::from(i) * S + 300 * MS;
            let t = (arrival - T0) as f64 / S as f64;
            let tpot = if t >= slow.0 && t < slow.1 {
                slow_tpot
            } else {
                20 * MS
            };
            let r = request(i, RUNTIME, arrival, 50 * MS, tpot, 20);
            (r.end, Input::Runtime(r))
        })
        .collect()
}

fn contention_case(usage: &[Usage], slow: (f64, f64), slow_tpot: u64) -> Vec<Output> {
    let mut inputs = vec![
        (T0, identity(RUNTIME, "vllm", Some(T0 - 3600 * S))),
        (T0, identity(HOG, "python3", Some(T0 - 10 * S))),
        (T0, identity(HOG2, "trainer", Some(T0 - 10 * S))),
        (T0, identity(LIGHT, "nvtop-ish", Some(T0 - 10 * S))),
    ];
    inputs.extend(samples(0, 160, S, usage));
    inputs.extend(workload(slow, slow_tpot));
    run(CorrelatorConfig::default(), inputs)
}

fn findings(out: &[Output]) -> Vec<&GpuContentionFinding> {
    out.iter()
        .filter_map(|o| match o {
            Output::GpuContention(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn facts(out: &[Output]) -> Vec<&RequestGpuFacts> {
    out.iter()
        .filter_map(|o| match o {
            Output::RequestGpu(f) => Some(f),
            _ => None,
        })
        .collect()
}

const RUNTIME_ALONE: Usage = (RUNTIME, 0.0, 1e9, 45, 40 * GIB);

#[test]
fn contention_table() {
    struct Case {
        name: &'static str,
        usage: Vec<Usage>,
        slow: (f64, f64),
        slow_tpot: u64,
        /// Expected (neighbour pid, interval start s, interval end s) per finding.
        expect: Vec<(u32, f64, f64)>,
    }
    let cases = vec![
        Case {
            name: "benign: a light second process, no slowdown",
            usage: vec![RUNTIME_ALONE, (LIGHT, 40.0, 100.0, 10, GIB)],
            slow: (0.0, 0.0),
            slow_tpot: 20 * MS,
            expect: vec![],
        },
        Case {
            name: "a heavy neighbour without a slowdown is not contention",
            usage: vec![RUNTIME_ALONE, (HOG, 60.0, 90.0, 70, 20 * GIB)],
            slow: (0.0, 0.0),
            slow_tpot: 20 * MS,
            expect: vec![],
        },
        Case {
            name: "a slowdown without a neighbour is not contention",
            usage: vec![RUNTIME_ALONE, (LIGHT, 0.0, 1e9, 5, GIB)],
            slow: (60.0, 90.0),
            slow_tpot: 45 * MS,
            expect: vec![],
        },
        Case {
            name: "a hog slows the decode: named, interval bounded by the slow requests",
            usage: vec![
                RUNTIME_ALONE,
                (LIGHT, 0.0, 1e9, 5, GIB),
                (HOG, 60.0, 90.0, 70, 20 * GIB),
            ],
            slow: (60.0, 90.0),
            slow_tpot: 45 * MS,
            expect: vec![(HOG, 60.0, 90.0)],
        },
        Case {
            name: "two hogs in two intervals: each named in its own",
            usage: vec![
                RUNTIME_ALONE,
                (HOG, 40.0, 60.0, 60, 20 * GIB),
                (HOG2, 100.0, 120.0, 80, 30 * GIB),
                (LIGHT, 100.0, 120.0, 20, GIB),
            ],
            slow: (40.0, 60.0),
            slow_tpot: 50 * MS,
            expect: vec![(HOG, 40.0, 60.0)],
        },
    ];
    for case in cases {
        let out = contention_case(&case.usage, case.slow, case.slow_tpot);
        let found = findings(&out);
        assert_eq!(
            found.len(),
            case.expect.len(),
            "{}: findings {found:#?}",
            case.name
        );
        for (f, (pid, from, to)) in found.iter().zip(&case.expect) {
            assert_eq!(f.neighbour.pid, *pid, "{}: neighbour", case.name);
            assert_eq!(f.gpu_uuid, GPU);
            assert_eq!(f.runtime_pid, RUNTIME);
            let start = (f.start - T0) as f64 / S as f64;
            let end = (f.end - T0) as f64 / S as f64;
            assert!(
                (start - from).abs() <= 1.5 && (end - to).abs() <= 1.5,
                "{}: interval {start}..{end} vs {from}..{to}",
                case.name
            );
            assert!(
                f.inflation >= 1.5,
                "{}: inflation {}",
                case.name,
                f.inflation
            );
            assert!(f.others_sm_pct >= 30.0, "{}", case.name);
            assert!(!f.affected.is_empty(), "{}: affected requests", case.name);
        }
        // Every request that carries a neighbour names one of the expected hogs, and lies in
        // an interval.
        for fact in facts(&out) {
            if let Some(n) = &fact.neighbour {
                assert!(
                    case.expect.iter().any(|(pid, _, _)| *pid == n.pid),
                    "{}: request names {n:?}",
                    case.name
                );
                assert!(
                    found
                        .iter()
                        .any(|f| f.affected.iter().any(|a| a.span_id == fact.span_id)),
                    "{}: a request with a neighbour is listed in a finding",
                    case.name
                );
            }
        }
        if case.expect.is_empty() {
            assert!(
                facts(&out).iter().all(|f| f.neighbour.is_none()),
                "{}: no request carries a neighbour",
                case.name
            );
        }
    }
}

#[test]
fn contention_names_the_hog_with_identity_and_counts_seconds() {
    let out = contention_case(
        &[RUNTIME_ALONE, (HOG, 60.0, 90.0, 70, 20 * GIB)],
        (60.0, 90.0),
        45 * MS,
    );
    let found = findings(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    let n = &found[0].neighbour;
    assert_eq!(n.executable.as_deref(), Some("python3"));
    assert_eq!(
        n.container_id.as_deref(),
        Some(format!("{:064x}", HOG).as_str())
    );
    assert_eq!(
        n.pod_uid.as_deref(),
        Some("0b6a3e5c-7d21-4f0e-9a8b-1c2d3e4f5a6b")
    );
    assert!((n.sm_share - 70.0).abs() < 1.0, "share {}", n.sm_share);
    assert_eq!(found[0].runtime_executable.as_deref(), Some("vllm"));
    let affected = found[0].affected.len();
    assert!(
        (25..=31).contains(&affected),
        "about 30 slowed requests: {affected}"
    );
    let slowed = facts(&out).iter().filter(|f| f.neighbour.is_some()).count();
    assert_eq!(
        slowed, affected,
        "each listed request carries the neighbour"
    );

    // Every settled request got its GPU facts, right after its Joined.
    for w in out.windows(2) {
        if let Output::Joined(j) = &w[0] {
            match &w[1] {
                Output::RequestGpu(f) => {
                    assert_eq!(f.span_id, j.request.span_id, "facts follow their span");
                    assert_eq!(f.gpus.len(), 1, "ran on the one GPU");
                    assert_eq!(f.gpus[0].uuid, GPU);
                    assert!(f.gpus[0].sm_util.is_some());
                    assert_eq!(f.start, StartKind::Warm, "instance older than the agent");
                }
                other => panic!("Joined not followed by RequestGpu: {other:?}"),
            }
        }
    }
}

#[test]
fn metrics_expose_contention_seconds_and_gauges() {
    let mut inputs = vec![
        (T0, identity(RUNTIME, "vllm", Some(T0 - 3600 * S))),
        (T0, identity(HOG, "python3", Some(T0 - 10 * S))),
    ];
    let usage = [RUNTIME_ALONE, (HOG, 60.0, 90.0, 70, 20 * GIB)];
    inputs.extend(samples(0, 160, S, &usage));
    inputs.extend(workload((60.0, 90.0), 45 * MS));
    inputs.sort_by_key(|(t, _)| *t);
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut t_last = T0;
    for (t, input) in inputs {
        c.on_event(input);
        if t >= t_last + 250 * MS {
            c.on_tick(t);
            t_last = t;
        }
    }
    c.on_tick(t_last + 60 * S);
    let m = c.gpu_metrics();
    let secs = m
        .contention_seconds
        .get(&(GPU.to_string(), "python3".to_string()))
        .copied()
        .expect("contention seconds for (gpu, python3)");
    assert!((25.0..=32.0).contains(&secs), "about 30 s, got {secs}");
    assert_eq!(m.contention_findings, 1);
    assert_eq!(m.gpus.len(), 1, "per-GPU gauges from the latest sample");
    let runtime = m
        .processes
        .iter()
        .find(|(p, _)| p.pid == RUNTIME)
        .expect("per-process gauge of the runtime");
    assert_eq!(
        runtime.1.as_ref().and_then(|i| i.executable.as_deref()),
        Some("vllm")
    );
}

fn listen(ts: u64, pid: u32) -> Input {
    Input::Kernel(KernelEvent {
        ts,
        pid: Some(pid),
        kind: KernelEventKind::Listen {
            conn: ConnId(1),
            port: 8000,
        },
    })
}

/// A runtime (pid 500) started at 1 s: on the GPU at 5 s with its CUDA context, weights
/// ramping 8 s -> 20 s, listening at 30 s, first request at 40 s (first token 42 s).
fn cold_start_inputs(period: u64) -> Vec<(u64, Input)> {
    let pid = 500;
    let reqs = vec![
        request(1, pid, T0 + 40 * S, 2 * S, 20 * MS, 10),
        request(2, pid, T0 + 41 * S, 2 * S, 20 * MS, 10),
        request(3, pid, T0 + 50 * S, 100 * MS, 20 * MS, 10),
    ];
    cold_start_with(period, pid, reqs)
}

/// A vLLM process (`pid`) started at 1 s that loads weights and listens at 30 s, then serves
/// `reqs` (each exported at its end).
fn cold_start_with(period: u64, pid: u32, reqs: Vec<RuntimeRequest>) -> Vec<(u64, Input)> {
    let mut inputs = vec![(T0 + S, identity(pid, "vllm", Some(T0 + S)))];
    let mut d = 0;
    while d < 70 * S {
        let ts = T0 + d;
        let t = d as f64 / S as f64;
        let mem = if t < 8.0 {
            GIB / 2
        } else if t < 20.0 {
            GIB / 2 + ((t - 8.0) / 12.0 * 39.5 * GIB as f64) as u64
        } else {
            // Noise well under the 2% tolerance.
            40 * GIB + (d / period % 3) * (GIB / 200)
        };
        let usage: Vec<Usage> = if t >= 5.0 {
            vec![(pid, 0.0, 1e9, 30, mem)]
        } else {
            vec![]
        };
        inputs.push((ts, sample(ts, &usage)));
        d += period;
    }
    inputs.push((T0 + 30 * S, listen(T0 + 30 * S, pid)));
    inputs.extend(reqs.into_iter().map(|r| (r.end, Input::Runtime(r))));
    inputs
}

fn cold_findings(out: &[Output]) -> Vec<&ColdStartFinding> {
    out.iter()
        .filter_map(|o| match o {
            Output::ColdStart(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[test]
fn cold_start_phases_within_one_sampling_period() {
    for period in [1000 * MS, 500 * MS, 100 * MS] {
        let out = run(CorrelatorConfig::default(), cold_start_inputs(period));
        let found = cold_findings(&out);
        assert_eq!(found.len(), 1, "period {period}: {found:#?}");
        let f = found[0];
        let secs = |t: Option<u64>| t.map(|t| (t - T0) as f64 / S as f64);
        let p = period as f64 / S as f64;
        assert_eq!(secs(f.t_exec), Some(1.0));
        let gpu_first = secs(f.t_gpu_first).expect("t_gpu_first");
        assert!((5.0..5.0 + p).contains(&gpu_first), "gpu_first {gpu_first}");
        let weights = secs(f.t_weights).expect("t_weights");
        assert!(
            (20.0..=20.0 + p).contains(&weights),
            "period {p}: weights plateau at {weights}, true 20 s"
        );
        assert_eq!(secs(f.t_listen), Some(30.0));
        assert_eq!(secs(f.t_first_request), Some(40.0));
        assert_eq!(secs(Some(f.t_first_token)), Some(42.0));
        assert_eq!(f.floor_ns, 41 * S, "first token 42 s - exec 1 s");
        assert_eq!(f.floor_from, "exec");
        let names: Vec<&str> = f.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "process_start",
                "weights_load",
                "warmup",
                "wait_first_request",
                "first_token"
            ]
        );
        let total: u64 = f.phases.iter().map(ColdStartPhase::duration_ns).sum();
        assert_eq!(total, f.floor_ns, "phases add up to the floor");
        assert_eq!(f.executable.as_deref(), Some("vllm"));
        assert_eq!(f.gpu_uuids, vec![GPU.to_string()]);
        let weights_bytes = f.weights_bytes.expect("plateau level");
        assert!(weights_bytes >= 40 * GIB, "{weights_bytes}");

        let starts: Vec<(u32, StartKind)> = facts(&out)
            .iter()
            .map(|f| {
                (
                    u32::from_be_bytes([f.span_id[4], f.span_id[5], f.span_id[6], f.span_id[7]]),
                    f.start,
                )
            })
            .collect();
        assert_eq!(
            starts,
            vec![
                (1, StartKind::Cold),
                (2, StartKind::Cold),
                (3, StartKind::Warm)
            ],
            "arrived before the first token: cold"
        );
        let ttft = facts(&out)[0].ttft_ns;
        assert_eq!(ttft, Some(2 * S));
    }
}

/// The request that got the first token ends after a shorter one that got its first token
/// later, so the shorter one settles first (in the same tick, or one tick before): the cold
/// start still waits for, and names, the first token's request.
#[test]
fn the_cold_start_names_the_first_token_not_the_first_settled_request() {
    let pid = 500;
    // Request 1: first token at 42.00 s, ends at 42.18 s (10 tokens) or 42.30 s (16); request
    // 2: first token at 42.05 s, ends at 42.07 s, due at 42.32 s (the 42.5 s tick).
    for tokens in [10, 16] {
        let reqs = vec![
            request(1, pid, T0 + 40 * S, 2 * S, 20 * MS, tokens),
            request(2, pid, T0 + 40_500 * MS, 1_550 * MS, 20 * MS, 2),
        ];
        let out = run(
            CorrelatorConfig::default(),
            cold_start_with(100 * MS, pid, reqs),
        );
        let found = cold_findings(&out);
        assert_eq!(found.len(), 1, "{tokens} tokens: {found:#?}");
        assert_eq!(found[0].t_first_token, T0 + 42 * S, "{tokens} tokens");
        assert_eq!(
            found[0].span_id[7], 1,
            "{tokens} tokens: under request 1's span"
        );
        let settled: Vec<u8> = out
            .iter()
            .filter_map(|o| match o {
                Output::Joined(j) => Some(j.request.span_id[7]),
                _ => None,
            })
            .collect();
        assert_eq!(settled, [2, 1], "{tokens} tokens: request 2 settles first");
        let starts: Vec<(u8, StartKind)> = facts(&out)
            .iter()
            .map(|f| (f.span_id[7], f.start))
            .collect();
        assert_eq!(
            starts,
            [(2, StartKind::Cold), (1, StartKind::Cold)],
            "{tokens} tokens: both arrived before the first token"
        );
    }
}

#[test]
fn an_instance_running_before_the_agent_is_no_cold_start() {
    let pid = 600;
    let mut inputs = vec![(T0, identity(pid, "vllm", Some(T0 - 3600 * S)))];
    inputs.extend(samples(0, 30, S, &[(pid, 0.0, 1e9, 30, 40 * GIB)]));
    let r = request(1, pid, T0 + 10 * S, 2 * S, 20 * MS, 10);
    inputs.push((r.end, Input::Runtime(r)));
    let out = run(CorrelatorConfig::default(), inputs);
    assert!(cold_findings(&out).is_empty(), "{out:#?}");
    assert_eq!(facts(&out).len(), 1);
    assert_eq!(facts(&out)[0].start, StartKind::Warm);
}

#[test]
fn gpu_worker_child_counts_as_the_instance() {
    // The API server (pid 700) exports spans; its engine core (pid 701) holds the GPU.
    let mut inputs = vec![
        (T0, identity(700, "vllm", Some(T0 - 3600 * S))),
        (
            T0,
            Input::Process(ProcessIdentity {
                pid: 701,
                executable: Some("VLLM::EngineCore".into()),
                container_id: None,
                pod_uid: None,
                start_time: Some(T0 - 3600 * S),
                parent_pid: Some(700),
            }),
        ),
    ];
    inputs.extend(samples(
        0,
        30,
        S,
        &[(701, 0.0, 1e9, 55, 40 * GIB), (HOG, 0.0, 1e9, 10, GIB)],
    ));
    let r = request(1, 700, T0 + 10 * S, 100 * MS, 20 * MS, 50);
    inputs.push((r.end, Input::Runtime(r)));
    let out = run(CorrelatorConfig::default(), inputs);
    let f = facts(&out);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].gpus.len(), 1, "the child's GPU is the instance's");
    assert_eq!(f[0].gpus[0].instance_sm_util, Some(55.0));
    assert_eq!(f[0].gpus[0].sm_util, Some(65.0));
}

#[test]
fn without_gpu_inputs_outputs_are_unchanged() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let r = request(1, 42, T0, 100 * MS, 20 * MS, 10);
    c.on_event(Input::Runtime(r));
    let out = c.on_tick(T0 + 10 * S);
    assert_eq!(out.len(), 1, "one Joined, no GPU facts: {out:?}");
    assert!(matches!(out[0], Output::Joined(_)));
}

/// A TGI start-up span as its router (`warmup`, the root) or a shard (`shard_warmup`) sends
/// it: no pid anywhere (TGI's resources carry only `service.name`).
fn tgi_startup(id: u8, parent: Option<u8>, phase: &str, from: u64, to: u64) -> StartupSpan {
    StartupSpan {
        runtime: RuntimeKind::Tgi,
        trace_id: [9; 16],
        span_id: [id; 8],
        parent_span_id: parent.map(|p| [p; 8]),
        name: if phase == "warmup" {
            "warmup".into()
        } else {
            "/generate.v3.TextGenerationService/Warmup".into()
        },
        phase: phase.into(),
        code_function: None,
        start: from,
        end: to,
        process_pid: None,
        process_kind: None,
    }
}

/// Replays `inputs` and returns the outputs with the GPU metrics at the end.
fn run_with_metrics(inputs: Vec<(u64, Input)>) -> (Vec<Output>, GpuMetrics) {
    let (out, c) = replay(CorrelatorConfig::default(), inputs);
    (out, c.gpu_metrics())
}

/// The runtime of `cold_start_inputs` (exec 1 s, listen 30 s, first token 42 s), as TGI: its
/// router's `warmup` (22 s -> 29 s, over the shard's `Warmup`) arrives at 31 s with no pid.
/// The only instance that began to listen after the warmup ended owns it.
#[test]
fn tgi_start_up_spans_without_a_pid_are_tied_by_the_listen_that_follows() {
    let mut inputs = cold_start_inputs(500 * MS);
    let at = T0 + 31 * S;
    inputs.push((
        at,
        Input::Startup(tgi_startup(
            2,
            Some(1),
            "shard_warmup",
            T0 + 22_100 * MS,
            T0 + 28_900 * MS,
        )),
    ));
    inputs.push((
        at,
        Input::Startup(tgi_startup(1, None, "warmup", T0 + 22 * S, T0 + 29 * S)),
    ));
    let (out, metrics) = run_with_metrics(inputs);
    let found = cold_findings(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = found[0];
    assert_eq!(f.runtime_spans, 2);
    let phases: Vec<(&str, PhaseSource, u64, u64)> = f
        .phases
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.source,
                (p.start - T0) / MS,
                (p.end - T0) / MS,
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("process_start", PhaseSource::Kernel, 1_000, 22_000),
            ("warmup", PhaseSource::RuntimeSpans, 22_000, 29_000),
            ("shard_warmup", PhaseSource::RuntimeSpans, 22_100, 28_900),
            ("server_start", PhaseSource::Kernel, 29_000, 30_000),
            ("wait_first_request", PhaseSource::Kernel, 30_000, 40_000),
            ("first_token", PhaseSource::Kernel, 40_000, 42_000),
        ]
    );
    assert_eq!(metrics.startup_traces_unattributed, 0);
}

/// Two instances began to listen after a TGI warmup that names no pid: either could own it,
/// so it makes no phase (the floor keeps its NVML and kernel phases) and is counted.
#[test]
fn a_start_up_trace_two_instances_could_own_makes_no_phase_and_is_counted() {
    let mut inputs = cold_start_inputs(500 * MS);
    inputs.push((T0 + 30_500 * MS, listen(T0 + 30_500 * MS, 600)));
    inputs.push((
        T0 + 31 * S,
        Input::Startup(tgi_startup(1, None, "warmup", T0 + 22 * S, T0 + 29 * S)),
    ));
    let (out, metrics) = run_with_metrics(inputs);
    let found = cold_findings(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].runtime_spans, 0);
    assert!(
        found[0]
            .phases
            .iter()
            .all(|p| p.source != PhaseSource::RuntimeSpans),
        "{:#?}",
        found[0].phases
    );
    assert_eq!(metrics.startup_traces_unattributed, 1);
}

/// A start-up trace that names no pid and began before the instance's process started is
/// not its own (a runtime the agent does not watch, exporting here), though it listened
/// after it.
#[test]
fn a_start_up_trace_from_before_the_exec_is_not_the_instances() {
    let mut inputs = cold_start_inputs(500 * MS);
    inputs.push((
        T0 + 31 * S,
        Input::Startup(tgi_startup(1, None, "warmup", T0, T0 + 29 * S)),
    ));
    let (out, _) = run_with_metrics(inputs);
    let found = cold_findings(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].runtime_spans, 0);
}
