//! The OpenAI-compatible HTTP/1.1 front end of the simulated runtime.
//!
//! Hand-written over tokio's `TcpStream` rather than hyper: the disconnect policies need
//! control that a framework hides: keep writing SSE chunks into a socket whose peer left
//! (`never`, `delayed`), one `write` per token, and telling FIN (EOF) from RST on read.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::engine::{Engine, SeqEvent, SeqRequest, SubmitError};
use crate::flavor::Flavor;
use crate::otel::{SpanFacts, SpanSink};
use crate::tokens;
use crate::truth::{CloseHow, JsonlWriter, RequestTruth, TruthRecord, now_ns};

/// Max request head + body.
const MAX_REQUEST: usize = 8 << 20;
/// Max `max_tokens` accepted.
const MAX_OUTPUT: u32 = 16_384;

/// Shared server state.
#[derive(Debug)]
pub struct Server {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Span sink.
    pub spans: Arc<SpanSink>,
    /// Truth writer.
    pub truth: Arc<JsonlWriter>,
    /// Model name.
    pub model: String,
    /// Add per-token span events.
    pub token_events: bool,
    /// Export a span for a request aborted because its client left (vLLM 0.32 does not; the
    /// vLLM flavor only).
    pub abort_spans: bool,
    /// Never export the root of a disconnected request (SGLang shape only).
    pub omit_disconnected_root: bool,
}

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
    body: Vec<u8>,
    arrival_ns: u64,
    /// The client's address (set by the connection).
    peer: Option<std::net::SocketAddr>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum ReadOutcome {
    Request(Head),
    Closed,
    Bad(&'static str),
}

/// Accept connections until the task is dropped.
pub async fn serve(server: Arc<Server>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let s = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = s.connection(sock).await {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn read_request(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> std::io::Result<ReadOutcome> {
    let mut arrival_ns = if buf.is_empty() { 0 } else { now_ns() };
    loop {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).trim().to_string(),
                        )
                    })
                    .collect();
                let get = |k: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.to_ascii_lowercase())
                };
                if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                    return Ok(ReadOutcome::Bad("chunked request bodies are not supported"));
                }
                let len: usize = match get("content-length").map(|v| v.parse()) {
                    None => 0,
                    Some(Ok(l)) => l,
                    Some(Err(_)) => return Ok(ReadOutcome::Bad("bad content-length")),
                };
                if n + len > MAX_REQUEST {
                    return Ok(ReadOutcome::Bad("request too large"));
                }
                let keep_alive = req.version == Some(1)
                    && !get("connection").is_some_and(|v| v.contains("close"));
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("/").to_string();
                while buf.len() < n + len {
                    let mut chunk = [0u8; 16384];
                    let r = rd.read(&mut chunk).await?;
                    if r == 0 {
                        return Ok(ReadOutcome::Closed);
                    }
                    buf.extend_from_slice(&chunk[..r]);
                }
                let body = buf[n..n + len].to_vec();
                buf.drain(..n + len);
                return Ok(ReadOutcome::Request(Head {
                    method,
                    path,
                    headers,
                    keep_alive,
                    body,
                    arrival_ns,
                    peer: None,
                }));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > 64 * 1024 {
                    return Ok(ReadOutcome::Bad("request head too large"));
                }
            }
            Err(_) => return Ok(ReadOutcome::Bad("malformed request")),
        }
        let mut chunk = [0u8; 16384];
        let r = rd.read(&mut chunk).await?;
        if r == 0 {
            return Ok(ReadOutcome::Closed);
        }
        if arrival_ns == 0 {
            arrival_ns = now_ns();
        }
        buf.extend_from_slice(&chunk[..r]);
    }
}

fn response(status: &str, ctype: &str, extra: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{extra}connection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn error_body(msg: &str, code: u16) -> Vec<u8> {
    json!({"object": "error", "message": msg, "type": "BadRequestError", "param": null, "code": code})
        .to_string()
        .into_bytes()
}

/// One SSE event as one HTTP chunk, so it leaves in one `write`.
fn sse_chunk(data: &str) -> Vec<u8> {
    let payload = format!("data: {data}\n\n");
    format!("{:x}\r\n{payload}\r\n", payload.len()).into_bytes()
}

/// Tracks the client's departure as the server sees it.
#[derive(Default)]
struct Departure {
    at: Option<(u64, CloseHow)>,
}

impl Server {
    async fn connection(self: Arc<Self>, sock: TcpStream) -> std::io::Result<()> {
        let _ = sock.set_nodelay(true);
        let peer = sock.peer_addr().ok();
        let (mut rd, mut wr) = sock.into_split();
        let mut buf = Vec::new();
        loop {
            let head = match read_request(&mut rd, &mut buf).await? {
                ReadOutcome::Request(mut h) => {
                    h.peer = peer;
                    h
                }
                ReadOutcome::Closed => return Ok(()),
                ReadOutcome::Bad(msg) => {
                    wr.write_all(&response(
                        "400 Bad Request",
                        "application/json",
                        "",
                        &error_body(msg, 400),
                        false,
                    ))
                    .await?;
                    return Ok(());
                }
            };
            let keep = head.keep_alive;
            let keep = match (
                head.method.as_str(),
                head.path.split('?').next().unwrap_or(""),
            ) {
                ("GET", "/health") => {
                    wr.write_all(&response("200 OK", "application/json", "", b"", keep))
                        .await?;
                    keep
                }
                ("GET", "/v1/models") => {
                    let body = json!({"object": "list", "data": [{
                        "id": self.model, "object": "model", "created": 0,
                        "owned_by": "vllm", "root": self.model, "max_model_len": 131072}]});
                    wr.write_all(&response(
                        "200 OK",
                        "application/json",
                        "",
                        body.to_string().as_bytes(),
                        keep,
                    ))
                    .await?;
                    keep
                }
                ("POST", p @ ("/v1/chat/completions" | "/v1/completions")) => {
                    let chat = p == "/v1/chat/completions";
                    self.completion(head, chat, &mut rd, &mut wr).await? && keep
                }
                _ => {
                    wr.write_all(&response(
                        "404 Not Found",
                        "application/json",
                        "",
                        &error_body("not found", 404),
                        keep,
                    ))
                    .await?;
                    keep
                }
            };
            if !keep {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Serve one completion; returns whether the connection can be reused.
    async fn completion(
        &self,
        head: Head,
        chat: bool,
        rd: &mut OwnedReadHalf,
        wr: &mut OwnedWriteHalf,
    ) -> std::io::Result<bool> {
        let bad = |msg: String| {
            response(
                "400 Bad Request",
                "application/json",
                "",
                &error_body(&msg, 400),
                head.keep_alive,
            )
        };
        let body: Value = match serde_json::from_slice(&head.body) {
            Ok(v) => v,
            Err(e) => {
                wr.write_all(&bad(format!("invalid JSON: {e}"))).await?;
                return Ok(head.keep_alive);
            }
        };
        let (prompt, turn) = if chat {
            let Some(msgs) = body.get("messages").and_then(Value::as_array) else {
                wr.write_all(&bad("messages is required".into())).await?;
                return Ok(head.keep_alive);
            };
            tokens::chat_prompt(msgs.iter().map(|m| {
                (
                    m.get("role").and_then(Value::as_str).unwrap_or("user"),
                    m.get("content").and_then(Value::as_str).unwrap_or(""),
                )
            }))
        } else {
            match body.get("prompt") {
                Some(Value::String(s)) => (tokens::tokenize(s).collect(), 0),
                Some(Value::Array(a)) if a.iter().all(Value::is_u64) => (
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|t| t as u32)
                        .collect(),
                    0,
                ),
                _ => {
                    wr.write_all(&bad("prompt must be a string or token ids".into()))
                        .await?;
                    return Ok(head.keep_alive);
                }
            }
        };
        let max_tokens = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(16);
        if max_tokens == 0 || max_tokens > u64::from(MAX_OUTPUT) || prompt.is_empty() {
            wr.write_all(&bad(format!(
                "max_tokens must be in 1..={MAX_OUTPUT} and the prompt non-empty"
            )))
            .await?;
            return Ok(head.keep_alive);
        }
        let max_tokens = max_tokens as u32;
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let temperature = body
            .get("temperature")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let top_p = body.get("top_p").and_then(Value::as_f64).unwrap_or(1.0);
        let n = body.get("n").and_then(Value::as_i64).unwrap_or(1);
        let xrid = head
            .header("x-request-id")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{:032x}", u128::from(tokens::mix(head.arrival_ns))));
        let flavor = self.spans.flavor();
        let runtime_id = match flavor {
            // vLLM prefixes the external id: `chatcmpl-<X-Request-Id>` / `cmpl-<..>`.
            Flavor::Vllm => format!("{}-{xrid}", if chat { "chatcmpl" } else { "cmpl" }),
            // SGLang ignores `X-Request-Id`: its rid is a fresh uuid4 hex, the `id` of every
            // chunk and of the body.
            Flavor::Sglang => crate::shapes::sglang::rid(
                head.arrival_ns,
                head.peer.map_or(0, |p| u64::from(p.port())),
            ),
            // TGI's chat and completion ids are empty strings.
            Flavor::Tgi => String::new(),
        };
        let tenant = head.header("x-tenant-id").unwrap_or("").to_string();
        let conversation = head.header("x-conversation-id").unwrap_or("").to_string();
        let traceparent = head.header("traceparent").map(str::to_string);

        let sub = match self.engine.submit(SeqRequest {
            request_id: xrid.clone(),
            tenant: tenant.clone(),
            conversation: conversation.clone(),
            prompt,
            max_tokens,
            arrival_ns: head.arrival_ns,
        }) {
            Ok(s) => s,
            Err(e @ SubmitError::QueueFull) => {
                wr.write_all(&response(
                    "503 Service Unavailable",
                    "application/json",
                    "",
                    &error_body(&e.to_string(), 503),
                    false,
                ))
                .await?;
                return Ok(false);
            }
            Err(e) => {
                wr.write_all(&bad(e.to_string())).await?;
                return Ok(head.keep_alive);
            }
        };
        let mut rx = sub.rx;
        let created = head.arrival_ns / 1_000_000_000;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        // vLLM echoes the request id; SGLang and TGI do not.
        let extra = if flavor == Flavor::Vllm {
            format!("x-request-id: {xrid}\r\n")
        } else {
            String::new()
        };
        let mut gone = Departure::default();
        let mut watch_read = true;
        let mut written = 0u64;
        let mut token_times = Vec::new();
        let mut body_writes = Vec::new();
        let mut text = String::new();
        let mut write_failed = false;

        if stream {
            let head_bytes = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n{extra}transfer-encoding: chunked\r\n\r\n"
            );
            if let Err(e) = wr.write_all(head_bytes.as_bytes()).await {
                self.note_gone(&mut gone, sub.id, CloseHow::from_io(&e));
                write_failed = true;
            }
        }
        let summary = loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                r = read_probe(rd), if watch_read => {
                    watch_read = false;
                    if let Some(how) = r {
                        self.note_gone(&mut gone, sub.id, how);
                    }
                    continue;
                }
            };
            match ev {
                Some(SeqEvent::Token {
                    index,
                    text: word,
                    time_ns,
                }) => {
                    token_times.push(time_ns);
                    let piece = format!(" {word}");
                    if stream {
                        if chat && index == 0 && !write_failed {
                            // vLLM's first chat chunk, in its own write before the first
                            // token's: the role with empty content (no token).
                            let role = json!({"id": runtime_id, "object": object, "created": created, "model": self.model,
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
                            let began = now_ns();
                            let result = wr.write_all(&sse_chunk(&role.to_string())).await;
                            body_writes.push((began, now_ns()));
                            if let Err(e) = result {
                                write_failed = true;
                                self.note_gone(&mut gone, sub.id, CloseHow::from_io(&e));
                            }
                        }
                        let data = if chat {
                            json!({"id": runtime_id, "object": object, "created": created, "model": self.model,
                                "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]})
                        } else {
                            json!({"id": runtime_id, "object": object, "created": created, "model": self.model,
                                "choices": [{"index": 0, "text": piece, "logprobs": null, "finish_reason": null}]})
                        };
                        // After a failed write the socket is dead for good under `immediate`;
                        // under `never` / `delayed` keep writing, as those runtimes do, so the
                        // kernel sees every write after the peer left.
                        if !(write_failed
                            && matches!(self.engine.policy(), crate::engine::Policy::Immediate))
                        {
                            let chunk = sse_chunk(&data.to_string());
                            let began = now_ns();
                            let result = wr.write_all(&chunk).await;
                            body_writes.push((began, now_ns()));
                            match result {
                                Ok(()) => written += 1,
                                Err(e) => {
                                    write_failed = true;
                                    self.note_gone(&mut gone, sub.id, CloseHow::from_io(&e));
                                }
                            }
                        }
                    } else {
                        text.push_str(&piece);
                    }
                }
                Some(SeqEvent::Done(s)) => break s,
                None => {
                    return Ok(false);
                }
            }
        };
        let finish = if summary.finish_reason == "abort" {
            "abort"
        } else {
            "length"
        };
        let facts = SpanFacts {
            traceparent,
            model: self.model.clone(),
            request_id: runtime_id.clone(),
            temperature,
            top_p,
            max_tokens: i64::from(max_tokens),
            n,
            prompt_tokens: summary.prompt_tokens as i64,
            completion_tokens: summary.output_tokens as i64,
            cached_tokens: summary.cached_tokens as i64,
            finish_reason: finish.to_string(),
            arrival_ns: head.arrival_ns,
            scheduled_ns: summary.scheduled_ns.unwrap_or(0),
            first_token_ns: summary.first_token_ns.unwrap_or(0),
            last_token_ns: summary.last_token_ns.unwrap_or(0),
            stop_ns: summary.stop_ns,
            execute_ns: summary.execute_ns,
            conversation: conversation.clone(),
            tenant: tenant.clone(),
            token_times: if self.token_events {
                token_times.clone()
            } else {
                Vec::new()
            },
            path: head.path.clone(),
            host: head.header("host").unwrap_or("").to_string(),
            peer: head.peer,
            stream,
            omit_root: false,
        };
        let usage = json!({
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.output_tokens,
            "total_tokens": summary.prompt_tokens + summary.output_tokens,
            "prompt_tokens_details": {"cached_tokens": summary.cached_tokens},
        });
        if stream {
            let mut tail = Vec::new();
            let fin = if chat {
                json!({"id": runtime_id, "object": object, "created": created, "model": self.model,
                    "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}]})
            } else {
                json!({"id": runtime_id, "object": object, "created": created, "model": self.model,
                    "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": finish}]})
            };
            tail.extend(sse_chunk(&fin.to_string()));
            if include_usage {
                let u = json!({"id": runtime_id, "object": object, "created": created,
                    "model": self.model, "choices": [], "usage": usage});
                tail.extend(sse_chunk(&u.to_string()));
            }
            tail.extend(sse_chunk("[DONE]"));
            tail.extend_from_slice(b"0\r\n\r\n");
            if gone.at.is_none() {
                let began = now_ns();
                let result = wr.write_all(&tail).await;
                body_writes.push((began, now_ns()));
                if let Err(e) = result {
                    self.note_gone(&mut gone, sub.id, CloseHow::from_io(&e));
                }
            }
        } else if gone.at.is_none() {
            let body = if chat {
                json!({"id": runtime_id, "object": "chat.completion", "created": created, "model": self.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.trim_start()},
                        "logprobs": null, "finish_reason": finish}], "usage": usage})
            } else {
                json!({"id": runtime_id, "object": "text_completion", "created": created, "model": self.model,
                    "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                    "usage": usage})
            };
            let extra = if flavor == Flavor::Tgi {
                crate::shapes::tgi::response_headers(&facts, summary.prompt_tokens)
            } else {
                extra
            };
            match wr
                .write_all(&response(
                    "200 OK",
                    "application/json",
                    &extra,
                    body.to_string().as_bytes(),
                    head.keep_alive,
                ))
                .await
            {
                Ok(()) => written = summary.output_tokens,
                Err(e) => self.note_gone(&mut gone, sub.id, CloseHow::from_io(&e)),
            }
        }

        let abort_ns = gone.at.map(|(t, _)| t);
        let tokens_after_abort =
            abort_ns.map_or(0, |a| token_times.iter().filter(|&&t| t > a).count() as u64);
        let facts = SpanFacts {
            omit_root: self.omit_disconnected_root && gone.at.is_some(),
            ..facts
        };
        // vLLM makes its span when the engine finishes a request: one aborted because its
        // client left gets none (its trace id, when the client sent one, is still the truth's).
        let no_span = self.spans.flavor() == Flavor::Vllm && finish == "abort" && !self.abort_spans;
        let (trace_id, span_id) = if no_span {
            (
                facts
                    .traceparent
                    .as_deref()
                    .and_then(|tp| tp.split('-').nth(1))
                    .unwrap_or_default()
                    .to_owned(),
                String::new(),
            )
        } else {
            self.spans.emit(&facts)
        };
        self.truth.write(&TruthRecord::Request(RequestTruth {
            request_id: xrid,
            runtime_request_id: runtime_id,
            trace_id,
            span_id,
            tenant,
            conversation,
            turn,
            stream,
            policy: self.engine.policy().as_string(),
            prompt_tokens: summary.prompt_tokens,
            cached_tokens: summary.cached_tokens,
            output_tokens: summary.output_tokens,
            max_tokens: u64::from(max_tokens),
            tokens_after_abort,
            token_times_ns: if abort_ns.is_some() {
                token_times
            } else {
                Vec::new()
            },
            body_writes_ns: if abort_ns.is_some() {
                body_writes
            } else {
                Vec::new()
            },
            tokens_written: written,
            finish_reason: finish.to_string(),
            arrival_ns: head.arrival_ns,
            scheduled_ns: summary.scheduled_ns,
            first_token_ns: summary.first_token_ns,
            stop_ns: summary.stop_ns,
            client_abort_ns: abort_ns,
            client_abort_how: gone.at.map(|(_, h)| h),
            stored_blocks: summary.stored_blocks,
            hit_blocks: summary.hit_blocks,
            cold: summary.cold,
        }));
        Ok(gone.at.is_none() && !write_failed)
    }

    fn note_gone(&self, gone: &mut Departure, id: u64, how: CloseHow) {
        if gone.at.is_none() {
            let t = now_ns();
            gone.at = Some((t, how));
            self.engine.client_gone(id, t);
        }
    }
}

impl CloseHow {
    fn from_io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::ConnectionReset => CloseHow::Rst,
            _ => CloseHow::WriteError,
        }
    }
}

/// Wait until the peer closes (EOF: FIN; error: RST). Extra bytes (a pipelined request) are
/// ignored: no client here pipelines.
async fn read_probe(rd: &mut OwnedReadHalf) -> Option<CloseHow> {
    let mut b = [0u8; 1024];
    loop {
        match rd.read(&mut b).await {
            Ok(0) => return Some(CloseHow::Fin),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(CloseHow::Rst);
            }
            Err(_) => return Some(CloseHow::Rst),
        }
    }
}
