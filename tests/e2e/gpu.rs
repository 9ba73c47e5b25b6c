//! The GPU boundary, end to end (issue 6): the agent's NVML source loads the fake
//! `libnvidia-ml` through the real nvml-wrapper path, the testbed writes the fake's script as
//! it plays a scenario (the runtime's CUDA init, weight load and decode; real neighbour
//! processes for the contention intervals), the kernel programs see the runtime listen and the
//! requests, and a real OTLP collector receives the findings; scored against the testbed's
//! ground truth.
//!
//! Times are compared with tolerances tied to the NVML sampling period ([`PERIOD_MS`]): a
//! boundary the agent can only see in a sample is late by at most one period (plus the fake's
//! script-reload check and the poller's scheduling on a loaded machine, [`JITTER_MS`]).

use std::collections::HashMap;

use inferwatch_testbed::truth::{
    ClientTruth, ColdStartTruth, ContentionTruth, RequestTruth, TruthRecord,
};

use crate::harness::{
    Agent, Collector, Received, Truth, attr, fake_nvml_lib, free_port, kernel_tests_enabled,
    metric_sum, now_ns, reset_nvml_script, run_testbed, scratch, serial, testbed_bin,
};

/// The NVML poll period the agent runs with.
const PERIOD_MS: u64 = 200;
/// Slack on top of one period: the fake checks its script for changes every 50 ms, and a
/// poll may start late on a loaded 2-core machine.
const JITTER_MS: u64 = 60;

/// What one scenario run left behind.
struct GpuRun {
    truth: Truth,
    spans: Vec<Received>,
    metrics: String,
    /// The GPU of the fake's script.
    gpu_uuid: String,
    /// The pids the fake's script listed on the GPU.
    script_pids: Vec<u32>,
}

impl GpuRun {
    fn requests(&self) -> Vec<&RequestTruth> {
        self.truth
            .server
            .iter()
            .filter_map(|r| match r {
                TruthRecord::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn contention(&self) -> Vec<&ContentionTruth> {
        self.truth
            .server
            .iter()
            .filter_map(|r| match r {
                TruthRecord::Contention(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn cold_start(&self) -> Option<&ColdStartTruth> {
        self.truth.server.iter().find_map(|r| match r {
            TruthRecord::ColdStart(c) => Some(c),
            _ => None,
        })
    }

    fn named(&self, name: &str) -> Vec<&Received> {
        self.spans.iter().filter(|s| s.span.name == name).collect()
    }
}

async fn gpu_run(name: &str, scenario: &str) -> GpuRun {
    gpu_run_with(name, scenario, &[]).await
}

/// As [`gpu_run`], with more `iw-testbed run` arguments.
async fn gpu_run_with(name: &str, scenario: &str, extra: &[&str]) -> GpuRun {
    let _one_at_a_time = serial().await;
    // Build what the run needs before any clock starts.
    let lib = fake_nvml_lib();
    testbed_bin();
    let dir = scratch(name);
    let script = reset_nvml_script();
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        config.nvml.library_path = Some(lib);
        config.nvml.period_ms = PERIOD_MS;
        // Close a contention interval 2 s after its last contended request (not 15 s), so that
        // the finding is made during the run.
        config.correlator.gpu.interval_close_ms = 2_000;
    })
    .await;
    let script_arg = script.to_string_lossy().into_owned();
    let mut args = vec!["--nvml-script", script_arg.as_str()];
    args.extend_from_slice(extra);
    let truth = run_testbed(scenario, port, agent.otlp_grpc, &args, &dir).await;
    let expected = truth
        .server
        .iter()
        .filter(|r| matches!(r, TruthRecord::Request(_)))
        .count();
    // Wait until every runtime span has been forwarded (the agent holds each until joined).
    let deadline = now_ns() + 15_000_000_000;
    loop {
        let forwarded = collector
            .spans()
            .iter()
            .filter(|s| s.span.name == "llm_request")
            .count();
        if forwarded >= expected || now_ns() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let metrics = agent.scrape().await;
    agent.stop().await;
    let doc = std::fs::read_to_string(&script)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .unwrap_or_default();
    let gpu_uuid = doc["gpus"][0]["uuid"]
        .as_str()
        .map(str::to_owned)
        .expect("the script names its GPU");
    let script_pids = doc["gpus"][0]["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
                .collect()
        })
        .unwrap_or_default();
    GpuRun {
        truth,
        spans: collector.spans(),
        metrics,
        gpu_uuid,
        script_pids,
    }
}

fn hex_id(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn ms(a: u64, b: u64) -> f64 {
    (a as f64 - b as f64) / 1e6
}

/// Every forwarded runtime span carries the GPU and the start kind the truth gives it.
/// Returns (spans checked, cold ones).
fn check_request_facts(name: &str, run: &GpuRun) -> (usize, usize) {
    let requests = run.requests();
    let by_span: HashMap<String, &RequestTruth> =
        requests.iter().map(|r| (r.span_id.clone(), *r)).collect();
    let first_token = run.cold_start().and_then(|c| c.first_token_ns);
    // The runtime is on the GPU from its CUDA init; the agent sees it in the first poll after
    // the fake noticed the script change. A request that ended before then has no GPU yet.
    let on_gpu_seen = run
        .cold_start()
        .map(|c| c.cuda_init_start_ns + (PERIOD_MS + JITTER_MS) * 1_000_000)
        .unwrap_or(0);
    let forwarded = run.named("llm_request");
    assert_eq!(
        forwarded.len(),
        requests.len(),
        "{name}: every runtime span forwarded"
    );
    let mut cold = 0;
    for s in &forwarded {
        let id = hex_id(&s.span.span_id);
        let truth = by_span
            .get(&id)
            .unwrap_or_else(|| panic!("{name}: forwarded span {id} not in the truth"));
        let uuid = attr(&s.span, "inferwatch.gpu.uuid");
        if truth.stop_ns > on_gpu_seen || uuid.is_some() {
            assert_eq!(
                uuid.as_deref(),
                Some(run.gpu_uuid.as_str()),
                "{name}: {}: inferwatch.gpu.uuid",
                truth.request_id
            );
            let sm = attr(&s.span, "inferwatch.gpu.sm_util")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name}: {}: inferwatch.gpu.sm_util", truth.request_id));
            assert!((0.0..=100.0).contains(&sm), "{name}: sm_util {sm}");
        }
        let start = attr(&s.span, "inferwatch.start")
            .unwrap_or_else(|| panic!("{name}: {}: no inferwatch.start", truth.request_id));
        let expect = if truth.cold { "cold" } else { "warm" };
        // The runtime decides at admission, the agent from the span's arrival: they may only
        // differ for a request that arrived within a few ms of the first token.
        let near_first_token =
            first_token.is_some_and(|ft| truth.arrival_ns.abs_diff(ft) < 5_000_000);
        assert!(
            start == expect || near_first_token,
            "{name}: {}: inferwatch.start = {start}, truth {expect}",
            truth.request_id
        );
        cold += usize::from(start == "cold");
    }
    (forwarded.len(), cold)
}

/// The testbed plays the runtime as vLLM is: the serving process reads the requests, an engine
/// child holds the GPU (the fake NVML lists the child, never the server).
fn assert_engine_in_a_child(name: &str, run: &GpuRun) {
    let server = run.cold_start().expect("the runtime's truth").pid;
    let neighbours: Vec<u32> = run
        .contention()
        .iter()
        .filter_map(|c| c.neighbour_pid)
        .collect();
    let engines: Vec<u32> = run
        .script_pids
        .iter()
        .copied()
        .filter(|p| !neighbours.contains(p))
        .collect();
    assert_eq!(
        engines.len(),
        1,
        "{name}: one engine on the GPU: {engines:?}"
    );
    assert_ne!(
        engines[0], server,
        "{name}: the GPU is held by the engine child, not the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_contention_names_the_hog() {
    if !kernel_tests_enabled("gpu_contention_names_the_hog") {
        return;
    }
    let run = gpu_run("gpu-contention", "gpu-contention.toml").await;
    assert_engine_in_a_child("gpu-contention", &run);
    assert_contention("gpu-contention (kernel binding, no pid on the spans)", &run);
}

/// The same contention with each pid alias on the spans (issue 27's binding paths): the
/// result must not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_contention_by_each_binding_path() {
    if !kernel_tests_enabled("gpu_contention_by_each_binding_path") {
        return;
    }
    for alias in ["process_pid", "vllm_process_id"] {
        let run = gpu_run_with(
            &format!("gpu-contention-{alias}"),
            "gpu-contention.toml",
            &["--resource-pid", alias],
        )
        .await;
        assert_engine_in_a_child(alias, &run);
        assert_contention(&format!("gpu-contention ({alias} on the spans)"), &run);
    }
}

/// Scores a contention run against its truth: every interval named by findings that name the
/// hog, findings only over intervals, requests tagged; prints the figures.
fn assert_contention(label: &str, run: &GpuRun) {
    let intervals: Vec<&ContentionTruth> = run
        .contention()
        .into_iter()
        .filter(|c| c.factor > 1.0)
        .collect();
    assert!(!intervals.is_empty(), "the scenario has contention");
    let requests = run.requests();
    let spans_by_trace: HashMap<String, &RequestTruth> =
        requests.iter().map(|r| (r.trace_id.clone(), *r)).collect();
    let findings = run.named("inferwatch.gpu_contention");
    println!(
        "\n== {label}: {} requests, {} contention intervals, {} finding spans",
        requests.len(),
        intervals.len(),
        findings.len()
    );
    let mut named = 0;
    let mut matched_findings = 0;
    for c in &intervals {
        let pid = c.neighbour_pid.expect("the testbed ran a real neighbour");
        let exe = c
            .neighbour_executable
            .clone()
            .expect("the neighbour's command name");
        let overlapping: Vec<&&Received> = findings
            .iter()
            .filter(|f| {
                f.span.start_time_unix_nano < c.end_ns && f.span.end_time_unix_nano > c.start_ns
            })
            .collect();
        assert!(
            !overlapping.is_empty(),
            "gpu-contention: no finding overlaps the interval {} .. {} ({})",
            c.start_ns,
            c.end_ns,
            c.neighbour
        );
        let mut interval_named = 0;
        for f in &overlapping {
            matched_findings += 1;
            let got_pid = attr(&f.span, "inferwatch.noisy_neighbour.pid");
            let got_exe = attr(&f.span, "inferwatch.noisy_neighbour.executable");
            if got_pid.as_deref() == Some(pid.to_string().as_str())
                && got_exe.as_deref() == Some(exe.as_str())
            {
                interval_named += 1;
            }
            assert_eq!(
                attr(&f.span, "inferwatch.gpu.uuid").as_deref(),
                Some(run.gpu_uuid.as_str())
            );
            let inflation: f64 = attr(&f.span, "inferwatch.contention.tpot_inflation")
                .and_then(|v| v.parse().ok())
                .expect("tpot_inflation");
            assert!(
                inflation >= 1.5,
                "inflation {inflation} below the threshold"
            );
            for key in [
                "inferwatch.contention.tpot_baseline_ms",
                "inferwatch.contention.tpot_ms",
            ] {
                assert!(attr(&f.span, key).is_some(), "finding lacks {key}");
            }
            // A share in 0..1: the hog's SM use over the window (the scenario plays it at
            // `neighbour_sm_util` percent).
            let share: f64 = attr(&f.span, "inferwatch.noisy_neighbour.share")
                .and_then(|v| v.parse().ok())
                .expect("noisy_neighbour.share");
            assert!(
                share > 0.3 && share <= 1.0,
                "neighbour share {share} is not the hog's SM share in 0..1"
            );
            // In the trace of an affected request, under its runtime span.
            let trace = hex_id(&f.span.trace_id);
            let request = spans_by_trace
                .get(&trace)
                .unwrap_or_else(|| panic!("finding in trace {trace}, not a request's"));
            assert_eq!(hex_id(&f.span.parent_span_id), request.span_id);
            let first = request.first_token_ns.unwrap_or(request.arrival_ns);
            assert!(
                first < c.end_ns && request.stop_ns > c.start_ns,
                "{}: decoded {}..{}, outside the interval",
                request.request_id,
                first,
                request.stop_ns
            );
        }
        let share = overlapping
            .first()
            .and_then(|f| attr(&f.span, "inferwatch.noisy_neighbour.share"))
            .unwrap_or_default();
        let (f_start, f_end) = overlapping
            .iter()
            .map(|f| (f.span.start_time_unix_nano, f.span.end_time_unix_nano))
            .fold((u64::MAX, 0), |(a, b), (s, e)| (a.min(s), b.max(e)));
        println!(
            "   interval of {:.1} s (truth, hog pid {pid} `{exe}`, {}% SM): {} finding spans, \
             {interval_named} name the hog; found {:+.0} ms .. {:+.0} ms from the truth's bounds; share {share}",
            ms(c.end_ns, c.start_ns) / 1e3,
            c.neighbour_sm_util,
            overlapping.len(),
            ms(f_start, c.start_ns),
            ms(f_end, c.end_ns),
        );
        assert_eq!(
            interval_named,
            overlapping.len(),
            "gpu-contention: every finding over the interval names the hog (pid {pid}, {exe})"
        );
        named += interval_named;
    }
    assert_eq!(
        matched_findings,
        findings.len(),
        "gpu-contention: a finding outside every contention interval"
    );
    println!(
        "   named-hog rate: {named}/{} findings ({:.3}), every interval named",
        findings.len(),
        named as f64 / findings.len().max(1) as f64
    );
    // Requests decoded in the interval carry the neighbour on their own span too.
    let tagged = run
        .named("llm_request")
        .iter()
        .filter(|s| attr(&s.span, "inferwatch.noisy_neighbour.pid").is_some())
        .count();
    assert!(
        tagged >= 1,
        "gpu-contention: no forwarded span carries the neighbour"
    );
    // Against the truth: the requests whose decode overlapped an interval.
    let truth_contended: Vec<&str> = requests
        .iter()
        .filter(|r| {
            let first = r.first_token_ns.unwrap_or(r.arrival_ns);
            intervals
                .iter()
                .any(|c| first < c.end_ns && r.stop_ns > c.start_ns)
        })
        .map(|r| r.span_id.as_str())
        .collect();
    let tagged_ids: Vec<String> = run
        .named("llm_request")
        .iter()
        .filter(|s| attr(&s.span, "inferwatch.noisy_neighbour.pid").is_some())
        .map(|s| hex_id(&s.span.span_id))
        .collect();
    let tagged_in = tagged_ids
        .iter()
        .filter(|id| truth_contended.contains(&id.as_str()))
        .count();
    println!(
        "   requests tagged: {tagged_in} of {} decoded during contention (truth), {} outside",
        truth_contended.len(),
        tagged_ids.len() - tagged_in
    );
    assert_eq!(
        tagged_in,
        tagged_ids.len(),
        "{label}: a request tagged outside every interval"
    );
    let (checked, cold) = check_request_facts(label, run);
    println!(
        "   forwarded spans: {checked} with GPU facts ({cold} cold), {tagged} with the neighbour"
    );
    let hog = intervals[0]
        .neighbour_executable
        .clone()
        .unwrap_or_default();
    assert!(
        run.metrics.lines().any(
            |l| l.starts_with("inferwatch_gpu_contention_seconds_total{")
                && l.contains(&format!("neighbour=\"{hog}\""))
        ),
        "gpu-contention: no contention seconds for {hog}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_phases_match_the_truth() {
    if !kernel_tests_enabled("cold_start_phases_match_the_truth") {
        return;
    }
    let run = gpu_run("cold-start", "cold-start.toml").await;
    assert_engine_in_a_child("cold-start", &run);
    let cs = run.cold_start().expect("cold-start truth").clone();
    let first_token = cs.first_token_ns.expect("the runtime served a token");
    let first_request = cs.first_request_ns.expect("a request came");
    let roots: Vec<&Received> = run
        .named("inferwatch.cold_start")
        .into_iter()
        .filter(|s| attr(&s.span, "process.pid") == Some(cs.pid.to_string()))
        .collect();
    assert_eq!(roots.len(), 1, "cold-start: one finding for pid {}", cs.pid);
    let root = roots[0];
    assert_eq!(
        attr(&root.span, "process.executable.name").as_deref(),
        Some("iw-testbed")
    );
    // In the trace of the request that got the first token, under its runtime span.
    let requests = run.requests();
    let parent = requests
        .iter()
        .find(|r| r.span_id == hex_id(&root.span.parent_span_id))
        .expect("cold_start's parent is a request span");
    assert_eq!(parent.trace_id, hex_id(&root.span.trace_id));
    assert_eq!(
        parent.first_token_ns,
        Some(first_token),
        "the parent got the first token"
    );

    let phases: HashMap<String, &Received> = run
        .spans
        .iter()
        .filter(|s| s.span.parent_span_id == root.span.span_id)
        .filter_map(|s| {
            s.span
                .name
                .strip_prefix("inferwatch.cold_start.")
                .map(|p| (p.to_owned(), s))
        })
        .collect();
    let period = PERIOD_MS * 1_000_000;
    let slack = JITTER_MS * 1_000_000;
    // (phase, its end in the truth, tolerance before, tolerance after): the first sighting is
    // seen in an NVML sample, up to one period late, never early. The memory plateau is judged
    // on the samples up to the first token: placed at the first sample on it (up to one period
    // late), or, when the first token comes less than a period after the load ends (this
    // scenario has no warmup between loading and listening), at the last sample before the
    // first token (up to one period early). The others come from /proc (10 ms clock ticks),
    // the kernel or the span, and are held to the same period either way.
    let expected: [(&str, u64, u64, u64); 5] = [
        ("process_start", cs.cuda_init_start_ns, 0, period + slack),
        (
            "weights_load",
            cs.weights_done_ns,
            period + slack,
            period + slack,
        ),
        ("warmup", cs.listen_ns, period, period),
        ("wait_first_request", first_request, period, period),
        ("first_token", first_token, period, period),
    ];
    println!(
        "\n== cold-start: pid {}, floor (truth) {:.0} ms, agent {} ms; NVML period {PERIOD_MS} ms",
        cs.pid,
        ms(first_token, cs.exec_ns),
        attr(&root.span, "inferwatch.cold_start.floor_ms").unwrap_or_default()
    );
    let exec_err = ms(root.span.start_time_unix_nano, cs.exec_ns);
    println!("   exec                 error {exec_err:+7.1} ms");
    assert!(
        exec_err.abs() <= PERIOD_MS as f64,
        "cold-start: t_exec off by {exec_err} ms"
    );
    let mut previous_end = root.span.start_time_unix_nano;
    for (phase, truth_end, early, late) in expected {
        let span = phases
            .get(phase)
            .unwrap_or_else(|| panic!("cold-start: no inferwatch.cold_start.{phase} span"));
        let (start, end) = (span.span.start_time_unix_nano, span.span.end_time_unix_nano);
        let err = ms(end, truth_end);
        println!(
            "   {phase:<20} error {err:+7.1} ms (allowed -{} .. +{} ms), length {:.0} ms",
            early / 1_000_000,
            late / 1_000_000,
            ms(end, start)
        );
        assert!(
            end + early >= truth_end && end <= truth_end + late,
            "cold-start: {phase} ends {err:+.1} ms from the truth"
        );
        assert_eq!(
            start, previous_end,
            "cold-start: {phase} starts where the last ended"
        );
        previous_end = end;
    }
    assert_eq!(root.span.end_time_unix_nano, previous_end);
    let floor: f64 = attr(&root.span, "inferwatch.cold_start.floor_ms")
        .and_then(|v| v.parse().ok())
        .expect("floor_ms");
    assert!(
        (floor - ms(first_token, cs.exec_ns)).abs() <= 2.0 * PERIOD_MS as f64,
        "cold-start: floor {floor} ms"
    );
    let (checked, cold) = check_request_facts("cold-start", &run);
    assert!(cold >= 1, "cold-start: the first requests are cold");
    println!("   forwarded spans: {checked} with GPU facts, {cold} cold");
    assert!(
        run.metrics.lines().any(
            |l| l.starts_with("inferwatch_cold_start_floor_seconds_count") && !l.ends_with(" 0")
        ),
        "cold-start: the floor histogram has an observation"
    );

    // The clients came before the runtime listened and retried like a gateway: every attempt
    // the port refused counts as having waited for this start, and the earliest waited from
    // its first attempt to the listen.
    let waiting: Vec<&ClientTruth> = run
        .truth
        .client
        .iter()
        .filter(|c| c.refused_attempts > 0)
        .collect();
    let refused_truth: u64 = waiting.iter().map(|c| u64::from(c.refused_attempts)).sum();
    assert!(
        refused_truth > 0,
        "cold-start: clients came before the listen"
    );
    let refused: u64 = attr(&root.span, "inferwatch.cold_start.refused_connections")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let earliest = waiting.iter().map(|c| c.start_ns).min().unwrap_or(0);
    let wait: f64 = attr(&root.span, "inferwatch.cold_start.refused_wait_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0);
    println!(
        "   refused before listen: truth {refused_truth} attempts by {} requests, agent {refused}; \
         earliest waited {:.1} ms, agent {wait:.1} ms",
        waiting.len(),
        ms(cs.listen_ns, earliest)
    );
    assert_eq!(refused, refused_truth, "cold-start: refused attempts");
    assert!(
        (wait - ms(cs.listen_ns, earliest)).abs() <= PERIOD_MS as f64,
        "cold-start: the earliest refused attempt waited {wait} ms"
    );
    assert_eq!(
        metric_sum(&run.metrics, "inferwatch_refused_connections_total", ""),
        refused_truth as f64,
        "cold-start: inferwatch_refused_connections_total"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benign_gpu_neighbour_is_no_finding() {
    if !kernel_tests_enabled("benign_gpu_neighbour_is_no_finding") {
        return;
    }
    let run = gpu_run("benign-gpu", "benign-gpu.toml").await;
    let light = run
        .contention()
        .first()
        .and_then(|c| c.neighbour_pid)
        .expect("the light neighbour ran as a real process");
    let findings = run.named("inferwatch.gpu_contention");
    assert!(
        findings.is_empty(),
        "benign-gpu: {} contention findings, e.g. {:?}",
        findings.len(),
        findings.first().map(|f| &f.span.attributes)
    );
    assert!(
        run.named("inferwatch.abort").is_empty(),
        "benign-gpu: no abort either"
    );
    let tagged = run
        .named("llm_request")
        .iter()
        .filter(|s| attr(&s.span, "inferwatch.noisy_neighbour.pid").is_some())
        .count();
    assert_eq!(tagged, 0, "benign-gpu: a request carries a neighbour");
    let (checked, cold) = check_request_facts("benign-gpu", &run);
    // The agent saw the light neighbour (its per-process gauge), and still found nothing.
    let seen = run.metrics.lines().any(|l| {
        l.starts_with("inferwatch_gpu_process_sm_utilization_percent")
            && l.contains(&format!("pid=\"{light}\""))
    });
    println!(
        "\n== benign-gpu: {checked} forwarded spans with GPU facts ({cold} cold), 0 findings; light neighbour pid {light} in the gauges: {seen}"
    );
}
