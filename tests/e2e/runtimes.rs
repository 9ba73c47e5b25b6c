//! SGLang- and TGI-shaped runs of the testbed, end to end (issue 28): the runtime's real span
//! shapes (names, 64-bit ids, attributes, what an abort leaves out), the agent on the real
//! kernel joining them to the connections and finding the aborts, scored against the testbed's
//! ground truth. The vLLM shape is covered by `abort.rs`.

use std::collections::HashMap;

use inferwatch_testbed::truth::{ClientTruth, RequestTruth, TruthRecord};

use crate::abort_truth::AbortTruth;
use crate::harness::{
    Agent, Collector, attr, free_port, kernel_tests_enabled, metric_sum, now_ns, run_testbed,
    scratch, serial,
};

/// The tenant whose client sends no `traceparent` in both scenarios.
const NO_TRACEPARENT_TENANT: &str = "initech";

/// Which runtime's request span a forwarded span is.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Sglang,
    Tgi,
}

impl Shape {
    fn is_request_span(self, name: &str) -> bool {
        match self {
            // `f"{role} Req {rid[:8]}"` with the empty role of the normal mode.
            Shape::Sglang => name.starts_with(" Req "),
            Shape::Tgi => matches!(
                name,
                "chat_completions" | "completions" | "generate" | "generate_stream"
            ),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Shape::Sglang => "sglang",
            Shape::Tgi => "tgi",
        }
    }
}

/// What one run scored.
#[derive(Debug, Default)]
struct Score {
    requests: usize,
    /// Requests whose client left before the runtime stopped.
    expected: usize,
    /// Of those, the ones that sent a `traceparent`.
    expected_traced: usize,
    /// Findings on requests that left early and may have one (every true one, and those
    /// with one or two tokens after the close, which interpolation may round to none).
    permitted: usize,
    /// Requests with a traceparent whose client left early (finding or not).
    left_traced: usize,
    found: usize,
    true_positives: usize,
    true_positives_traced: usize,
    /// `inferwatch.join` of every forwarded request span.
    joins: HashMap<String, usize>,
    /// (method, tokens after per the agent, truth after the server noticed, truth after the
    /// client's close, agent lag ms, truth lag ms, id).
    /// Method, the agent's tokens after, the truth, the agent's lag (ms), the request id.
    matched: Vec<(String, u64, AbortTruth, f64, String)>,
    /// `inferwatch_runtime_spans_total{runtime=<shape>,adapted}`: (true, false).
    runtime_spans: (u64, u64),
    /// Spans of the shape's runtime the collector received that are not request spans.
    other_spans: usize,
    /// Forwarded request spans that SGLang ended as aborted (`'["abort"]'`).
    aborted_spans: usize,
    /// Request spans forwarded.
    forwarded: usize,
    /// True findings made without a runtime span (the kernel's view alone).
    kernel_only: usize,
}

/// `omitted_roots`: the runtime exports no request span for a request whose client it saw
/// disconnect (the testbed's `omit_disconnected_root`).
async fn run(shape: Shape, scenario: &str, extra: &[&str], omitted_roots: bool) -> Score {
    let name = format!("runtimes-{}", shape.label());
    let _one_at_a_time = serial().await;
    let dir = scratch(&name);
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start(port, backend).await;
    let truth = run_testbed(scenario, port, agent.otlp_grpc, extra, &dir).await;
    let requests: Vec<&RequestTruth> = truth
        .server
        .iter()
        .filter_map(|r| match r {
            TruthRecord::Request(r) => Some(r),
            _ => None,
        })
        .collect();
    let omitted = |r: &RequestTruth| omitted_roots && r.client_abort_ns.is_some();
    let expected_spans = requests.iter().filter(|r| !omitted(r)).count();
    let deadline = now_ns() + 15_000_000_000;
    loop {
        let forwarded = collector
            .spans()
            .iter()
            .filter(|s| shape.is_request_span(&s.span.name))
            .count();
        if forwarded >= expected_spans || now_ns() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let metrics = agent.scrape().await;
    agent.stop().await;
    let received = collector.spans();

    let clients: HashMap<&str, &ClientTruth> = truth
        .client
        .iter()
        .map(|c| (c.request_id.as_str(), c))
        .collect();
    let findings: HashMap<String, _> = received
        .iter()
        .filter(|s| s.span.name == "inferwatch.abort")
        .map(|s| (hex::encode(&s.span.trace_id), s))
        .collect();
    // A finding without a runtime span and without a traceparent starts its own trace; it
    // names the request by its `x-request-id`.
    let findings_by_request_id: HashMap<String, _> = findings
        .values()
        .filter_map(|f| attr(&f.span, "gen_ai.request.id").map(|id| (id, *f)))
        .collect();
    let forwarded: HashMap<(String, String), _> = received
        .iter()
        .filter(|s| shape.is_request_span(&s.span.name))
        .map(|s| {
            (
                (hex::encode(&s.span.trace_id), hex::encode(&s.span.span_id)),
                s,
            )
        })
        .collect();
    let mut score = Score {
        requests: requests.len(),
        found: findings.len(),
        runtime_spans: (
            metric_sum(
                &metrics,
                "inferwatch_runtime_spans_total",
                &format!("runtime=\"{}\",adapted=\"true\"", shape.label()),
            ) as u64,
            metric_sum(
                &metrics,
                "inferwatch_runtime_spans_total",
                &format!("runtime=\"{}\",adapted=\"false\"", shape.label()),
            ) as u64,
        ),
        other_spans: received
            .iter()
            .filter(|s| s.service != "inferwatch" && !shape.is_request_span(&s.span.name))
            .count(),
        ..Score::default()
    };
    for r in &requests {
        let client = clients
            .get(r.request_id.as_str())
            .unwrap_or_else(|| panic!("{name}: no client truth for {}", r.request_id));
        let traced = client.tenant != NO_TRACEPARENT_TENANT;
        let truth = AbortTruth::of(
            r,
            matches!(client.close.as_str(), "fin" | "rst"),
            client.close_ns,
        );
        let (must_find, may_find) = (truth.must_find(), truth.may_find());
        score.left_traced += usize::from(truth.left_early && traced);
        if omitted(r) {
            assert!(
                !forwarded.contains_key(&(r.trace_id.clone(), r.span_id.clone())),
                "{name}: {}: the root of a disconnected request is never exported",
                r.request_id
            );
            if must_find {
                score.expected += 1;
                score.expected_traced += usize::from(traced);
            }
            let finding = if traced {
                findings.get(&r.trace_id)
            } else {
                findings_by_request_id.get(&r.request_id)
            };
            match (may_find, finding) {
                (true, Some(f)) => {
                    score.true_positives += usize::from(must_find);
                    score.true_positives_traced += usize::from(must_find && traced);
                    score.permitted += 1;
                    score.kernel_only += 1;
                    if traced {
                        assert_eq!(
                            hex::encode(&f.span.parent_span_id),
                            client.parent_span_id,
                            "{name}: {}: without a runtime span the finding's parent is the client's span",
                            r.request_id
                        );
                    }
                    let method = attr(&f.span, "inferwatch.abort.method").expect("method");
                    let after: u64 = attr(&f.span, "inferwatch.abort.tokens_after")
                        .and_then(|v| v.parse().ok())
                        .expect("tokens_after");
                    let lag: f64 = attr(&f.span, "inferwatch.abort.lag_ms")
                        .and_then(|v| v.parse().ok())
                        .expect("lag_ms");
                    score
                        .matched
                        .push((method, after, truth, lag, r.request_id.clone()));
                }
                (false, Some(f)) => panic!(
                    "{name}: finding for {} which did not abort early: {:?}",
                    r.request_id, f.span.attributes
                ),
                _ => {}
            }
            continue;
        }
        let span = forwarded
            .get(&(r.trace_id.clone(), r.span_id.clone()))
            .unwrap_or_else(|| panic!("{name}: request span of {} not forwarded", r.request_id));
        score.forwarded += 1;
        let rule = attr(&span.span, "inferwatch.join").unwrap_or_else(|| "missing".into());
        if traced {
            assert_eq!(
                r.trace_id, client.trace_id,
                "{name}: {}: the runtime continues the client's trace",
                r.request_id
            );
            assert_eq!(
                rule, "traceparent",
                "{name}: {}: a traced request joins by its traceparent",
                r.request_id
            );
        } else {
            assert_ne!(
                rule, "traceparent",
                "{name}: {}: a runtime-started trace cannot join by traceparent",
                r.request_id
            );
            if matches!(shape, Shape::Sglang) {
                assert!(
                    r.trace_id.starts_with("0000000000000000"),
                    "{name}: {}: SGLang starts 64-bit traces, got {}",
                    r.request_id,
                    r.trace_id
                );
            }
        }
        *score.joins.entry(rule).or_default() += 1;
        if attr(&span.span, "gen_ai.response.finish_reasons").as_deref() == Some("[\"abort\"]") {
            score.aborted_spans += 1;
        }

        if must_find {
            score.expected += 1;
            score.expected_traced += usize::from(traced);
        }
        match (may_find, findings.get(&r.trace_id)) {
            (true, Some(f)) => {
                score.true_positives += usize::from(must_find);
                score.true_positives_traced += usize::from(must_find && traced);
                score.permitted += 1;
                assert_eq!(
                    hex::encode(&f.span.parent_span_id),
                    r.span_id,
                    "{name}: {}: the finding's parent is the request span",
                    r.request_id
                );
                let how = attr(&f.span, "inferwatch.abort.how").expect("how");
                assert_eq!(how, client.close, "{name}: {}: close kind", r.request_id);
                let method = attr(&f.span, "inferwatch.abort.method").expect("method");
                let after: u64 = attr(&f.span, "inferwatch.abort.tokens_after")
                    .and_then(|v| v.parse().ok())
                    .expect("tokens_after");
                let lag: f64 = attr(&f.span, "inferwatch.abort.lag_ms")
                    .and_then(|v| v.parse().ok())
                    .expect("lag_ms");
                score
                    .matched
                    .push((method, after, truth, lag, r.request_id.clone()));
            }
            (false, Some(f)) => panic!(
                "{name}: finding for {} which did not abort early (client {} at {}, stop {}): {:?}",
                r.request_id, client.close, client.close_ns, r.stop_ns, f.span.attributes
            ),
            (true, None) | (false, None) => {}
        }
    }
    report(&name, &score);
    score
}

fn report(name: &str, score: &Score) {
    println!(
        "\n== {name}: {} requests, {} aborted early ({} traced), {} findings ({} true, {} of them traced)",
        score.requests,
        score.expected,
        score.expected_traced,
        score.found,
        score.true_positives,
        score.true_positives_traced
    );
    let mut joins: Vec<_> = score.joins.iter().collect();
    joins.sort();
    for (rule, n) in joins {
        println!("   join {rule:<12} {n:>4}");
    }
    let mut by_method: HashMap<&str, (usize, u64, u64)> = HashMap::new();
    for (method, agent, truth, _, _) in &score.matched {
        let e = by_method.entry(method.as_str()).or_default();
        e.0 += 1;
        e.1 += truth.after_noticed;
        e.2 += truth.after_noticed.abs_diff(*agent);
    }
    for (method, (n, truth, err)) in by_method {
        println!(
            "   method {method:<13} {n:>3} findings, tokens after (truth) {truth:>5}, absolute error {err:>3}"
        );
    }
    println!(
        "   request spans forwarded {}, findings made from the kernel alone {}",
        score.forwarded, score.kernel_only
    );
    println!(
        "   inferwatch_runtime_spans_total: adapted=true {}, adapted=false {} (other spans received: {}); request spans ended as aborted: {}",
        score.runtime_spans.0, score.runtime_spans.1, score.other_spans, score.aborted_spans
    );
}

fn assert_scores(name: &str, score: &Score) {
    assert!(
        score.left_traced >= 10,
        "{name}: too few traced aborts to score ({})",
        score.left_traced
    );
    assert_eq!(
        score.true_positives_traced, score.expected_traced,
        "{name}: recall below 1.0 on the requests with a traceparent"
    );
    assert_eq!(score.permitted, score.found, "{name}: precision below 1.0");
    for (method, agent, truth, lag, id) in &score.matched {
        if let Err(e) = truth.check_tokens_after(method, *agent) {
            panic!("{name}: {id}: {e}");
        }
        assert!(
            (lag - truth.lag_ms).abs() <= 5.0,
            "{name}: {id}: lag {lag:.2} ms vs truth {:.2} ms",
            truth.lag_ms
        );
    }
    assert_eq!(score.joins.get("missing"), None, "{name}: inferwatch.join");
    // Every request span was adapted, and the runtime's other spans (SGLang's thread and stage
    // spans, TGI's SERVER spans) were counted as its own, not adapted.
    assert_eq!(
        score.runtime_spans.0, score.forwarded as u64,
        "{name}: adapted request spans"
    );
    assert!(
        score.runtime_spans.1 > 0 && score.runtime_spans.1 == score.other_spans as u64,
        "{name}: the runtime's other spans counted as not adapted: {:?} vs {} received",
        score.runtime_spans,
        score.other_spans
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_shaped_run_joins_and_finds_aborts() {
    if !kernel_tests_enabled("sglang_shaped_run_joins_and_finds_aborts") {
        return;
    }
    let score = run(Shape::Sglang, "e2e-sglang.toml", &[], false).await;
    assert_scores("sglang", &score);
    assert!(
        score.matched.iter().any(|m| m.0 == "kernel_writes"),
        "SGLang's 2 s abort delay: writes after the client left are counted"
    );
    assert!(
        score.aborted_spans > 0,
        "SGLang's 2 s abort delay cuts the longest streams short"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_shaped_run_decoding_to_max_tokens() {
    if !kernel_tests_enabled("sglang_shaped_run_decoding_to_max_tokens") {
        return;
    }
    let score = run(
        Shape::Sglang,
        "e2e-sglang.toml",
        &["--policy", "never"],
        false,
    )
    .await;
    assert_scores("sglang-never", &score);
    assert_eq!(
        score.aborted_spans, 0,
        "the variant that decodes every request to max_tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_shaped_run_joins_and_finds_aborts() {
    if !kernel_tests_enabled("tgi_shaped_run_joins_and_finds_aborts") {
        return;
    }
    let score = run(Shape::Tgi, "e2e-tgi.toml", &[], false).await;
    assert_scores("tgi", &score);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_shaped_run_without_roots_of_disconnected_requests() {
    if !kernel_tests_enabled("sglang_shaped_run_without_roots_of_disconnected_requests") {
        return;
    }
    let score = run(Shape::Sglang, "e2e-sglang-noroot.toml", &[], true).await;
    assert_scores("sglang-noroot", &score);
    assert!(
        score.kernel_only >= 10,
        "the aborts are found from the kernel alone ({})",
        score.kernel_only
    );
    assert_eq!(score.aborted_spans, 0, "no aborted root is ever exported");
}
