//! Billed-after-abort through a gateway (issue 24, SPEC 2.1), end to end: clients -> a real
//! nginx (`proxy_buffering off`, upstream keepalive) -> the testbed runtime, and clients -> a
//! gateway of the test's own that drops `traceparent` and `x-request-id` (as LiteLLM's proxy
//! does) and, when its client leaves, keeps reading the runtime's stream to the end (as a
//! metering layer does), and, when it is installed, clients -> LiteLLM's proxy (PyPI
//! `litellm[proxy]`) -> the runtime. Both the gateway's port and the runtime's are watched; the findings,
//! received by a real OTLP collector, are scored against what the clients did and the runtime's
//! ground truth.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use inferwatch_testbed::truth::{RequestTruth, TruthRecord, read_jsonl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{
    Agent, Collector, Received, attr, free_port, kernel_tests_enabled, metric_sum, now_ns, scratch,
    serial, testbed_bin,
};
use crate::peers::wait_listening;

/// Clients per run; every third leaves after its third chunk.
const CLIENTS: usize = 18;
const MAX_TOKENS: u64 = 60;

/// What one client did.
#[derive(Debug)]
struct ClientRun {
    trace_id: String,
    /// The response's own id, read from its first chunk.
    response_id: Option<String>,
    /// When it closed its connection after leaving early; `None` when it read the whole stream.
    left_at: Option<u64>,
}

fn trace_of(i: usize, salt: u8) -> String {
    format!("{:02x}{:030x}", salt, i + 1)
}

/// LiteLLM's proxy refuses to start without a master key and requires it as the bearer token.
const LITELLM_KEY: &str = "sk-inferwatch-e2e-0123456789";

/// Sends one streamed chat completion through `gateway`; leaves after three chunks when `leave`.
async fn client(gateway: SocketAddr, i: usize, salt: u8, leave: bool) -> ClientRun {
    let trace_id = trace_of(i, salt);
    let body = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello {i}\"}}],\"stream\":true,\"max_tokens\":{MAX_TOKENS}}}"
    );
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         content-length: {}\r\ntraceparent: 00-{trace_id}-{:016x}-01\r\nx-request-id: gw-{salt}-{i}\r\n\
         authorization: Bearer {LITELLM_KEY}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        i + 1
    );
    let mut stream = TcpStream::connect(gateway).await.expect("connect gateway");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut left_at = None;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        let chunks = got.windows(6).filter(|w| w == b"data: ").count();
        if leave && chunks >= 3 {
            left_at = Some(now_ns());
            break;
        }
        if got.windows(12).any(|w| w == b"data: [DONE]") {
            break;
        }
    }
    drop(stream);
    let text = String::from_utf8_lossy(&got);
    let response_id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned);
    ClientRun {
        trace_id,
        response_id,
        left_at,
    }
}

/// The test's own gateway: forwards each request without `traceparent` and `x-request-id`
/// (and with `connection: close` upstream), copies the response back, and when its client
/// leaves keeps reading the upstream to the end (draining it to bill it).
async fn draining_gateway(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut down, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 8192];
            // The whole request: the head, then content-length bytes of body.
            let (head_end, body_len) = loop {
                let Ok(n) = down.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (end + 4, len);
                }
            };
            while head.len() < head_end + body_len {
                match down.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head[..head_end]).to_string();
            let forwarded: String = text
                .split("\r\n")
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    !l.starts_with("traceparent:") && !l.starts_with("x-request-id:")
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            if up.write_all(forwarded.as_bytes()).await.is_err()
                || up.write_all(&head[head_end..]).await.is_err()
            {
                return;
            }
            let mut client_there = true;
            loop {
                let n = match up.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if client_there && down.write_all(&buf[..n]).await.is_err() {
                    // The client left: keep reading the stream to its end.
                    client_there = false;
                }
            }
        });
    }
}

/// nginx in one process (`master_process off`), so that killing it leaves no orphaned worker
/// behind, even when a test fails half-way.
fn nginx_conf(dir: &Path, listen: u16, upstream: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\nuser root;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream runtime {{ server 127.0.0.1:{upstream}; keepalive 8; }}\n\
           server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      proxy_pass http://runtime;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             }}\n  }}\n}}\n"
    )
}

/// Which gateway a run goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gateway {
    Nginx,
    Draining,
    LiteLlm(std::path::PathBuf),
}

async fn gateway_run(name: &str, gateway: Gateway, policy: &str, salt: u8) {
    let _one_at_a_time = serial().await;
    let dir = scratch(name);
    let collector = Collector::default();
    let backend = collector.start().await;
    let runtime_port = free_port();
    let gateway_port = free_port();
    // A request whose runtime made no span (vLLM makes none for a client abort) settles
    // `span_wait` after the kernel last saw it; a short wait keeps the run short.
    let agent = Agent::start_with(runtime_port, backend, |c| {
        c.kernel.watch_ports.push(gateway_port);
        c.correlator.span_wait_ms = 3_000;
    })
    .await;

    let truth_path = dir.join("truth.jsonl");
    let mut runtime = tokio::process::Command::new(testbed_bin())
        .args([
            "serve",
            "--port",
            &runtime_port.to_string(),
            "--policy",
            policy,
        ])
        .arg("--truth")
        .arg(&truth_path)
        .args(["--otlp-endpoint", &format!("http://{}", agent.otlp_grpc)])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start iw-testbed serve");
    wait_listening(runtime_port).await;
    let mut nginx = None;
    let mut litellm_proxy = None;
    match &gateway {
        Gateway::LiteLlm(program) => {
            let conf = dir.join("litellm.yaml");
            std::fs::write(
                &conf,
                format!(
                    "model_list:\n  - model_name: m\n    litellm_params:\n      model: hosted_vllm/m\n      api_base: http://127.0.0.1:{runtime_port}/v1\n"
                ),
            )
            .expect("write litellm.yaml");
            litellm_proxy = Some(
                tokio::process::Command::new(program)
                    .arg("--config")
                    .arg(&conf)
                    .args(["--port", &gateway_port.to_string(), "--host", "127.0.0.1"])
                    .env("LITELLM_MASTER_KEY", LITELLM_KEY)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start litellm"),
            );
        }
        Gateway::Nginx => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&dir, gateway_port, runtime_port))
                .expect("write nginx.conf");
            nginx = Some(
                tokio::process::Command::new("nginx")
                    .arg("-c")
                    .arg(&conf)
                    .arg("-p")
                    .arg(&dir)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start nginx (Debian nginx-light; `cargo xtask setup` installs it)"),
            );
        }
        Gateway::Draining => {
            let listener = TcpListener::bind(("127.0.0.1", gateway_port))
                .await
                .expect("bind the draining gateway");
            tokio::spawn(draining_gateway(
                listener,
                SocketAddr::from(([127, 0, 0, 1], runtime_port)),
            ));
        }
    }
    wait_listening(gateway_port).await;
    if litellm_proxy.is_some() {
        // It listens before its routes are up.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], gateway_port));

    // Six at a time, so that requests overlap.
    let mut runs = Vec::new();
    for batch in (0..CLIENTS).collect::<Vec<_>>().chunks(6) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&i| tokio::spawn(client(gateway_addr, i, salt, i % 3 == 1)))
            .collect();
        for t in tasks {
            runs.push(t.await.expect("client task"));
        }
    }
    // Let the runtime finish what it decodes after the clients left, and export the spans:
    // one per request, but none for a request the runtime aborted (vLLM makes none).
    // Wait until the runtime has recorded every request and the collector holds a span for
    // each one the runtime made a span for (a client that left may still be decoded to its
    // end under the `delayed` policy, and its span comes after the others).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = now_ns() + 15_000_000_000;
    loop {
        let spans_made = read_jsonl::<TruthRecord>(&truth_path).ok().map(|records| {
            let requests: Vec<_> = records
                .iter()
                .filter_map(|r| match r {
                    TruthRecord::Request(r) => Some(r),
                    _ => None,
                })
                .collect();
            (
                requests.len(),
                requests.iter().filter(|r| !r.span_id.is_empty()).count(),
            )
        });
        let forwarded = collector
            .spans()
            .iter()
            .filter(|s| s.span.name == "llm_request")
            .count();
        let done = spans_made
            .is_some_and(|(requests, with_span)| requests == CLIENTS && forwarded >= with_span);
        if done || now_ns() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left_early = runs.iter().filter(|r| r.left_at.is_some()).count();
    let metrics = agent
        .scrape_when("inferwatch_client_aborts_total", left_early as f64, 20)
        .await;
    agent.stop().await;
    if let Some(mut n) = nginx.take() {
        let _ = n.kill().await;
    }
    if let Some(mut l) = litellm_proxy.take() {
        let _ = l.kill().await;
    }
    let _ = runtime.kill().await;
    let received = collector.spans();
    let truth: Vec<RequestTruth> = read_jsonl::<TruthRecord>(&truth_path)
        .expect("read truth")
        .into_iter()
        .filter_map(|r| match r {
            TruthRecord::Request(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        truth.len(),
        CLIENTS,
        "{name}: every request reached the runtime"
    );
    let by_runtime_id: HashMap<&str, &RequestTruth> = truth
        .iter()
        .map(|t| (t.runtime_request_id.as_str(), t))
        .collect();
    let findings: HashMap<String, &Received> = received
        .iter()
        .filter(|s| s.span.name == "inferwatch.abort")
        .map(|s| (hex::encode(&s.span.trace_id), s))
        .collect();

    let (mut expected, mut true_positives, mut left) = (0, 0, 0);
    let mut stalled: HashMap<String, usize> = HashMap::new();
    let mut lags: Vec<(f64, Option<f64>)> = Vec::new();
    for run in &runs {
        let id = run
            .response_id
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: client {} read no response id", run.trace_id));
        let t = by_runtime_id
            .get(id)
            .unwrap_or_else(|| panic!("{name}: no truth for {id}"));
        let finding = findings.get(&run.trace_id);
        let Some(left_at) = run.left_at else {
            assert!(
                finding.is_none(),
                "{name}: a finding for a client that read its whole stream: {:?}",
                finding.map(|f| &f.span.attributes)
            );
            continue;
        };
        left += 1;
        // Tokens after the client left: the runtime decoded to its stop well after it.
        if t.stop_ns > left_at && t.output_tokens > 3 {
            expected += 1;
        }
        let Some(f) = finding else {
            continue;
        };
        true_positives += 1;
        let after: u64 = attr(&f.span, "inferwatch.abort.tokens_after")
            .and_then(|v| v.parse().ok())
            .expect("tokens_after");
        assert!(after >= 1, "{name}: finding with no token after");
        assert!(
            after <= t.output_tokens,
            "{name}: {after} tokens after of {}",
            t.output_tokens
        );
        let at = attr(&f.span, "inferwatch.abort.stalled_at").expect("stalled_at");
        *stalled.entry(at).or_default() += 1;
        let t_c: f64 = attr(&f.span, "inferwatch.abort.t_c")
            .and_then(|v| v.parse().ok())
            .expect("t_c");
        let t_s: f64 = attr(&f.span, "inferwatch.abort.t_s")
            .and_then(|v| v.parse().ok())
            .expect("t_s");
        let t_g: Option<f64> = attr(&f.span, "inferwatch.abort.t_g").and_then(|v| v.parse().ok());
        lags.push(((t_s - t_c) / 1e6, t_g.map(|g| (g - t_c) / 1e6)));
    }
    let found = findings.len();
    let precision = if found == 0 {
        1.0
    } else {
        true_positives as f64 / found as f64
    };
    let recall = if expected == 0 {
        1.0
    } else {
        true_positives as f64 / expected as f64
    };
    let mut joins: HashMap<String, usize> = HashMap::new();
    for s in received.iter().filter(|s| s.span.name == "llm_request") {
        *joins
            .entry(attr(&s.span, "inferwatch.join").unwrap_or_else(|| "missing".into()))
            .or_default() += 1;
    }
    let client_aborts = metric_sum(&metrics, "inferwatch_client_aborts_total", "");
    let gateway_lags = metric_sum(
        &metrics,
        "inferwatch_abort_lag_seconds_count",
        "boundary=\"gateway\"",
    );
    println!(
        "\n== {name} (policy {policy}): {CLIENTS} requests, {left} clients left early, {expected} with tokens after, \
         {found} findings, precision {precision:.3}, recall {recall:.3}; joins {joins:?}; stalled_at {stalled:?}; \
         client aborts counted {client_aborts}, gateway lags observed {gateway_lags}; lags (t_s - t_c, t_g - t_c) ms {lags:?}"
    );
    assert!(left >= 5, "{name}: too few clients left ({left})");
    assert_eq!(
        expected, left,
        "{name}: every early leaver had tokens after"
    );
    assert_eq!(precision, 1.0, "{name}: precision");
    assert_eq!(recall, 1.0, "{name}: recall");
    assert_eq!(
        client_aborts as usize, left,
        "{name}: every client abort counted, once"
    );
    // Every runtime span lands in its client's trace: forwarded by nginx, moved there by the
    // agent behind the gateways that drop traceparent. (A request the runtime aborted has
    // none, as vLLM makes none; its finding is in the client's trace, checked above.)
    for run in runs.iter().filter(|r| r.left_at.is_none()) {
        assert!(
            received
                .iter()
                .any(|s| s.span.name == "llm_request"
                    && hex::encode(&s.span.trace_id) == run.trace_id),
            "{name}: no runtime span in the client's trace {}",
            run.trace_id
        );
    }
    match gateway {
        Gateway::LiteLlm(_) => {
            // LiteLLM forwards neither traceparent nor x-request-id; the response id, which it
            // passes through, links the two sides and joins the spans.
            // Every span the runtime made: one it aborted (the client left and the `delayed`
            // policy's 400 ms ran out before max_tokens) has none, as vLLM makes none.
            let spans_made = truth.iter().filter(|t| !t.span_id.is_empty()).count();
            assert!(
                spans_made >= CLIENTS - left,
                "{name}: finished requests' spans"
            );
            assert_eq!(
                joins.get("response_id").copied(),
                Some(spans_made),
                "{name}: joins {joins:?}"
            );
            // It closes its upstream when its client leaves (2-7 ms here); the runtime then
            // decodes on under the `delayed` policy.
            assert_eq!(
                stalled.get("runtime").copied(),
                Some(left),
                "{name}: stalled_at"
            );
            assert_eq!(gateway_lags as usize, left, "{name}: t_g of every abort");
        }
        Gateway::Nginx => {
            // nginx closes its upstream when the client leaves; the runtime then decodes on
            // under the `delayed` policy: the runtime held the cancel.
            assert_eq!(
                stalled.get("runtime").copied(),
                Some(left),
                "{name}: stalled_at"
            );
            assert_eq!(gateway_lags as usize, left, "{name}: t_g of every abort");
        }
        Gateway::Draining => {
            // The gateway never closed its upstream: it held the cancel.
            assert_eq!(
                stalled.get("gateway").copied(),
                Some(left),
                "{name}: stalled_at"
            );
            assert!(
                joins.get("response_id").copied().unwrap_or(0) >= CLIENTS - left,
                "{name}: the response id joins what the gateway stripped: {joins:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_through_nginx() {
    if !kernel_tests_enabled("abort_through_nginx") {
        return;
    }
    gateway_run("gateway-nginx", Gateway::Nginx, "delayed:150", 0xa1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_through_a_gateway_that_drains_the_stream() {
    if !kernel_tests_enabled("abort_through_a_gateway_that_drains_the_stream") {
        return;
    }
    gateway_run("gateway-draining", Gateway::Draining, "immediate", 0xb2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_through_litellm() {
    if !kernel_tests_enabled("abort_through_litellm") {
        return;
    }
    let Some(program) = crate::harness::litellm("abort_through_litellm") else {
        return;
    };
    gateway_run(
        "gateway-litellm",
        Gateway::LiteLlm(program),
        // LiteLLM takes 2-120 ms to close its upstream on this shared machine: the runtime's
        // 400 ms keeps the runtime the boundary that held the cancel.
        "delayed:400",
        0xc3,
    )
    .await;
}
