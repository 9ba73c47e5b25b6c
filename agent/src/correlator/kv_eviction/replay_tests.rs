//! Replays of what a real vLLM 0.32 published: KV events and prefill times.

use std::collections::HashSet;

use super::*;
use crate::sources::kvevents::decode_message;

/// The batches a real vLLM 0.32 published (`tests/real-vllm/fixtures`).
pub(super) fn recorded(instance: &str) -> Vec<KvEventBatch> {
    let text = include_str!("../../../../tests/real-vllm/fixtures/kv_events_vllm_0.32.jsonl");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
            let frames: Vec<Vec<u8>> = v["frames"]
                .as_array()
                .expect("frames")
                .iter()
                .map(|f| hex::decode(f.as_str().expect("hex")).expect("hex frame"))
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            decode_message(&refs, instance).expect("decodes")
        })
        .collect()
}

const MS: u64 = 1_000_000;

fn request(
    trace: u8,
    tenant: &str,
    conversation: Option<&str>,
    prefill: (UnixNanos, UnixNanos),
    end: UnixNanos,
    prompt: u64,
) -> RuntimeRequest {
    RuntimeRequest {
        runtime: crate::model::RuntimeKind::Vllm,
        trace_id: [trace; 16],
        span_id: [trace; 8],
        parent_span_id: None,
        request_id: None,
        model: Some("m".into()),
        tenant: Some(tenant.into()),
        conversation: conversation.map(Into::into),
        client: None,
        // vLLM 0.32: a random service.instance.id; the API server's pid ties the KV
        // endpoint (named `pid:<pid>` by discovery) to the spans.
        instance: InstanceIdentity {
            service_name: Some("vllm".into()),
            service_instance_id: Some("5f0c2a9e-random".into()),
            pid: Some(4242),
            host_name: None,
        },
        arrival: prefill.0,
        queue_ns: Some(0),
        prefill_ns: None,
        first_token: Some(prefill.1),
        end,
        prompt_tokens: Some(prompt),
        cached_tokens: None,
        output_tokens: Some(16),
        finish_reason: Some("stop".into()),
        token_times: Vec::new(),
    }
}

fn stored(b: &KvEventBatch) -> Vec<u64> {
    b.events
        .iter()
        .flat_map(|e| match e {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn removed(b: &KvEventBatch) -> Vec<u64> {
    b.events
        .iter()
        .flat_map(|e| match e {
            KvEvent::BlockRemoved { block_hashes, .. } => block_hashes.clone(),
            _ => Vec::new(),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Twist {
    None,
    /// An `AllBlocksCleared` between the victim's turns.
    Cleared,
    /// The batch with the sequence number 7 lost.
    Gap,
    /// A noisy request in prefill when the victim's first turn stored its blocks.
    ConcurrentFirstTurn,
}

struct Replay {
    findings: Vec<KvEvictionFinding>,
    stats: KvEvictionStats,
    /// The victim's blocks that the noisy prompts' batches removed, in chain order.
    victim_lost: usize,
    /// The noisy requests whose batches removed the victim's blocks.
    evictor_traces: Vec<u8>,
    /// When the victim's second turn settled, and when the finding came.
    victim_end: UnixNanos,
    finding_at: Option<UnixNanos>,
}

/// Replays the recorded stream: batch 0 is the victim's first turn (conversation `c1`),
/// batches 1-9 the noisy tenant's 1000-token prompts (5-9 evict), then the victim's second
/// turn, which stores again, from the recorded hashes, what it lost (vLLM recomputes from the
/// first missing block on), then batches 10-11: conversation `c2`, whose second turn chains
/// onto its first (a hit).
fn replay(batches: Vec<KvEventBatch>, twist: Twist) -> Replay {
    let config = KvEvictionConfig {
        min_prefix_tokens: 64,
        ..KvEvictionConfig::default()
    };
    let delay = config.attribution_delay_ms * MS;
    let mut t = KvTracker::new(config);
    let mut stats = KvEvictionStats::default();
    let mut out = Vec::new();
    let b = &batches;
    let chain0 = stored(&b[0]);
    let lost_from_noisy: HashSet<u64> = b[1..10].iter().flat_map(removed).collect();
    let first_lost = chain0.iter().position(|h| lost_from_noisy.contains(h));
    let victim_lost = first_lost.map_or(0, |i| chain0.len() - i);
    let evictor_traces: Vec<u8> = (1..10u8)
        .filter(|i| removed(&b[*i as usize]).iter().any(|h| chain0.contains(h)))
        .collect();
    let mut finding_at = None;
    let mut tick = |t: &mut KvTracker, now, stats: &mut KvEvictionStats, out: &mut Vec<_>| {
        let before = out.len();
        t.on_tick(now, stats, out);
        if out.len() > before && finding_at.is_none() {
            finding_at = Some(now);
        }
    };
    // Turn 1 of c1: its prefill ends with batch 0.
    let t0 = b[0].ts;
    if twist == Twist::ConcurrentFirstTurn {
        t.on_request(
            &request(
                200,
                "noisy",
                None,
                (t0 - 250 * MS, t0 + 5 * MS),
                t0 + 30 * MS,
                900,
            ),
            None,
            &mut stats,
        );
    }
    t.on_kv_events(&b[0], &mut stats);
    t.on_request(
        &request(
            100,
            "victim",
            Some("c1"),
            (t0 - 300 * MS, t0 + 5 * MS),
            t0 + 200 * MS,
            704,
        ),
        None,
        &mut stats,
    );
    for (i, batch) in b.iter().enumerate().take(10).skip(1) {
        if twist == Twist::Gap && i == 7 {
            continue;
        }
        let ts = batch.ts;
        t.on_kv_events(batch, &mut stats);
        t.on_request(
            &request(
                i as u8,
                "noisy",
                None,
                (ts - 300 * MS, ts + 5 * MS),
                ts + 40 * MS,
                1000,
            ),
            None,
            &mut stats,
        );
        tick(&mut t, ts + 40 * MS, &mut stats, &mut out);
    }
    let a = b[9].ts + 1_000 * MS;
    if twist == Twist::Cleared {
        let mut clear = b[9].clone();
        clear.ts = a - 100 * MS;
        clear.seq = None;
        clear.events = vec![KvEvent::AllBlocksCleared];
        t.on_kv_events(&clear, &mut stats);
    }
    // Turn 2 of c1: stores again what it lost, then its new blocks.
    let mut again = b[0].clone();
    again.ts = a + 250 * MS;
    again.seq = Some(10);
    let keep = chain0.len() - victim_lost;
    again.events = vec![KvEvent::BlockStored {
        block_hashes: chain0[keep..].iter().copied().chain([7, 8, 9]).collect(),
        parent_block_hash: keep.checked_sub(1).map(|i| chain0[i]),
        num_tokens: (victim_lost as u32 + 3) * 32,
        block_size: 32,
        lora_id: None,
        medium: Some("GPU".into()),
    }];
    t.on_kv_events(&again, &mut stats);
    let victim_end = a + 400 * MS;
    t.on_request(
        &request(
            101,
            "victim",
            Some("c1"),
            (a, a + 260 * MS),
            victim_end,
            1100,
        ),
        None,
        &mut stats,
    );
    let mut now = victim_end;
    while now + 100 * MS < b[10].ts - 100 * MS {
        now += 100 * MS;
        tick(&mut t, now, &mut stats, &mut out);
    }
    // c2: two turns, the second a hit (chained onto the first's last block).
    let shift = |mut x: KvEventBatch, seq| {
        x.seq = Some(seq);
        x
    };
    for (k, i) in [(0u8, 10usize), (1, 11)] {
        let ts = b[i].ts;
        t.on_kv_events(&shift(b[i].clone(), 11 + u64::from(k)), &mut stats);
        t.on_request(
            &request(
                150 + k,
                "victim",
                Some("c2"),
                (ts - 50 * MS, ts + 2 * MS),
                ts + 20 * MS,
                96 * (u64::from(k) + 1),
            ),
            None,
            &mut stats,
        );
        tick(&mut t, ts + 20 * MS, &mut stats, &mut out);
    }
    while now < b[11].ts + 2 * delay {
        now += 100 * MS;
        tick(&mut t, now, &mut stats, &mut out);
    }
    Replay {
        findings: out,
        stats,
        victim_lost,
        evictor_traces,
        victim_end,
        finding_at,
    }
}

#[test]
fn the_victims_restored_blocks_make_one_finding_naming_the_evictor() {
    let r = replay(recorded("pid:4242"), Twist::None);
    assert!(
        r.victim_lost >= 16,
        "the noisy prompts evicted {}",
        r.victim_lost
    );
    assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
    let f = &r.findings[0];
    assert_eq!(f.evidence, MissEvidence::KvEvents);
    assert_eq!(f.method, KvEvidence::KvEvents);
    assert_eq!(f.victim_conversation, "c1");
    assert_eq!(f.trace_id, [101; 16]);
    // Block size 32 from the events: E = 704 (22 blocks), C = the blocks kept.
    assert_eq!(f.expected_cached_tokens, 704);
    assert_eq!(f.cached_tokens, (22 - r.victim_lost as u64) * 32);
    assert_eq!(f.victim_blocks_removed, Some(r.victim_lost as u64));
    assert_eq!(f.neighbour_tenant.as_deref(), Some("noisy"));
    assert_eq!(f.neighbour_share, 1.0);
    assert_eq!(f.top_tenants.len(), 1);
    // Links: exactly the noisy requests whose batches removed the victim's blocks.
    let mut linked: Vec<u8> = f.neighbour_links.iter().map(|l| l.trace_id[0]).collect();
    linked.sort_unstable();
    assert_eq!(linked, r.evictor_traces);
    assert!(f.ttft_penalty_ns.is_some_and(|p| p > 0));
    assert_eq!(r.stats.findings_evidence_kv_events, 1);
    assert_eq!(r.stats.kv_ambiguous_stores, 0);
    assert_eq!(r.stats.kv_turns_undecided, 0);
    // The finding comes the attribution delay after the victim's turn settled.
    let delay = r.finding_at.map(|at| at - r.victim_end);
    assert!(
        delay.is_some_and(|d| (5_000 * MS..=5_100 * MS).contains(&d)),
        "{delay:?}"
    );
}

/// The older array encoding of the same events replays to the same finding.
#[test]
fn the_array_encoding_replays_the_same() {
    use rmpv::Value;
    let maps = recorded("pid:4242");
    let arrays: Vec<KvEventBatch> = maps
        .iter()
        .map(|b| {
            let events = b
                .events
                .iter()
                .map(|e| match e {
                    KvEvent::BlockStored {
                        block_hashes,
                        parent_block_hash,
                        num_tokens,
                        block_size,
                        ..
                    } => Value::Array(vec![
                        "BlockStored".into(),
                        Value::Array(block_hashes.iter().map(|h| Value::from(*h)).collect()),
                        parent_block_hash.map_or(Value::Nil, Value::from),
                        Value::Array((0..*num_tokens).map(Value::from).collect()),
                        Value::from(*block_size),
                        Value::Nil,
                        "GPU".into(),
                    ]),
                    KvEvent::BlockRemoved { block_hashes, .. } => Value::Array(vec![
                        "BlockRemoved".into(),
                        Value::Array(block_hashes.iter().map(|h| Value::from(*h)).collect()),
                        "GPU".into(),
                    ]),
                    KvEvent::AllBlocksCleared => Value::Array(vec!["AllBlocksCleared".into()]),
                })
                .collect();
            let payload = Value::Array(vec![
                Value::F64(b.ts as f64 / 1e9),
                Value::Array(events),
                Value::from(0),
            ]);
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &payload).expect("encode");
            let seq = b.seq.unwrap_or(0).to_be_bytes();
            let mut back =
                decode_message(&[b"", &seq, &bytes], "pid:4242").expect("array form decodes");
            // Float seconds round the timestamp to about a microsecond.
            assert!(back.ts.abs_diff(b.ts) < 1_000, "{} {}", back.ts, b.ts);
            back.ts = b.ts;
            back
        })
        .collect();
    for (a, m) in arrays.iter().zip(&maps) {
        assert_eq!(a.events.len(), m.events.len());
        assert_eq!(stored(a), stored(m));
        assert_eq!(removed(a), removed(m));
    }
    let (x, y) = (replay(maps, Twist::None), replay(arrays, Twist::None));
    assert_eq!(x.findings, y.findings);
    assert_eq!(x.findings.len(), 1);
}

#[test]
fn a_cleared_cache_or_a_sequence_gap_makes_no_finding_and_is_counted() {
    for twist in [Twist::Cleared, Twist::Gap] {
        let r = replay(recorded("pid:4242"), twist);
        assert!(r.findings.is_empty(), "{twist:?}: {:?}", r.findings);
        assert_eq!(r.stats.kv_turns_undecided, 1, "{twist:?}");
    }
}

#[test]
fn a_first_turn_stored_while_another_prefilled_is_ambiguous() {
    let r = replay(recorded("pid:4242"), Twist::ConcurrentFirstTurn);
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.stats.kv_ambiguous_stores, 1);
    assert_eq!(r.stats.kv_turns_undecided, 1);
}

#[test]
fn a_chained_second_turn_is_a_hit() {
    // c2's turn 2 (batch 11) stores only blocks chained onto turn 1's last: no finding for
    // c2 in any replay above; here without c1's eviction in the way.
    let r = replay(recorded("pid:4242"), Twist::None);
    assert!(r.findings.iter().all(|f| f.victim_conversation != "c2"));
}

/// Turns without cached tokens or KV events, decided by their prefill time: first turns of
/// 1000 tokens (six, 100 ms each unless `first_ms` says) set the rate; then turn 2 of the
/// first conversations, 1100 tokens each, prefills in `turn2_ms`.
#[derive(Default)]
struct PrefillPlan {
    first_ms: Vec<u64>,
    turn2_ms: Vec<u64>,
    /// A noisy request prefilling alongside each turn 2.
    overlap: bool,
    /// More between turn 2's prefill and the first token its span reports (the API server's
    /// side under load), per turn.
    frontend_ms: Vec<u64>,
    /// The runtime's own prefill time on every span (`gen_ai.latency.time_in_model_prefill`).
    runtime_prefill: bool,
    /// Turn 2's decode, first token to end (16 tokens; 50 ms unless this says), per turn.
    decode_ms: Vec<u64>,
}

impl PrefillPlan {
    fn turns(turn2_ms: &[u64]) -> Self {
        Self {
            turn2_ms: turn2_ms.to_vec(),
            ..Self::default()
        }
    }

    fn run(&self) -> (Vec<KvEvictionFinding>, KvEvictionStats) {
        let mut t = KvTracker::new(KvEvictionConfig::default());
        let mut stats = KvEvictionStats::default();
        let mut out = Vec::new();
        let mut now = 1_800_000_000_000 * MS;
        let first_ms: Vec<u64> = if self.first_ms.is_empty() {
            vec![100; self.turn2_ms.len().max(6)]
        } else {
            self.first_ms.clone()
        };
        // One request: prefill from `now` for `prefill_ms`, its span's first token
        // `frontend_ms` later, its end `decode_ms` after that.
        let span = |trace: u8,
                    tenant: &str,
                    conversation: Option<&str>,
                    now: u64,
                    (prefill_ms, frontend_ms, decode_ms): (u64, u64, u64),
                    prompt: u64| {
            let first = now + (prefill_ms + frontend_ms) * MS;
            let mut r = request(
                trace,
                tenant,
                conversation,
                (now, first),
                first + decode_ms * MS,
                prompt,
            );
            if self.runtime_prefill {
                r.prefill_ns = Some(prefill_ms * MS);
            }
            r
        };
        for (i, ms) in first_ms.iter().enumerate() {
            let c = format!("c{i}");
            t.on_request(
                &span(i as u8, "victim", Some(&c), now, (*ms, 0, 50), 1000),
                None,
                &mut stats,
            );
            now += 300 * MS;
        }
        for (i, ms) in self.turn2_ms.iter().enumerate() {
            if self.overlap {
                t.on_request(
                    &span(200, "noisy", None, now, (100, 0, 50), 1000),
                    None,
                    &mut stats,
                );
            }
            let c = format!("c{i}");
            let frontend = self.frontend_ms.get(i).copied().unwrap_or(0);
            let decode = self.decode_ms.get(i).copied().unwrap_or(50);
            t.on_request(
                &span(
                    100 + i as u8,
                    "victim",
                    Some(&c),
                    now,
                    (*ms, frontend, decode),
                    1100,
                ),
                None,
                &mut stats,
            );
            now += 300 * MS;
        }
        t.on_tick(now + 10_000 * MS, &mut stats, &mut out);
        (out, stats)
    }
}

fn missed(findings: &[KvEvictionFinding]) -> Vec<u8> {
    findings.iter().map(|f| f.trace_id[0]).collect()
}

#[test]
fn a_prefill_as_long_as_the_whole_prompt_is_a_miss_and_a_short_one_is_not() {
    // E = min(1000 + 16, 1100) rounded to 16 = 1008; a hit prefills 92 tokens (~9 ms),
    // a miss 1100 (~110 ms).
    let (out, stats) = PrefillPlan::turns(&[110, 12, 9, 60, 105]).run();
    assert_eq!(missed(&out), vec![100, 104], "{out:?}");
    assert!(out.iter().all(|f| f.evidence == MissEvidence::PrefillTime));
    assert_eq!(out[0].expected_cached_tokens, 1008);
    assert!(out[0].cached_tokens < 504, "{}", out[0].cached_tokens);
    assert_eq!(stats.findings_evidence_prefill_time, 2);
    // 60 ms: between a hit and a miss.
    assert_eq!(stats.prefill_time_undecided, 1);
}

#[test]
fn one_slow_clean_prefill_does_not_hide_a_miss() {
    // Five first turns prefilled in 100 ms, one in 170 ms (contention); turn 2 of c0 took
    // 115 ms, a miss at the instance's usual rate (at the slow turn's, undecided); c1 hit.
    let plan = PrefillPlan {
        first_ms: vec![170, 100, 100, 100, 100, 100],
        ..PrefillPlan::turns(&[115, 9])
    };
    let (out, stats) = plan.run();
    assert_eq!(missed(&out), vec![100], "{out:?}");
    assert_eq!(stats.prefill_time_undecided, 0);
}

#[test]
fn fast_clean_prefills_do_not_make_a_slow_hit_a_miss() {
    // Three of six first turns hit a shared system prompt (30 ms); turn 2 of c3 hit its
    // prefix but prefilled its 92 new tokens slowly (30 ms, not 9). At the fast turns' rate
    // that is a miss; at the third quartile it is not even undecided.
    let plan = PrefillPlan {
        first_ms: vec![30, 30, 30, 100, 100, 100],
        ..PrefillPlan::turns(&[110, 110, 110, 30])
    };
    let (out, _) = plan.run();
    assert!(!missed(&out).contains(&103), "{out:?}");
}

#[test]
fn the_runtimes_own_prefill_time_leaves_out_a_slow_frontend() {
    // Turn 2 of c0 missed (110 ms of prefill), c1 and c2 hit (9 ms); the API server then took
    // 30, 100 and 40 ms more to see their first tokens (a loaded CPU). From the span's TTFT
    // alone, c1's hit looks like a miss; from the runtime's prefill time, only c0 is one.
    let plan = PrefillPlan {
        frontend_ms: vec![30, 100, 40],
        runtime_prefill: true,
        ..PrefillPlan::turns(&[110, 9, 9])
    };
    let (out, _) = plan.run();
    assert_eq!(missed(&out), vec![100], "{out:?}");
    let without = PrefillPlan {
        runtime_prefill: false,
        ..plan
    };
    let (out, _) = without.run();
    assert_eq!(
        missed(&out),
        vec![100, 101],
        "without it, the frontend decides: {out:?}"
    );
}

#[test]
fn a_prefill_far_slower_than_the_whole_prompt_is_undecided() {
    // Turn 2 of c0 missed (110 ms: its 1100 tokens at the first turns' rate). c1 and c2 hit,
    // but a CPU burst slowed their prefills to 250 and 400 ms: more than 1.5 times the whole
    // prompt at the instance's rate, which a miss alone does not explain (on the real vLLM
    // under a CPU burner: hits of 88 new tokens took 0.30 s where a whole 568-token prompt
    // takes 0.13 s, and were reported as misses). Undecided, counted.
    let (out, stats) = PrefillPlan::turns(&[110, 250, 400]).run();
    assert_eq!(missed(&out), vec![100], "{out:?}");
    assert_eq!(stats.prefill_time_undecided, 2);
}

#[test]
fn a_turn_whose_decode_was_slowed_is_undecided() {
    // Turn 2 of c0 and c1 both took as long as their whole prompt, but c1's decode (first
    // token to end) took 500 ms where the instance's requests take 50: the instance was slowed
    // around c1's turn, and a hit slowed as much would look the same. Undecided, counted.
    let plan = PrefillPlan {
        decode_ms: vec![50, 500],
        ..PrefillPlan::turns(&[110, 110])
    };
    let (out, stats) = plan.run();
    assert_eq!(missed(&out), vec![100], "{out:?}");
    assert_eq!(stats.prefill_time_undecided, 1);
}

#[test]
fn a_prefill_overlapping_another_or_before_the_rate_settles_is_undecided() {
    let plan = PrefillPlan {
        overlap: true,
        ..PrefillPlan::turns(&[110, 110])
    };
    let (out, stats) = plan.run();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(stats.prefill_time_undecided, 2);
}

/// What one tracked block costs in an instance's KV log: 8 bytes in its entry's hash list,
/// plus its entry's share. vLLM 0.32 stores a prompt's blocks in one event (31 blocks) and
/// removes them one event each, merged per batch (29-31 blocks).
#[test]
fn a_tracked_block_costs_about_ten_bytes() {
    let entry = size_of::<KvLogged>();
    assert!(entry <= 48, "{entry}");
    let mut t = KvTracker::new(KvEvictionConfig::default());
    let mut stats = KvEvictionStats::default();
    for b in recorded("pid:1") {
        t.on_kv_events(&b, &mut stats);
    }
    let log = &t.logs[0];
    let blocks = log.kv_blocks;
    let bytes = log.kv.len() * entry
        + log
            .kv
            .iter()
            .map(|e| match e {
                KvLogged::Stored { hashes, .. } | KvLogged::Removed { hashes, .. } => {
                    hashes.capacity() * 8
                }
                KvLogged::Broken { .. } => 0,
            })
            .sum::<usize>();
    // 12 batches: 12 stores and 7 merged removals.
    assert_eq!(log.kv.len(), 19);
    let per_block = bytes as f64 / blocks as f64;
    assert!(
        per_block < 12.0,
        "{per_block} bytes per block ({bytes} / {blocks})"
    );
}
