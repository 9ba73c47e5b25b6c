//! Replay tables of runtime instances as runtimes really are (contract §1.4): spans without
//! `process.pid`, the GPU held by a child or grandchild of the process that reads the requests,
//! a pid reused after its process exited, two instances on one GPU.

use super::*;
use crate::model::{
    ConnId, GpuProcessStat, GpuStat, InstanceIdentity, RequestHead, RuntimeKind, TraceParent,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
const T0: u64 = 1_700_000_000_000_000_000;
const GPU: &str = "GPU-11111111-2222-3333-4444-555555555555";
const GIB: u64 = 1 << 30;

/// The front process (reads the requests) and its GPU workers.
const FRONT: u32 = 100;
const ENGINE: u32 = 101;
const WORKER: u32 = 102;
const ENGINE2: u32 = 103;
const OTHER_FRONT: u32 = 300;
const OTHER_ENGINE: u32 = 301;
const HOG: u32 = 200;

/// Who uses the GPU when: (pid, from s, to s, SM %).
type Usage = (u32, f64, f64, u32);

fn sample(ts: u64, usage: &[Usage]) -> Input {
    let t = (ts - T0) as f64 / S as f64;
    let processes: Vec<GpuProcessStat> = usage
        .iter()
        .filter(|(_, from, to, _)| t >= *from && t < *to)
        .map(|(pid, _, _, sm)| GpuProcessStat {
            gpu_uuid: GPU.into(),
            pid: *pid,
            used_memory: Some(8 * GIB),
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

fn identity(pid: u32, exe: &str, start: u64, parent: u32) -> Input {
    Input::Process(ProcessIdentity {
        pid,
        executable: Some(exe.into()),
        container_id: None,
        pod_uid: None,
        start_time: Some(start),
        parent_pid: Some(parent),
    })
}

/// How a span names its instance.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Binding {
    /// No alias: only the connection it joins (the kernel's reader) names it.
    Kernel,
    /// `process.pid` or `vllm.process_id` (the adapters map both to the instance pid) = the
    /// front, with the kernel's heads too.
    AliasAndKernel,
    /// The alias alone: no kernel events.
    AliasOnly,
}

/// Request `n` of instance `front`: the kernel's accept and head (read by `front`) and the
/// runtime's span, which joins the head by its request id.
fn request(n: u32, front: u32, binding: Binding, arrival: u64, tpot: u64) -> Vec<(u64, Input)> {
    let mut trace_id = [0u8; 16];
    trace_id[8..12].copy_from_slice(&front.to_be_bytes());
    trace_id[12..].copy_from_slice(&n.to_be_bytes());
    let mut span_id = [0u8; 8];
    span_id[..4].copy_from_slice(&front.to_be_bytes());
    span_id[4..].copy_from_slice(&n.to_be_bytes());
    let first = arrival + 50 * MS;
    let request_id = format!("req-{front}-{n}");
    let span = RuntimeRequest {
        runtime: RuntimeKind::Vllm,
        trace_id,
        span_id,
        parent_span_id: None,
        request_id: Some(request_id.clone()),
        model: Some("m".into()),
        tenant: None,
        conversation: None,
        client: None,
        instance: InstanceIdentity {
            pid: (binding != Binding::Kernel).then_some(front),
            ..InstanceIdentity::default()
        },
        arrival,
        queue_ns: None,
        prefill_ns: None,
        first_token: Some(first),
        end: first + tpot * 19,
        prompt_tokens: Some(100),
        cached_tokens: None,
        output_tokens: Some(20),
        finish_reason: Some("stop".into()),
        token_times: Vec::new(),
    };
    let mut inputs = Vec::new();
    if binding != Binding::AliasOnly {
        let conn = ConnId(u64::from(front) << 32 | u64::from(n));
        inputs.push((
            arrival - MS,
            Input::Kernel(KernelEvent {
                ts: arrival - MS,
                pid: None,
                kind: KernelEventKind::Accepted {
                    conn,
                    local: "10.0.0.1:8000".parse().expect("addr"),
                    peer: SocketAddr::from(([10, 0, 0, 2], 20_000 + (n % 40_000) as u16)),
                },
            }),
        ));
        inputs.push((
            arrival - MS / 2,
            Input::Kernel(KernelEvent {
                ts: arrival - MS / 2,
                pid: Some(front),
                kind: KernelEventKind::RequestHead {
                    conn,
                    fd: 9,
                    head: RequestHead {
                        method: "POST".into(),
                        path: "/v1/chat/completions".into(),
                        request_id: Some(request_id),
                        traceparent: None::<TraceParent>,
                        tenant: None,
                        conversation: None,
                        model: None,
                    },
                    send_seq: None,
                },
            }),
        ));
        inputs.push((
            span.end + MS,
            Input::Kernel(KernelEvent {
                ts: span.end + MS,
                pid: None,
                kind: KernelEventKind::Closed { conn },
            }),
        ));
    }
    inputs.push((span.end, Input::Runtime(span)));
    inputs
}

/// One request a second for 150 s from `front`: 20 ms per token, `slow_tpot` in `slow`.
fn workload(front: u32, binding: Binding, slow: (f64, f64), slow_tpot: u64) -> Vec<(u64, Input)> {
    (0..150u32)
        .flat_map(|i| {
            let arrival = T0 + u64::from(i) * S + 300 * MS;
            let t = (arrival - T0) as f64 / S as f64;
            let tpot = if t >= slow.0 && t < slow.1 {
                slow_tpot
            } else {
                20 * MS
            };
            request(i, front, binding, arrival, tpot)
        })
        .collect()
}

fn run(mut inputs: Vec<(u64, Input)>) -> Vec<Output> {
    inputs.sort_by_key(|(t, _)| *t);
    let end = inputs.last().map_or(T0, |(t, _)| *t);
    let mut c = Correlator::new(CorrelatorConfig::default());
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
    out
}

fn samples(usage: &[Usage]) -> Vec<(u64, Input)> {
    (0..160 * S)
        .step_by(S as usize)
        .map(|d| (T0 + d, sample(T0 + d, usage)))
        .collect()
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

/// The old process tree: the front (started an hour before), its engine (child) and the
/// engine's worker (grandchild).
fn tree() -> Vec<(u64, Input)> {
    vec![
        (T0, identity(FRONT, "vllm", T0 - 3600 * S, 1)),
        (
            T0,
            identity(ENGINE, "VLLM::EngineCor", T0 - 3590 * S, FRONT),
        ),
        (T0, identity(WORKER, "VLLM::Worker", T0 - 3580 * S, ENGINE)),
        (T0, identity(HOG, "python3", T0 - 10 * S, 1)),
    ]
}

#[test]
fn the_instance_is_the_request_reader_and_its_descendants() {
    struct Case {
        name: &'static str,
        binding: Binding,
        /// Who holds the GPU besides the hog.
        usage: Vec<Usage>,
        extra: Vec<(u64, Input)>,
        /// The hog's pid and executable named.
        neighbour: (u32, &'static str),
    }
    let hog: Usage = (HOG, 60.0, 90.0, 70);
    let cases = vec![
        Case {
            name: "spans without process.pid, engine a child of the reader",
            binding: Binding::Kernel,
            usage: vec![(ENGINE, 0.0, 1e9, 45), hog],
            extra: vec![],
            neighbour: (HOG, "python3"),
        },
        Case {
            name: "spans without process.pid, GPU held by a grandchild of the reader",
            binding: Binding::Kernel,
            usage: vec![(WORKER, 0.0, 1e9, 45), hog],
            extra: vec![],
            neighbour: (HOG, "python3"),
        },
        Case {
            name: "process.pid / vllm.process_id naming the reader, grandchild on the GPU",
            binding: Binding::AliasAndKernel,
            usage: vec![(WORKER, 0.0, 1e9, 45), hog],
            extra: vec![],
            neighbour: (HOG, "python3"),
        },
        Case {
            name: "the alias alone (no kernel side): the front's children",
            binding: Binding::AliasOnly,
            usage: vec![(ENGINE, 0.0, 1e9, 45), hog],
            extra: vec![],
            neighbour: (HOG, "python3"),
        },
        Case {
            // The engine restarts at 50 s as ENGINE2; its old pid is taken at 55 s by an
            // unrelated process (parent init, started later) that hogs the GPU: not the
            // instance's, though the pid once was.
            name: "a pid reused by an unrelated process after the engine exited",
            binding: Binding::Kernel,
            usage: vec![
                (ENGINE, 0.0, 50.0, 45),
                (ENGINE2, 50.0, 1e9, 45),
                (ENGINE, 60.0, 90.0, 70),
            ],
            extra: vec![
                (
                    T0 + 50 * S,
                    identity(ENGINE2, "VLLM::EngineCor", T0 + 50 * S, FRONT),
                ),
                (T0 + 55 * S, identity(ENGINE, "trainer", T0 + 55 * S, 1)),
            ],
            neighbour: (ENGINE, "trainer"),
        },
    ];
    for case in cases {
        let mut inputs = tree();
        inputs.extend(case.extra);
        inputs.extend(samples(&case.usage));
        inputs.extend(workload(FRONT, case.binding, (60.0, 90.0), 45 * MS));
        let out = run(inputs);
        let found = findings(&out);
        assert_eq!(found.len(), 1, "{}: {found:#?}", case.name);
        let f = found[0];
        assert_eq!(f.runtime_pid, FRONT, "{}", case.name);
        assert_eq!(f.neighbour.pid, case.neighbour.0, "{}", case.name);
        assert_eq!(
            f.neighbour.executable.as_deref(),
            Some(case.neighbour.1),
            "{}",
            case.name
        );
        let (start, end) = (
            (f.start - T0) as f64 / S as f64,
            (f.end - T0) as f64 / S as f64,
        );
        assert!(
            (start - 60.0).abs() <= 1.5 && (end - 90.0).abs() <= 1.5,
            "{}: interval {start}..{end}",
            case.name
        );
        let tagged = facts(&out).iter().filter(|r| r.neighbour.is_some()).count();
        assert!(
            (25..=31).contains(&tagged),
            "{}: about 30 slowed requests tagged: {tagged}",
            case.name
        );
        let all = facts(&out);
        assert_eq!(all.len(), 150, "{}", case.name);
        assert!(
            all.iter().all(|r| r.instance_pid == Some(FRONT)
                && r.gpus.len() == 1
                && r.gpus[0].uuid == GPU
                && r.gpus[0].instance_sm_util.is_some_and(|u| u > 0.0)),
            "{}: every request names its instance and GPU",
            case.name
        );
    }
}

/// Two instances on one GPU: each the other's neighbour. The second one's burst slows the
/// first's decode; the finding is the first's and names the second's engine.
#[test]
fn two_instances_on_one_gpu_are_each_others_neighbours() {
    let mut inputs = tree();
    inputs.push((T0, identity(OTHER_FRONT, "vllm", T0 - 1800 * S, 1)));
    inputs.push((
        T0,
        identity(OTHER_ENGINE, "VLLM::EngineCor", T0 - 1790 * S, OTHER_FRONT),
    ));
    inputs.extend(samples(&[
        (ENGINE, 0.0, 1e9, 40),
        (OTHER_ENGINE, 0.0, 60.0, 10),
        (OTHER_ENGINE, 60.0, 90.0, 70),
        (OTHER_ENGINE, 90.0, 1e9, 10),
    ]));
    inputs.extend(workload(FRONT, Binding::Kernel, (60.0, 90.0), 45 * MS));
    // The second instance's decode is not slowed.
    inputs.extend(workload(OTHER_FRONT, Binding::Kernel, (0.0, 0.0), 20 * MS));
    let out = run(inputs);
    let found = findings(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].runtime_pid, FRONT);
    assert_eq!(found[0].neighbour.pid, OTHER_ENGINE);
    let all = facts(&out);
    assert_eq!(all.len(), 300);
    for r in &all {
        let front = u32::from_be_bytes([r.span_id[0], r.span_id[1], r.span_id[2], r.span_id[3]]);
        assert_eq!(r.instance_pid, Some(front), "facts name the reader");
        if front == OTHER_FRONT {
            assert!(r.neighbour.is_none(), "the second instance is not slowed");
        }
    }
}

/// A front whose pid names another process later (it exited, the pid was reused) is
/// forgotten: a process that claims it as parent is no worker of the old instance, and the
/// new process is an instance of its own only once it reads requests.
#[test]
fn a_reused_front_pid_is_not_the_old_instance() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    for (_, input) in tree() {
        c.on_event(input);
    }
    for (_, input) in request(1, FRONT, Binding::Kernel, T0 + S, 20 * MS) {
        c.on_event(input);
    }
    c.on_event(sample(T0 + S, &[(ENGINE, 0.0, 1e9, 45)]));
    assert_eq!(
        c.gpu.front_of(WORKER),
        Some(FRONT),
        "grandchild of the reader"
    );
    assert_eq!(c.gpu.front_of(ENGINE), Some(FRONT));
    assert_eq!(c.gpu.front_of(HOG), None);
    // The front exits; its pid is reused by a process started at 100 s, whose identity
    // arrives: the old engine (started before it) is nobody's worker now.
    c.on_event(identity(FRONT, "bash", T0 + 100 * S, 1));
    assert_eq!(c.gpu.front_of(ENGINE), None);
    assert_eq!(c.gpu.front_of(FRONT), None);
    // The new process reads requests: an instance of its own, and a child it starts later is
    // its worker, while the old engine (started before it) is not.
    for (_, input) in request(2, FRONT, Binding::Kernel, T0 + 110 * S, 20 * MS) {
        c.on_event(input);
    }
    c.on_event(identity(ENGINE2, "worker", T0 + 105 * S, FRONT));
    assert_eq!(c.gpu.front_of(ENGINE2), Some(FRONT));
    assert_eq!(
        c.gpu.front_of(ENGINE),
        None,
        "started before its claimed parent"
    );
}

/// A cold start with the engine in a child process and spans without `process.pid`: `t_exec`
/// is the front's start, the GPU phases the child's NVML sightings, the first request the
/// reader's first head.
#[test]
fn cold_start_with_the_engine_in_a_child_and_no_process_pid() {
    const NEW_FRONT: u32 = 500;
    const NEW_ENGINE: u32 = 501;
    let mut inputs = vec![
        (T0 + S, identity(NEW_FRONT, "vllm", T0 + S, 1)),
        (
            T0 + 3 * S,
            identity(NEW_ENGINE, "VLLM::EngineCor", T0 + 3 * S, NEW_FRONT),
        ),
    ];
    let period = 500 * MS;
    let mut d = 0;
    while d < 70 * S {
        let ts = T0 + d;
        let t = d as f64 / S as f64;
        let mem = if t < 8.0 {
            GIB / 2
        } else if t < 20.0 {
            GIB / 2 + ((t - 8.0) / 12.0 * 39.5 * GIB as f64) as u64
        } else {
            40 * GIB
        };
        let processes = if t >= 5.0 {
            vec![GpuProcessStat {
                gpu_uuid: GPU.into(),
                pid: NEW_ENGINE,
                used_memory: Some(mem),
                sm_util: Some(30),
                mem_util: Some(5),
            }]
        } else {
            vec![]
        };
        inputs.push((
            ts,
            Input::Gpu(GpuSample {
                ts,
                gpus: vec![GpuStat {
                    index: 0,
                    uuid: GPU.into(),
                    name: "Fake H100".into(),
                    sm_util: Some(30),
                    mem_util: Some(5),
                    memory_used: Some(mem),
                    memory_total: Some(80 * GIB),
                }],
                processes,
            }),
        ));
        d += period;
    }
    inputs.push((
        T0 + 30 * S,
        Input::Kernel(KernelEvent {
            ts: T0 + 30 * S,
            pid: Some(NEW_FRONT),
            kind: KernelEventKind::Listen {
                conn: ConnId(7),
                port: 8000,
            },
        }),
    ));
    for (n, at) in [(1, 40 * S), (2, 41 * S), (3, 50 * S)] {
        inputs.extend(request(n, NEW_FRONT, Binding::Kernel, T0 + at, 20 * MS));
    }
    let out = run(inputs);
    let cold: Vec<&ColdStartFinding> = out
        .iter()
        .filter_map(|o| match o {
            Output::ColdStart(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(cold.len(), 1, "{out:#?}");
    let f = cold[0];
    let at = |t: Option<u64>| t.map(|t| (t - T0) as f64 / S as f64);
    assert_eq!(f.pid, NEW_FRONT);
    assert_eq!(at(f.t_exec), Some(1.0), "the front's start");
    assert_eq!(at(f.t_gpu_first), Some(5.0), "the child's first sighting");
    let weights = at(f.t_weights).unwrap_or(0.0);
    assert!((20.0..=20.5).contains(&weights), "plateau {weights}");
    assert_eq!(at(f.t_listen), Some(30.0));
    assert_eq!(f.gpu_uuids, vec![GPU.to_string()]);
    let first_request = at(f.t_first_request).unwrap_or(0.0);
    assert!(
        (first_request - 40.0).abs() < 0.01,
        "first head {first_request}"
    );
    let starts: Vec<StartKind> = facts(&out).iter().map(|r| r.start).collect();
    assert_eq!(
        starts,
        vec![StartKind::Cold, StartKind::Warm, StartKind::Warm],
        "only the first arrived before the first token (40.05 s)"
    );
}

/// A span that joined no connection and names no pid has no instance: no GPU facts, no
/// finding, counted.
#[test]
fn spans_without_an_instance_are_counted_not_guessed() {
    let mut inputs = tree();
    inputs.extend(samples(&[(ENGINE, 0.0, 1e9, 45), (HOG, 60.0, 90.0, 70)]));
    // No kernel events and no alias.
    inputs.extend(
        workload(FRONT, Binding::AliasOnly, (60.0, 90.0), 45 * MS)
            .into_iter()
            .map(|(t, input)| match input {
                Input::Runtime(mut r) => {
                    r.instance.pid = None;
                    (t, Input::Runtime(r))
                }
                other => (t, other),
            }),
    );
    let mut sorted = inputs;
    sorted.sort_by_key(|(t, _)| *t);
    let end = sorted.last().map_or(T0, |(t, _)| *t);
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    for (t, input) in sorted {
        out.extend(c.on_event(input));
        out.extend(c.on_tick(t));
    }
    out.extend(c.on_tick(end + 120 * S));
    assert!(findings(&out).is_empty());
    let all = facts(&out);
    assert_eq!(all.len(), 150);
    assert!(
        all.iter()
            .all(|r| r.instance_pid.is_none() && r.gpus.is_empty())
    );
    assert_eq!(c.gpu_metrics().requests_without_instance, 150);
}
