//! Drives named scenarios end to end over loopback (real sockets) and checks that the ground
//! truth is internally consistent.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use inferwatch_testbed::config::Scenario;
use inferwatch_testbed::runtime::{self, ServeOptions};
use inferwatch_testbed::traffic::{self, TrafficOptions};
use inferwatch_testbed::truth::{ClientTruth, JsonlWriter, TruthRecord, read_jsonl};

fn scenario(name: &str) -> Scenario {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../scenarios/{name}.toml"));
    Scenario::load(&p).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iw-testbed-{}-{name}", std::process::id()))
}

async fn drive(s: &Scenario, scale: f64, tag: &str) -> (Vec<TruthRecord>, Vec<ClientTruth>) {
    let truth = tmp(&format!("{tag}.jsonl"));
    let client = tmp(&format!("{tag}-client.jsonl"));
    let running = runtime::start(ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        runtime: s.runtime.clone(),
        duration_scale: scale,
        truth: Some(truth.clone()),
        otlp_endpoint: None,
        nvml_script: None,
    })
    .await
    .unwrap();
    let writer = Arc::new(JsonlWriter::create(Some(&client)).unwrap());
    let sum = traffic::run(
        traffic::plan(s).unwrap(),
        TrafficOptions {
            target: running.addr.to_string(),
            model: s.runtime.model.clone(),
            duration_scale: scale,
            connect_timeout: Duration::from_secs(10),
        },
        writer,
    )
    .await;
    assert!(sum.requests > 0);
    assert_eq!(sum.errors, 0, "{sum:?}");
    for _ in 0..1000 {
        if running.engine.load() == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.shutdown().await;
    let t = read_jsonl(&truth).unwrap();
    let c = read_jsonl(&client).unwrap();
    let _ = std::fs::remove_file(truth);
    let _ = std::fs::remove_file(client);
    (t, c)
}

/// Checks shared by every scenario.
fn check_consistency(truth: &[TruthRecord], client: &[ClientTruth]) {
    let reqs: Vec<_> = truth
        .iter()
        .filter_map(|r| match r {
            TruthRecord::Request(q) => Some(q),
            _ => None,
        })
        .collect();
    assert_eq!(
        reqs.len(),
        client.len(),
        "one server record per client request"
    );
    let by_id: HashMap<&str, &ClientTruth> =
        client.iter().map(|c| (c.request_id.as_str(), c)).collect();
    for q in &reqs {
        assert!(q.tokens_after_abort <= q.output_tokens, "{q:?}");
        assert!(q.output_tokens <= q.max_tokens);
        assert!(q.cached_tokens < q.prompt_tokens && q.cached_tokens % 16 == 0);
        assert_eq!(q.cached_tokens as usize, q.hit_blocks.len() * 16);
        assert!(q.arrival_ns <= q.stop_ns);
        if let Some(f) = q.first_token_ns {
            assert!(q.arrival_ns <= f && f <= q.stop_ns);
        }
        if q.client_abort_ns.is_none() {
            assert_eq!(q.tokens_after_abort, 0);
        }
        let c = by_id[q.request_id.as_str()];
        // The trace id of the span is the client's (traceparent propagated).
        assert_eq!(q.trace_id, c.trace_id);
        assert_eq!(q.runtime_request_id, format!("chatcmpl-{}", c.request_id));
        assert!(c.tokens_received <= q.output_tokens);
        match c.close.as_str() {
            "complete" => {
                assert_eq!(c.tokens_received, q.output_tokens, "{q:?} {c:?}");
                assert!(q.client_abort_ns.is_none());
                if c.stream {
                    assert_eq!(c.cached_tokens, Some(q.cached_tokens));
                }
            }
            "fin" | "rst" => {
                let seen = q.client_abort_ns.expect("server saw the abort");
                assert!(
                    seen >= c.close_ns,
                    "server saw the close after the client did it"
                );
                assert_eq!(Some(c.tokens_received), c.abort_after_tokens);
            }
            other => panic!("unexpected close {other}"),
        }
    }
    // Replay the KV-cache history: blocks are resident from their storing request's stop
    // until an eviction names them. Every hit must be resident at admission, every evicted
    // block resident at eviction.
    enum Ev<'a> {
        Store(&'a [u64]),
        Evict(&'a [u64]),
        Hit(&'a [u64], &'a str),
    }
    let mut timeline: Vec<(u64, u8, Ev)> = Vec::new();
    for r in truth {
        match r {
            TruthRecord::Request(q) => {
                timeline.push((q.stop_ns, 2, Ev::Store(&q.stored_blocks)));
                if let Some(s) = q.scheduled_ns {
                    timeline.push((s, 1, Ev::Hit(&q.hit_blocks, &q.request_id)));
                }
            }
            TruthRecord::Eviction(e) => {
                assert!(!e.victim_blocks.is_empty());
                timeline.push((e.time_ns, 0, Ev::Evict(&e.victim_blocks)));
            }
            _ => {}
        }
    }
    // Same timestamp: evictions happen during admission, before the hits are taken, and
    // stores of requests finishing in the same step come after.
    timeline.sort_by_key(|(t, o, _)| (*t, *o));
    let mut resident: HashSet<u64> = HashSet::new();
    for (_, _, ev) in timeline {
        match ev {
            Ev::Store(b) => resident.extend(b.iter().copied()),
            Ev::Evict(b) => {
                for h in b {
                    assert!(resident.remove(h), "evicted block {h} was not resident");
                }
            }
            Ev::Hit(b, id) => {
                for h in b {
                    assert!(resident.contains(h), "{id}: hit on non-resident block {h}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_storm_truth_is_consistent() {
    let s = scenario("abort-storm");
    let (truth, client) = drive(&s, 0.5, "storm").await;
    check_consistency(&truth, &client);
    let aborted: Vec<_> = truth
        .iter()
        .filter_map(|r| match r {
            TruthRecord::Request(q) if q.client_abort_ns.is_some() => Some(q),
            _ => None,
        })
        .collect();
    assert!(!aborted.is_empty());
    // Policy `never`: every aborted request still decoded to max_tokens, and billed tokens
    // after the abort.
    assert!(aborted.iter().all(|q| q.output_tokens == q.max_tokens));
    assert!(aborted.iter().map(|q| q.tokens_after_abort).sum::<u64>() > 0);
    let hows: HashSet<_> = aborted.iter().filter_map(|q| q.client_abort_how).collect();
    assert!(hows.len() >= 2, "both FIN and RST seen: {hows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn noisy_tenant_evicts_and_truth_is_consistent() {
    let s = scenario("noisy-tenant");
    let (truth, client) = drive(&s, 0.6, "noisy").await;
    check_consistency(&truth, &client);
    let cross = truth.iter().any(|r| {
        matches!(r, TruthRecord::Eviction(e) if e.victim_tenant == "victim" && e.by_tenant == "noisy")
    });
    assert!(cross, "the noisy tenant evicted the victim's blocks");
}

#[tokio::test(flavor = "multi_thread")]
async fn immediate_policy_stops_soon_after_abort() {
    let mut s = scenario("abort-storm");
    s.runtime.disconnect_policy = "immediate".into();
    s.duration_s = 3.0;
    let (truth, client) = drive(&s, 0.5, "immediate").await;
    check_consistency(&truth, &client);
    for r in &truth {
        if let TruthRecord::Request(q) = r
            && q.client_abort_ns.is_some()
        {
            assert_eq!(q.finish_reason, "abort");
            assert!(q.tokens_after_abort <= 1, "{q:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_replay_runs_and_shares_prefixes() {
    let s = scenario("trace-replay");
    let plan = traffic::plan(&s).unwrap();
    assert_eq!(plan.len(), 8 + 6);
    let (truth, client) = drive(&s, 1.0, "replay").await;
    assert_eq!(client.len(), 14);
    assert!(client.iter().all(|c| c.close == "complete"));
    // Mooncake rows 1 and 4 carry the same hash_ids [0, 1, 2]: the later one hits the cache.
    let hit = truth.iter().any(|r| {
        matches!(r, TruthRecord::Request(q) if q.tenant == "mooncake" && q.cached_tokens >= 1024)
    });
    assert!(hit);
}

#[test]
fn plans_are_reproducible() {
    let s = scenario("noisy-tenant");
    let a = traffic::plan(&s).unwrap();
    let b = traffic::plan(&s).unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.id, y.id);
        assert_eq!(x.turns.len(), y.turns.len());
        assert_eq!(x.turns[0].user_text, y.turns[0].user_text);
        assert_eq!(x.turns[0].trace_id, y.turns[0].trace_id);
    }
    for name in [
        "abort-storm",
        "noisy-tenant",
        "cold-start",
        "gpu-contention",
        "benign",
    ] {
        assert!(
            !traffic::plan(&scenario(name)).unwrap().is_empty(),
            "{name}"
        );
    }
}
