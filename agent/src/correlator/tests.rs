//! Unit tests of the correlator's decisions; the scripted streams live in `tests/replay/`.

use super::*;
use crate::model::{CloseHow, InstanceIdentity, RuntimeKind, TraceParent};
use crate::model::{ConnId, RequestHead};

const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000_000_000_000;

fn kernel(ts: u64, kind: KernelEventKind) -> Input {
    Input::Kernel(KernelEvent {
        ts,
        pid: Some(42),
        kind,
    })
}

fn accepted(ts: u64, conn: u64, peer_port: u16) -> Input {
    kernel(
        ts,
        KernelEventKind::Accepted {
            conn: ConnId(conn),
            local: "10.0.0.1:8000".parse().expect("addr"),
            peer: SocketAddr::from(([10, 0, 0, 2], peer_port)),
        },
    )
}

fn head(ts: u64, conn: u64, trace: Option<u8>, request_id: Option<&str>) -> Input {
    kernel(
        ts,
        KernelEventKind::RequestHead {
            conn: ConnId(conn),
            fd: 9,
            head: RequestHead {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                request_id: request_id.map(str::to_string),
                traceparent: trace.map(|t| TraceParent {
                    trace_id: [t; 16],
                    parent_id: [t; 8],
                    flags: 1,
                }),
                tenant: Some("acme".into()),
                conversation: None,
                model: None,
            },
            send_seq: None,
        },
    )
}

fn span(trace: u8, arrival: u64, first: u64, end: u64, tokens: u64) -> RuntimeRequest {
    RuntimeRequest {
        runtime: RuntimeKind::Vllm,
        trace_id: [trace; 16],
        span_id: [trace.wrapping_add(100); 8],
        parent_span_id: None,
        request_id: None,
        model: Some("m".into()),
        tenant: None,
        conversation: None,
        client: None,
        instance: InstanceIdentity::default(),
        arrival,
        queue_ns: None,
        prefill_ns: None,
        first_token: Some(first),
        end,
        prompt_tokens: Some(10),
        cached_tokens: None,
        output_tokens: Some(tokens),
        finish_reason: Some("abort".into()),
        token_times: Vec::new(),
    }
}

/// How the span of trace `trace` was joined, and to which connection, when it settled.
fn joined(out: &[Output], trace: u8) -> Option<(JoinRule, Option<ConnId>)> {
    out.iter().find_map(|o| match o {
        Output::Joined(j) if j.request.trace_id == [trace; 16] => {
            Some((j.join, j.connection.as_ref().map(|c| c.conn)))
        }
        _ => None,
    })
}

fn aborts(out: &[Output]) -> Vec<&AbortFinding> {
    out.iter()
        .filter_map(|o| match o {
            Output::Abort(a) => Some(a),
            _ => None,
        })
        .collect()
}

#[test]
fn traceparent_join_with_interpolated_abort() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(head(T0 + MS, 1, Some(7), None)));
    out.extend(c.on_event(kernel(
        T0 + 600 * MS,
        KernelEventKind::PeerClosed {
            conn: ConnId(1),
            how: CloseHow::Rst,
            send_seq: None,
        },
    )));
    // 100 tokens decoded from +100 ms to +1100 ms; the client left at +600 ms.
    out.extend(c.on_event(Input::Runtime(span(
        7,
        T0 + 2 * MS,
        T0 + 100 * MS,
        T0 + 1100 * MS,
        100,
    ))));
    assert!(out.is_empty(), "nothing settles before a tick: {out:?}");
    out.extend(c.on_tick(T0 + 1000 * MS));
    assert!(out.is_empty(), "span not due yet: {out:?}");
    out.extend(c.on_tick(T0 + 2000 * MS));
    let found = aborts(&out);
    assert_eq!(found.len(), 1, "one finding: {out:?}");
    assert_eq!(found[0].tokens_after, 50);
    assert_eq!(found[0].method, TokenCountMethod::Interpolated);
    assert_eq!(found[0].how, CloseHow::Rst);
    assert_eq!(found[0].lag_ns, 500 * MS);
    assert_eq!(found[0].tenant.as_deref(), Some("acme"));
    assert_eq!(c.stats().joins.traceparent, 1);
    assert_eq!(c.state_sizes().pending_heads, 0);
}

#[test]
fn span_table_at_cap_settles_early_and_stays_bounded() {
    let config = CorrelatorConfig {
        max_pending_spans: 4,
        ..CorrelatorConfig::default()
    };
    let mut c = Correlator::new(config);
    let mut joined = 0;
    for i in 0..20u8 {
        let out = c.on_event(Input::Runtime(span(i, T0, T0, T0 + 10 * MS, 1)));
        joined += out.len();
        assert!(c.state_sizes().pending_spans <= 4);
    }
    assert_eq!(joined, 16);
    assert_eq!(c.stats().evictions.spans, 16);
    let out = c.on_tick(T0 + 10_000 * MS);
    assert_eq!(out.len(), 4);
    assert_eq!(c.stats().joins.unjoined, 20);
}

#[test]
fn duplicate_span_is_dropped() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    c.on_event(Input::Runtime(span(1, T0, T0, T0 + MS, 1)));
    c.on_event(Input::Runtime(span(1, T0, T0, T0 + MS, 1)));
    assert_eq!(c.stats().duplicate_spans, 1);
    assert_eq!(c.on_tick(T0 + 10_000 * MS).len(), 1);
}

#[test]
fn replayed_head_replaces_the_first_and_leaves_no_stale_index() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    c.on_event(accepted(T0, 1, 5000));
    c.on_event(head(T0 + MS, 1, None, Some("first")));
    c.on_event(head(T0 + MS, 1, None, Some("second")));
    assert_eq!(c.state_sizes().pending_heads, 1);
    assert!(!c.tables.by_request_id.contains_key("first"));
    c.on_event(kernel(
        T0 + 2 * MS,
        KernelEventKind::Closed { conn: ConnId(1) },
    ));
    c.on_tick(T0 + 60_000 * MS);
    assert_eq!(c.stats().unjoined_heads, 1);
    assert!(
        c.tables.by_request_id.is_empty() && c.tables.heads.is_empty() && c.tables.conns.is_empty()
    );
}

/// A span that is not due yet still keeps the head its traceparent names from an earlier span's
/// guess: the later spans' exact claims are computed (lazily) before any temporal join.
#[test]
fn exact_claim_of_a_later_span_beats_an_earlier_guess() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(accepted(T0, 2, 5001)));
    // H1 carries trace 7 and was read exactly at A's arrival; H2 carries nothing, 100 ms later.
    out.extend(c.on_event(head(T0 + 1000 * MS, 1, Some(7), None)));
    out.extend(c.on_event(head(T0 + 1100 * MS, 2, None, None)));
    // A (trace 1, no ids a head carries) is due at 1 750 ms; B (trace 7) only at 3 250 ms.
    out.extend(c.on_event(Input::Runtime(span(
        1,
        T0 + 1000 * MS,
        T0 + 1050 * MS,
        T0 + 1200 * MS,
        4,
    ))));
    out.extend(c.on_event(Input::Runtime(span(
        7,
        T0 + 1000 * MS,
        T0 + 1050 * MS,
        T0 + 3000 * MS,
        4,
    ))));
    out.extend(c.on_tick(T0 + 1800 * MS));
    assert_eq!(
        joined(&out, 1),
        Some((JoinRule::Temporal, Some(ConnId(2)))),
        "A guesses the unclaimed head, not the closer one B names: {out:?}"
    );
    assert_eq!(joined(&out, 7), None, "B is not due yet");
    out.extend(c.on_tick(T0 + 3400 * MS));
    assert_eq!(
        joined(&out, 7),
        Some((JoinRule::Traceparent, Some(ConnId(1))))
    );
}

/// A head whose request ended waits for the not-yet-due span that names it, instead of settling
/// as unjoined.
#[test]
fn head_named_by_a_waiting_span_does_not_settle_alone() {
    let mut c = Correlator::new(CorrelatorConfig {
        span_wait_ms: 100,
        ..CorrelatorConfig::default()
    });
    let mut out = Vec::new();
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(head(T0 + 1000 * MS, 1, Some(7), None)));
    out.extend(c.on_event(kernel(
        T0 + 1100 * MS,
        KernelEventKind::Closed { conn: ConnId(1) },
    )));
    out.extend(c.on_event(Input::Runtime(span(
        7,
        T0 + 1000 * MS,
        T0 + 1050 * MS,
        T0 + 3000 * MS,
        4,
    ))));
    // The head's request ended at 1 100 ms: it would settle at 1 200 ms without a span.
    out.extend(c.on_tick(T0 + 1300 * MS));
    assert_eq!(c.stats().unjoined_heads, 0, "{out:?}");
    out.extend(c.on_tick(T0 + 3400 * MS));
    assert_eq!(c.stats().joins.traceparent, 1, "{out:?}");
    assert_eq!(c.stats().unjoined_heads, 0);
}

/// A short request an exact rule joins settles `settle_delay` after its end; one only a guess
/// can join waits out the temporal window after its arrival, since heads read up to then may
/// still be the closest.
#[test]
fn an_exact_join_settles_at_the_end_and_a_guess_waits_for_its_window() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(accepted(T0, 2, 5001)));
    out.extend(c.on_event(head(T0 + 1000 * MS, 1, Some(7), None)));
    out.extend(c.on_event(head(T0 + 1001 * MS, 2, None, None)));
    // Both end at 1 010 ms: joinable from 1 260 ms; a guess only from 1 750 ms.
    for trace in [7, 9] {
        out.extend(c.on_event(Input::Runtime(span(
            trace,
            T0 + 1000 * MS,
            T0 + 1005 * MS,
            T0 + 1010 * MS,
            4,
        ))));
    }
    out.extend(c.on_tick(T0 + 1200 * MS));
    assert!(
        out.is_empty(),
        "nothing is due before end + settle delay: {out:?}"
    );
    out.extend(c.on_tick(T0 + 1300 * MS));
    assert_eq!(
        joined(&out, 7),
        Some((JoinRule::Traceparent, Some(ConnId(1))))
    );
    assert_eq!(joined(&out, 9), None, "the guess waits: {out:?}");
    assert_eq!(c.state_sizes().pending_spans, 1);
    out.extend(c.on_tick(T0 + 1700 * MS));
    assert_eq!(joined(&out, 9), None, "still inside the window: {out:?}");
    out.extend(c.on_tick(T0 + 1800 * MS));
    assert_eq!(joined(&out, 9), Some((JoinRule::Temporal, Some(ConnId(2)))));
    assert_eq!(c.state_sizes().pending_spans, 0);
}

/// Turn n waits for a guess while turn n+1, joined exactly, settles first: the KV tracker keeps
/// the later turn, so turn n+2 is checked against turn n+1's history, not turn n's.
#[test]
fn a_turn_that_waits_for_a_guess_does_not_replace_the_later_turn() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let turn = |trace: u8, at: u64, prompt: u64, cached: u64| {
        let mut s = span(
            trace,
            T0 + at * MS,
            T0 + (at + 5) * MS,
            T0 + (at + 10) * MS,
            100,
        );
        s.conversation = Some("c1".into());
        s.prompt_tokens = Some(prompt);
        s.cached_tokens = Some(cached);
        s.finish_reason = Some("stop".into());
        s
    };
    let mut out = Vec::new();
    for conn in 1..=3 {
        out.extend(c.on_event(accepted(T0, conn, 5000 + conn as u16)));
    }
    // Turn 1: no id its head carries, so only a guess joins it (not before 1 750 ms).
    out.extend(c.on_event(head(T0 + 1000 * MS, 1, None, None)));
    out.extend(c.on_event(Input::Runtime(turn(1, 1000, 900, 0))));
    // Turn 2, traceparent-joined, due at 1 280 ms: its prompt holds turn 1's 1 000 tokens.
    out.extend(c.on_event(head(T0 + 1020 * MS, 2, Some(2), None)));
    out.extend(c.on_event(Input::Runtime(turn(2, 1020, 2900, 1000))));
    out.extend(c.on_tick(T0 + 1300 * MS));
    out.extend(c.on_tick(T0 + 1800 * MS));
    // Turn 3 finds only turn 1's prefix cached, not turn 2's 3 000 tokens.
    out.extend(c.on_event(head(T0 + 2000 * MS, 3, Some(3), None)));
    out.extend(c.on_event(Input::Runtime(turn(3, 2000, 3100, 1000))));
    out.extend(c.on_tick(T0 + 2300 * MS));
    out.extend(c.on_tick(T0 + 8000 * MS));
    let joins: Vec<(u8, JoinRule)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Joined(j) => Some((j.request.trace_id[0], j.join)),
            _ => None,
        })
        .collect();
    assert_eq!(
        joins,
        [
            (2, JoinRule::Traceparent),
            (1, JoinRule::Temporal),
            (3, JoinRule::Traceparent)
        ]
    );
    let evictions: Vec<&KvEvictionFinding> = out
        .iter()
        .filter_map(|o| match o {
            Output::KvEviction(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(evictions.len(), 1, "{out:?}");
    assert_eq!(evictions[0].trace_id, [3; 16]);
    assert_eq!(
        evictions[0].expected_cached_tokens, 2992,
        "3 000 in 16-token blocks"
    );
    assert_eq!(evictions[0].window_start, T0 + 1030 * MS, "turn 2's end");
}

/// While the cold start of an instance that started under the agent is undecided (GPU facts
/// on), its joined spans wait for the temporal window as well, so that the first requests
/// settle in the order they came, not of their ends; once decided, joined spans settle at their
/// end again.
#[test]
fn joined_spans_wait_while_their_instance_cold_start_is_undecided() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    out.extend(c.on_event(Input::Process(crate::model::ProcessIdentity {
        pid: 42,
        executable: Some("vllm".into()),
        container_id: None,
        pod_uid: None,
        // Started with the first request the agent saw: a cold start.
        start_time: Some(T0 + 1000 * MS),
        parent_pid: Some(1),
    })));
    let on_instance = |trace: u8, at: u64| {
        let mut s = span(
            trace,
            T0 + at * MS,
            T0 + (at + 5) * MS,
            T0 + (at + 10) * MS,
            4,
        );
        s.instance.pid = Some(42);
        Input::Runtime(s)
    };
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(accepted(T0, 2, 5001)));
    out.extend(c.on_event(head(T0 + 1000 * MS, 1, Some(7), None)));
    out.extend(c.on_event(on_instance(7, 1000)));
    out.extend(c.on_tick(T0 + 1300 * MS));
    assert_eq!(joined(&out, 7), None, "undecided: waits for 1 750 ms");
    out.extend(c.on_tick(T0 + 1800 * MS));
    assert_eq!(
        joined(&out, 7),
        Some((JoinRule::Traceparent, Some(ConnId(1))))
    );
    out.extend(c.on_event(head(T0 + 2000 * MS, 2, Some(8), None)));
    out.extend(c.on_event(on_instance(8, 2000)));
    out.extend(c.on_tick(T0 + 2300 * MS));
    assert_eq!(
        joined(&out, 8),
        Some((JoinRule::Traceparent, Some(ConnId(2)))),
        "decided: settles at its end + settle delay"
    );
}

/// The kernel's send sequences say whether the response had started when the client left:
/// unchanged since the head, the writes after the close are one non-streaming body, not tokens.
#[test]
fn send_sequences_tell_token_writes_from_a_whole_body() {
    for (close_seq, method, tokens_after) in [
        (4_096 + 700, TokenCountMethod::KernelWrites, 5),
        (4_096, TokenCountMethod::Interpolated, 50),
    ] {
        let mut c = Correlator::new(CorrelatorConfig::default());
        c.on_event(accepted(T0, 1, 5000));
        c.on_event(kernel(
            T0 + MS,
            KernelEventKind::RequestHead {
                conn: ConnId(1),
                fd: 9,
                head: RequestHead {
                    method: "POST".into(),
                    path: "/v1/completions".into(),
                    traceparent: Some(TraceParent {
                        trace_id: [7; 16],
                        parent_id: [7; 8],
                        flags: 1,
                    }),
                    ..RequestHead::default()
                },
                send_seq: Some(4_096),
            },
        ));
        c.on_event(kernel(
            T0 + 600 * MS,
            KernelEventKind::PeerClosed {
                conn: ConnId(1),
                how: CloseHow::Fin,
                send_seq: Some(close_seq),
            },
        ));
        for i in 0..5 {
            c.on_event(kernel(
                T0 + (610 + 10 * i) * MS,
                KernelEventKind::WriteAfterPeerClose {
                    conn: ConnId(1),
                    bytes: 40,
                    errno: 0,
                },
            ));
        }
        c.on_event(Input::Runtime(span(
            7,
            T0 + 2 * MS,
            T0 + 100 * MS,
            T0 + 1100 * MS,
            100,
        )));
        let out = c.on_tick(T0 + 2000 * MS);
        let found = aborts(&out);
        assert_eq!(found.len(), 1, "{out:?}");
        assert_eq!(found[0].method, method, "close at send_seq {close_seq}");
        assert_eq!(
            found[0].tokens_after, tokens_after,
            "close at send_seq {close_seq}"
        );
    }
}

/// A closed connection is forgotten `settle_delay` after its close once nothing on it is
/// pending, a connection that stays open `connection_idle` after its last event, and a head
/// no span claims settles `span_wait` after its connection's close.
#[test]
fn connections_are_forgotten_after_their_close_or_when_idle() {
    let config = CorrelatorConfig {
        span_wait_ms: 1_000,
        connection_idle_ms: 10_000,
        ..CorrelatorConfig::default()
    };
    let mut c = Correlator::new(config);
    let closed = |ts: u64, conn: u64| kernel(ts, KernelEventKind::Closed { conn: ConnId(conn) });
    // 1: closed at 1 s. 2: never closed. 3: a head, closed at 0.5 s.
    c.on_event(accepted(T0 + MS, 1, 5001));
    c.on_event(accepted(T0 + MS, 2, 5002));
    c.on_event(accepted(T0 + MS, 3, 5003));
    c.on_event(head(T0 + 2 * MS, 3, None, None));
    c.on_event(closed(T0 + 500 * MS, 3));
    c.on_event(closed(T0 + 1_000 * MS, 1));
    let connections = |c: &Correlator| c.state_sizes().connections;

    c.on_tick(T0 + 1_249 * MS);
    assert_eq!(
        connections(&c),
        3,
        "the settle delay after 1's close has not passed"
    );
    c.on_tick(T0 + 1_250 * MS);
    assert_eq!(connections(&c), 2, "1 is forgotten; 3 waits for its head");
    assert_eq!(c.state_sizes().pending_heads, 1);
    c.on_tick(T0 + 1_499 * MS);
    assert_eq!(c.state_sizes().pending_heads, 1);
    c.on_tick(T0 + 1_500 * MS);
    assert_eq!(
        c.state_sizes().pending_heads,
        0,
        "span_wait after the close"
    );
    assert_eq!(c.stats().unjoined_heads, 1);
    assert_eq!(connections(&c), 1, "3 goes with its head");
    c.on_tick(T0 + 10_000 * MS);
    assert_eq!(connections(&c), 1, "2 saw its last event at 1 ms");
    c.on_tick(T0 + 10_001 * MS);
    assert_eq!(connections(&c), 0);
}

/// SGLang starts its own traces with 64-bit ids (the upper 8 bytes zero). The traceparent rule
/// compares all 16 bytes: a 64-bit id joins only a `traceparent` that carries exactly it (a
/// client propagating a 64-bit id), never a 128-bit id that merely shares its low half, as
/// backends that accept both widths would.
#[test]
fn sglang_64_bit_trace_ids_join_only_on_all_sixteen_bytes() {
    let low = 0x1a2b_3c4d_5e6f_7081_u64.to_be_bytes();
    let wide = |upper: u8| {
        let mut id = [upper; 16];
        id[8..].copy_from_slice(&low);
        id
    };
    let head_with = |ts: u64, conn: u64, trace_id: [u8; 16]| {
        kernel(
            ts,
            KernelEventKind::RequestHead {
                conn: ConnId(conn),
                fd: 9,
                head: RequestHead {
                    method: "POST".into(),
                    path: "/generate".into(),
                    request_id: None,
                    traceparent: Some(TraceParent {
                        trace_id,
                        parent_id: [5; 8],
                        flags: 1,
                    }),
                    tenant: None,
                    conversation: None,
                    model: None,
                },
                send_seq: None,
            },
        )
    };
    let sglang_span = |trace_id: [u8; 16], arrival: u64| RuntimeRequest {
        runtime: RuntimeKind::Sglang,
        trace_id,
        span_id: [9; 8],
        ..span(0, arrival, arrival + 50 * MS, arrival + 200 * MS, 4)
    };
    let mut c = Correlator::new(CorrelatorConfig::default());
    let mut out = Vec::new();
    out.extend(c.on_event(accepted(T0, 1, 5000)));
    out.extend(c.on_event(accepted(T0, 2, 5001)));
    // A 128-bit trace that shares the low half of SGLang's 64-bit id.
    out.extend(c.on_event(head_with(T0 + 1000 * MS, 1, wide(0xab))));
    // A client that propagated a 64-bit id (upper half zero).
    out.extend(c.on_event(head_with(T0 + 9000 * MS, 2, wide(0))));
    // SGLang's own trace, started 2 s after head 1 (outside the temporal window): no rule fits.
    out.extend(c.on_event(Input::Runtime(sglang_span(wide(0), T0 + 3000 * MS))));
    out.extend(c.on_tick(T0 + 6000 * MS));
    let rule_of = |out: &[Output], arrival: u64| {
        out.iter().find_map(|o| match o {
            Output::Joined(j) if j.request.arrival == arrival => {
                Some((j.join, j.connection.as_ref().map(|c| c.conn)))
            }
            _ => None,
        })
    };
    assert_eq!(
        rule_of(&out, T0 + 3000 * MS),
        Some((JoinRule::Unjoined, None)),
        "the low half alone never joins: {out:?}"
    );
    // The same 64-bit id, sent as the traceparent of head 2, joins on all 16 bytes.
    out.extend(c.on_event(Input::Runtime(sglang_span(wide(0), T0 + 9001 * MS))));
    out.extend(c.on_tick(T0 + 12_000 * MS));
    assert_eq!(
        rule_of(&out, T0 + 9001 * MS),
        Some((JoinRule::Traceparent, Some(ConnId(2))))
    );
}

/// The kernel reuses a socket's address. Two old sockets there still wait for their requests
/// to settle (no span came) while a newer one, joined and settled, is forgotten: the next
/// socket at the address is a new connection, not one of the old ones, and its client's
/// abort is counted.
#[test]
fn a_reused_socket_address_is_a_new_connection_while_older_ones_wait() {
    let config = CorrelatorConfig {
        span_wait_ms: 3_000,
        ..CorrelatorConfig::default()
    };
    let mut c = Correlator::new(config);
    let mut out = Vec::new();
    let peer_left = |ts: u64| {
        kernel(
            ts,
            KernelEventKind::PeerClosed {
                conn: ConnId(1),
                how: CloseHow::Fin,
                send_seq: None,
            },
        )
    };
    let write = |ts: u64| {
        kernel(
            ts,
            KernelEventKind::WriteAfterPeerClose {
                conn: ConnId(1),
                bytes: 40,
                errno: 0,
            },
        )
    };
    let closed = |ts: u64| kernel(ts, KernelEventKind::Closed { conn: ConnId(1) });
    // Two requests whose clients left mid-stream; the runtime made no span for them.
    for (i, id) in ["a", "b"].into_iter().enumerate() {
        let at = T0 + i as u64 * 200 * MS;
        out.extend(c.on_event(accepted(at, 1, 5000 + i as u16)));
        out.extend(c.on_event(head(at + MS, 1, None, Some(id))));
        out.extend(c.on_event(peer_left(at + 100 * MS)));
        out.extend(c.on_event(write(at + 101 * MS)));
        out.extend(c.on_event(closed(at + 102 * MS)));
    }
    // A complete request with a span: it settles and its connection is forgotten.
    out.extend(c.on_event(accepted(T0 + 400 * MS, 1, 5002)));
    out.extend(c.on_event(head(T0 + 401 * MS, 1, Some(5), None)));
    out.extend(c.on_event(closed(T0 + 700 * MS)));
    out.extend(c.on_event(Input::Runtime(RuntimeRequest {
        finish_reason: Some("length".into()),
        ..span(5, T0 + 402 * MS, T0 + 450 * MS, T0 + 690 * MS, 10)
    })));
    out.extend(c.on_tick(T0 + 1_500 * MS));
    assert!(joined(&out, 5).is_some(), "{out:?}");
    // The next socket at the address: its client leaves too.
    out.extend(c.on_event(accepted(T0 + 1_600 * MS, 1, 5003)));
    out.extend(c.on_event(head(T0 + 1_601 * MS, 1, None, Some("c"))));
    out.extend(c.on_event(peer_left(T0 + 1_700 * MS)));
    out.extend(c.on_event(write(T0 + 1_701 * MS)));
    out.extend(c.on_event(closed(T0 + 1_702 * MS)));
    out.extend(c.on_tick(T0 + 10_000 * MS));
    let mut left: Vec<_> = aborts(&out)
        .iter()
        .filter_map(|a| a.request_id.clone())
        .collect();
    left.sort();
    assert_eq!(left, ["a", "b", "c"], "{out:?}");
    let counted = out
        .iter()
        .filter(|o| matches!(o, Output::ClientAbort(_)))
        .count();
    assert_eq!(counted, 3);
    assert_eq!(c.state_sizes().connections, 0);
}
