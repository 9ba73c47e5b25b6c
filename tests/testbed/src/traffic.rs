//! The traffic generator: a seeded plan of tenants' conversations (Poisson or bursty
//! arrivals, multi-turn, streaming, mid-stream aborts by FIN or RST) and trace replays, run
//! by a raw HTTP/1.1 client over tokio's `TcpStream` so closes happen exactly as planned.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Arrival, ReplayConfig, Scenario, TenantConfig};
use crate::tokens;
use crate::truth::{ClientTruth, JsonlWriter, now_ns};

/// How a planned abort closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortHow {
    /// `shutdown(SHUT_WR)`: FIN.
    Fin,
    /// `SO_LINGER 0` then close: RST.
    Rst,
}

/// One planned request.
#[derive(Debug, Clone)]
pub struct PlannedTurn {
    /// `X-Request-Id`.
    pub request_id: String,
    /// User message (chat) or whole prompt (completions).
    pub user_text: String,
    /// `max_tokens`.
    pub max_tokens: u32,
    /// Stream (SSE).
    pub stream: bool,
    /// Abort after this many tokens, and how.
    pub abort: Option<(u64, AbortHow)>,
    /// Non-streaming: give up (FIN) when no response arrived within this many ms (scaled),
    /// as a client with a request timeout does.
    pub timeout_ms: Option<u64>,
    /// Think time before this turn (ms, scaled at run time).
    pub think_ms: u64,
    /// Trace id of the `traceparent`.
    pub trace_id: u128,
    /// Parent span id of the `traceparent`.
    pub span_id: u64,
}

/// One planned conversation.
#[derive(Debug, Clone)]
pub struct PlannedConversation {
    /// Tenant.
    pub tenant: String,
    /// Conversation id.
    pub id: String,
    /// Start, seconds from the traffic's start (scaled at run time).
    pub start_s: f64,
    /// System prompt (chat) or empty.
    pub system: String,
    /// Use `/v1/completions`.
    pub completions: bool,
    /// Turns in order.
    pub turns: Vec<PlannedTurn>,
    /// Send a `traceparent` header.
    pub traceparent: bool,
}

fn range(rng: &mut StdRng, [a, b]: [u32; 2]) -> u32 {
    if a >= b { a } else { rng.random_range(a..=b) }
}

fn ids(rng: &mut StdRng) -> (u128, u64) {
    (rng.random::<u128>() | 1, rng.random::<u64>() | 1)
}

fn tenant_starts(rng: &mut StdRng, t: &TenantConfig, duration: f64) -> Vec<f64> {
    let end = t.end_s.unwrap_or(duration);
    let mut out = Vec::new();
    match t.arrival {
        Arrival::Poisson => {
            let mut at = t.start_s;
            loop {
                let u: f64 = rng.random();
                at += -(1.0 - u).ln() / t.rate_per_s;
                if at >= end || out.len() >= t.max_conversations as usize {
                    break;
                }
                out.push(at);
            }
        }
        Arrival::Bursty => {
            let mut at = t.start_s;
            while at < end && out.len() < t.max_conversations as usize {
                for _ in 0..t.burst_size {
                    if out.len() >= t.max_conversations as usize {
                        break;
                    }
                    // Spread a burst over a few ms so requests are distinct on the wire.
                    out.push(at + rng.random_range(0.0..0.005));
                }
                at += t.burst_interval_s;
            }
        }
    }
    out
}

/// Build the plan of a scenario (deterministic for a seed).
pub fn plan(s: &Scenario) -> anyhow::Result<Vec<PlannedConversation>> {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut out = Vec::new();
    for t in &s.tenants {
        let starts = tenant_starts(&mut rng, t, s.duration_s);
        for (ci, start_s) in starts.into_iter().enumerate() {
            let id = format!("{}-c{ci:04}", t.name);
            let n_turns = range(&mut rng, t.turns).max(1);
            let first = range(&mut rng, t.prompt_tokens) as usize;
            // System prompt shared by the tenant's conversations (a real prefix-cache pattern),
            // then a per-conversation first user message.
            let sys_len = ((first as f64) * t.system_share.clamp(0.0, 1.0)) as usize;
            let system = tokens::filler_words(tokens::fnv1a(s.seed, t.name.as_bytes()), sys_len);
            let mut turns = Vec::new();
            for ti in 0..n_turns {
                let n_user = if ti == 0 {
                    first - sys_len
                } else {
                    range(&mut rng, t.turn_tokens) as usize
                };
                let user_text = tokens::filler_words(rng.random(), n_user.max(1));
                let stream = rng.random::<f64>() < t.stream_share;
                let abort = if stream && rng.random::<f64>() < t.abort_share {
                    let after = u64::from(range(&mut rng, t.abort_after_tokens).max(1));
                    let how = if rng.random::<f64>() < t.rst_share {
                        AbortHow::Rst
                    } else {
                        AbortHow::Fin
                    };
                    Some((after, how))
                } else {
                    None
                };
                // Drawn only when configured, so that other scenarios' plans stay as they were.
                let timeout_ms =
                    if !stream && t.timeout_share > 0.0 && rng.random::<f64>() < t.timeout_share {
                        Some(u64::from(range(&mut rng, t.timeout_ms).max(1)))
                    } else {
                        None
                    };
                let (trace_id, span_id) = ids(&mut rng);
                turns.push(PlannedTurn {
                    timeout_ms,
                    request_id: format!("{id}-t{}", ti + 1),
                    user_text,
                    max_tokens: range(&mut rng, t.max_tokens).max(1),
                    stream,
                    abort,
                    think_ms: if ti == 0 {
                        0
                    } else {
                        u64::from(range(&mut rng, t.think_ms))
                    },
                    trace_id,
                    span_id,
                });
            }
            out.push(PlannedConversation {
                tenant: t.name.clone(),
                id,
                start_s,
                system: if t.completions { String::new() } else { system },
                completions: t.completions,
                traceparent: !t.no_traceparent,
                turns,
            });
        }
    }
    for r in &s.replay {
        out.extend(replay_plan(&s.base_dir, r, &mut rng)?);
    }
    out.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    Ok(out)
}

/// Seconds since midnight plus the day of month, from `YYYY-MM-DD HH:MM:SS[.frac]`, or a
/// plain number of seconds.
fn parse_azure_ts(s: &str) -> Option<f64> {
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(day * 86_400.0 + h * 3600.0 + m * 60.0 + sec)
}

fn replay_plan(
    base: &Path,
    r: &ReplayConfig,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<PlannedConversation>> {
    let path = base.join(&r.path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    // (offset s, prompt text, output tokens)
    let mut rows: Vec<(f64, String, u32)> = Vec::new();
    let scale_tok = |n: f64| ((n * r.token_scale).round() as usize).max(1);
    match r.format.as_str() {
        "azure" => {
            for (i, line) in text.lines().enumerate() {
                let cols: Vec<&str> = line.split(',').map(str::trim).collect();
                if i == 0
                    && cols
                        .first()
                        .is_some_and(|c| c.eq_ignore_ascii_case("TIMESTAMP"))
                {
                    continue;
                }
                if cols.len() < 3 {
                    continue;
                }
                let (Some(ts), Ok(ctx), Ok(gen_)) = (
                    parse_azure_ts(cols[0]),
                    cols[1].parse::<f64>(),
                    cols[2].parse::<f64>(),
                ) else {
                    anyhow::bail!("{}:{}: bad row", path.display(), i + 1);
                };
                let prompt = tokens::filler_words(rng.random(), scale_tok(ctx));
                rows.push((ts, prompt, scale_tok(gen_) as u32));
            }
        }
        "mooncake" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
                let ts = v.get("timestamp").and_then(Value::as_f64).unwrap_or(0.0) / 1e3;
                let input = v.get("input_length").and_then(Value::as_f64).unwrap_or(1.0);
                let output = v
                    .get("output_length")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0);
                // Each hash id stands for a block of `hash_block_tokens` identical tokens
                // across requests: equal ids give equal text, so prefixes are shared.
                let block = scale_tok(f64::from(r.hash_block_tokens));
                let mut words = Vec::new();
                let want = scale_tok(input);
                if let Some(h) = v.get("hash_ids").and_then(Value::as_array) {
                    for id in h.iter().filter_map(Value::as_u64) {
                        if words.len() >= want {
                            break;
                        }
                        words.push(tokens::filler_words(tokens::mix(id), block));
                    }
                }
                let mut prompt = words.join(" ");
                let have = prompt.split_whitespace().count();
                if have < want {
                    if !prompt.is_empty() {
                        prompt.push(' ');
                    }
                    prompt.push_str(&tokens::filler_words(rng.random(), want - have));
                }
                rows.push((ts, prompt, scale_tok(output) as u32));
            }
        }
        f => anyhow::bail!("unknown replay format {f:?} (azure | mooncake)"),
    }
    let t0 = rows.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, (ts, prompt, out))| {
            let (trace_id, span_id) = ids(rng);
            let id = format!("{}-r{i:05}", r.tenant);
            PlannedConversation {
                tenant: r.tenant.clone(),
                id: id.clone(),
                start_s: r.start_s + (ts - t0) * r.time_scale,
                system: String::new(),
                completions: true,
                traceparent: true,
                turns: vec![PlannedTurn {
                    timeout_ms: None,
                    request_id: format!("{id}-t1"),
                    user_text: prompt,
                    max_tokens: out.min(r.max_output_tokens).max(1),
                    stream: true,
                    abort: None,
                    think_ms: 0,
                    trace_id,
                    span_id,
                }],
            }
        })
        .collect())
}

/// Options for running the traffic.
#[derive(Debug, Clone)]
pub struct TrafficOptions {
    /// `host:port` of the runtime.
    pub target: String,
    /// Model name to send.
    pub model: String,
    /// Multiplies arrival offsets and think times.
    pub duration_scale: f64,
    /// Give up connecting after this long (covers a cold start).
    pub connect_timeout: Duration,
}

/// Summary of a run.
#[derive(Debug, Clone, Default)]
pub struct TrafficSummary {
    /// Requests sent.
    pub requests: u64,
    /// Completed normally.
    pub completed: u64,
    /// Aborted by plan.
    pub aborted: u64,
    /// Failed.
    pub errors: u64,
}

/// Run the plan; one task per conversation.
pub async fn run(
    plan: Vec<PlannedConversation>,
    opts: TrafficOptions,
    truth: Arc<JsonlWriter>,
) -> TrafficSummary {
    let start = Instant::now();
    let opts = Arc::new(opts);
    let mut tasks = Vec::new();
    for conv in plan {
        let opts = opts.clone();
        let truth = truth.clone();
        tasks.push(tokio::spawn(async move {
            let at = start + Duration::from_secs_f64(conv.start_s * opts.duration_scale);
            tokio::time::sleep_until(at.into()).await;
            run_conversation(conv, &opts, &truth).await
        }));
    }
    let mut sum = TrafficSummary::default();
    for t in tasks {
        if let Ok(records) = t.await {
            for r in records {
                sum.requests += 1;
                match r.close.as_str() {
                    "complete" => sum.completed += 1,
                    "fin" | "rst" => sum.aborted += 1,
                    _ => sum.errors += 1,
                }
            }
        }
    }
    sum
}

async fn run_conversation(
    conv: PlannedConversation,
    opts: &TrafficOptions,
    truth: &JsonlWriter,
) -> Vec<ClientTruth> {
    let mut messages: Vec<Value> = Vec::new();
    if !conv.system.is_empty() {
        messages.push(json!({"role": "system", "content": conv.system}));
    }
    let mut out = Vec::new();
    for (i, turn) in conv.turns.iter().enumerate() {
        if turn.think_ms > 0 {
            tokio::time::sleep(Duration::from_secs_f64(
                turn.think_ms as f64 * opts.duration_scale / 1e3,
            ))
            .await;
        }
        let body = if conv.completions {
            json!({"model": opts.model, "prompt": turn.user_text, "max_tokens": turn.max_tokens,
                "stream": turn.stream, "temperature": 0.7, "top_p": 0.95})
        } else {
            messages.push(json!({"role": "user", "content": turn.user_text}));
            let mut b = json!({"model": opts.model, "messages": messages, "max_tokens": turn.max_tokens,
                "stream": turn.stream, "temperature": 0.7, "top_p": 0.95});
            if turn.stream {
                b["stream_options"] = json!({"include_usage": true});
            }
            b
        };
        let (rec, text) = one_request(&conv, i as u32 + 1, turn, body, opts).await;
        truth.write(&rec);
        let failed = rec.close == "error";
        out.push(rec);
        if failed {
            break;
        }
        if !conv.completions {
            messages.push(json!({"role": "assistant", "content": text.trim()}));
        }
    }
    out
}

/// Connects, retrying refused attempts until `timeout`; counts every refused one in `refused`.
async fn connect(target: &str, timeout: Duration, refused: &mut u32) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                *refused += 1;
                if Instant::now() >= deadline {
                    return Err(e);
                }
                // The runtime may still be loading weights (cold start): retry like a gateway.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Incremental HTTP/1.1 chunked-body decoder.
#[derive(Default)]
struct Chunked {
    buf: Vec<u8>,
    done: bool,
}

impl Chunked {
    /// Feed bytes, return decoded payload bytes.
    fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, &'static str> {
        if self.done {
            // Trailer / final CRLF after the last chunk: nothing more to decode.
            return Ok(Vec::new());
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                return Ok(out);
            };
            let size_str = std::str::from_utf8(&self.buf[..pos]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            if size == 0 {
                self.done = true;
                self.buf.clear();
                return Ok(out);
            }
            if self.buf.len() < pos + 2 + size + 2 {
                return Ok(out);
            }
            out.extend_from_slice(&self.buf[pos + 2..pos + 2 + size]);
            self.buf.drain(..pos + 2 + size + 2);
        }
    }
}

/// One request of `turn` over a fresh connection, as the client of `conv`; the client-side
/// record and the text received.
pub async fn one_request(
    conv: &PlannedConversation,
    turn_no: u32,
    turn: &PlannedTurn,
    body: Value,
    opts: &TrafficOptions,
) -> (ClientTruth, String) {
    let mut rec = ClientTruth {
        request_id: turn.request_id.clone(),
        trace_id: format!("{:032x}", turn.trace_id),
        parent_span_id: format!("{:016x}", turn.span_id),
        tenant: conv.tenant.clone(),
        conversation: conv.id.clone(),
        turn: turn_no,
        stream: turn.stream,
        local_port: 0,
        start_ns: now_ns(),
        refused_attempts: 0,
        sent_ns: 0,
        first_token_ns: None,
        close_ns: 0,
        close: "error".into(),
        tokens_received: 0,
        abort_after_tokens: turn.abort.map(|a| a.0),
        status: 0,
        prompt_tokens: None,
        completion_tokens: None,
        cached_tokens: None,
        error: None,
    };
    let mut text = String::new();
    if let Err(e) = drive(conv, turn, body, opts, &mut rec, &mut text).await {
        rec.error = Some(e);
        rec.close = "error".into();
        if rec.close_ns == 0 {
            rec.close_ns = now_ns();
        }
    }
    (rec, text)
}

fn take_usage(rec: &mut ClientTruth, v: &Value) {
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        rec.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64);
        rec.completion_tokens = u.get("completion_tokens").and_then(Value::as_u64);
        rec.cached_tokens = u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64);
    }
}

async fn drive(
    conv: &PlannedConversation,
    turn: &PlannedTurn,
    body: Value,
    opts: &TrafficOptions,
    rec: &mut ClientTruth,
    text: &mut String,
) -> Result<(), String> {
    let mut sock = connect(
        &opts.target,
        opts.connect_timeout,
        &mut rec.refused_attempts,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    rec.local_port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let path = if conv.completions {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    };
    let body = body.to_string();
    let traceparent = if conv.traceparent {
        format!(
            "traceparent: 00-{:032x}-{:016x}-01\r\n",
            turn.trace_id, turn.span_id
        )
    } else {
        String::new()
    };
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: {}\r\nx-request-id: {}\r\n{traceparent}x-tenant-id: {}\r\nx-conversation-id: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        opts.target,
        if turn.stream {
            "text/event-stream"
        } else {
            "application/json"
        },
        turn.request_id,
        conv.tenant,
        conv.id,
        body.len()
    );
    sock.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    rec.sent_ns = now_ns();

    if let Some(ms) = turn.timeout_ms.filter(|_| !turn.stream) {
        let limit = Duration::from_secs_f64(ms as f64 / 1000.0 * opts.duration_scale.max(0.0));
        if tokio::time::timeout(limit, sock.readable()).await.is_err() {
            // Stamped just before the close syscall, so the server can only see it later.
            rec.close_ns = now_ns();
            close_abruptly(sock, AbortHow::Fin).await;
            rec.close = "fin".into();
            return Ok(());
        }
    }

    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16384];
    // Response head.
    let (status, chunked, body_start, content_len) = loop {
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut hdrs = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut hdrs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(h)) => {
                let get = |k: &str| {
                    resp.headers
                        .iter()
                        .find(|x| x.name.eq_ignore_ascii_case(k))
                        .map(|x| String::from_utf8_lossy(x.value).to_ascii_lowercase())
                };
                let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                let len = get("content-length").and_then(|v| v.trim().parse::<usize>().ok());
                break (resp.code.unwrap_or(0), chunked, h, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < 65536 => continue,
            _ => return Err("bad response head".into()),
        }
    };
    rec.status = status;
    let rest = buf.split_off(body_start);
    if !(200..300).contains(&status) || !chunked {
        let mut body = rest;
        let want = content_len.unwrap_or(usize::MAX);
        while body.len() < want {
            let n = sock
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        rec.close_ns = now_ns();
        if !(200..300).contains(&status) {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("json: {e}"))?;
        let content = v
            .pointer("/choices/0/message/content")
            .or_else(|| v.pointer("/choices/0/text"))
            .and_then(Value::as_str)
            .unwrap_or("");
        rec.tokens_received = content.split_whitespace().count() as u64;
        rec.first_token_ns = Some(rec.close_ns);
        text.push_str(content);
        take_usage(rec, &v);
        rec.close = "complete".into();
        return Ok(());
    }
    // SSE over chunked encoding.
    let mut dec = Chunked::default();
    let mut events = Vec::new();
    let mut pending = rest;
    loop {
        let data = dec.feed(&pending).map_err(str::to_string)?;
        pending.clear();
        events.extend_from_slice(&data);
        while let Some(p) = events.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = events.drain(..p + 2).collect();
            let line = String::from_utf8_lossy(&ev);
            let Some(payload) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let payload = payload.trim();
            if payload == "[DONE]" {
                rec.close_ns = now_ns();
                rec.close = "complete".into();
                return Ok(());
            }
            let Ok(v) = serde_json::from_str::<Value>(payload) else {
                continue;
            };
            take_usage(rec, &v);
            let piece = v
                .pointer("/choices/0/delta/content")
                .or_else(|| v.pointer("/choices/0/text"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !piece.is_empty() {
                rec.tokens_received += 1;
                if rec.first_token_ns.is_none() {
                    rec.first_token_ns = Some(now_ns());
                }
                text.push_str(piece);
                if let Some((after, how)) = turn.abort
                    && rec.tokens_received >= after
                {
                    // Stamped just before the close syscall, so the server can only see it later.
                    rec.close_ns = now_ns();
                    close_abruptly(sock, how).await;
                    rec.close = match how {
                        AbortHow::Fin => "fin".into(),
                        AbortHow::Rst => "rst".into(),
                    };
                    return Ok(());
                }
            }
        }
        if dec.done {
            rec.close_ns = now_ns();
            rec.close = "complete".into();
            return Ok(());
        }
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed mid-stream".into());
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

/// Close the way a real client that gave up would.
async fn close_abruptly(mut sock: TcpStream, how: AbortHow) {
    match how {
        AbortHow::Rst => {
            // SO_LINGER 0: close() discards the send queue and sends RST.
            if let Err(e) = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO)) {
                tracing::warn!(error = %e, "SO_LINGER");
            }
            drop(sock);
        }
        AbortHow::Fin => {
            // FIN first (shutdown), then close. Draining what already arrived keeps close()
            // from turning into a RST because of unread data.
            let _ = sock.shutdown().await;
            let mut b = [0u8; 16384];
            while let Ok(n) = sock.try_read(&mut b) {
                if n == 0 {
                    break;
                }
            }
            drop(sock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoder_handles_split_input() {
        let mut d = Chunked::default();
        let wire = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut out = Vec::new();
        for b in wire.chunks(3) {
            out.extend(d.feed(b).unwrap());
        }
        assert_eq!(out, b"hello world");
        assert!(d.done);
    }

    #[test]
    fn azure_timestamps() {
        let a = parse_azure_ts("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_azure_ts("2023-11-16 18:15:47.1805900").unwrap();
        assert!((b - a - 0.5).abs() < 1e-6);
    }
}
