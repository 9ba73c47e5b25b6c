//! Receiver and pass-through tests, driven by real clients: the Python OpenTelemetry SDK as the
//! runtime, a Python gRPC receiver on the SDK's protobuf types as the backend, and raw gRPC /
//! HTTP clients for hostile input. All ports are ephemeral.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, any_value};
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::adapters::{AdapterOptions, adapt_request};
use super::sample::vllm_request;
use super::{OtlpReceiver, OtlpReceiverConfig, channel};
use crate::internal_events::{AgentMetrics, DropStage, Protocol, RejectReason};
use crate::model::{RuntimeKind, RuntimeRequest};
use crate::otlp_wire::batch::{SpanBatch, finding_span, kv_i64, kv_str};
use crate::sinks::SinkSender;
use crate::sinks::otlp::{ExportConfig, ExportProtocol, OtlpExporter};

// ---------------------------------------------------------------- harness

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Python with the OpenTelemetry SDK: `INFERWATCH_PYTHON`, else `<workspace>/.venv`.
fn python() -> PathBuf {
    let p = std::env::var_os("INFERWATCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "Python for the real-peer tests not found at {}: run `cargo xtask setup` \
         (creates .venv from tests/python/requirements.txt) or set INFERWATCH_PYTHON",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    workspace_root().join("tests/python").join(name)
}

/// The Python OTLP/gRPC receiver playing the backend.
struct Backend {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl Backend {
    fn start(port: u16) -> Self {
        let mut child = Command::new(python())
            .arg(script("otlp_receiver.py"))
            .args(["--port", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the Python OTLP receiver");
        let stdout = child.stdout.take().expect("receiver stdout");
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read PORT line");
        let port = first
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver did not print its port: {first:?}"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Self { child, port, lines }
    }

    /// Waits (up to 30 s) for a span matching `pred`.
    fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => continue,
                Err(_) => panic!("backend never received {what}"),
            }
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The receiver, a minimal pipeline (adapt, enrich, forward) and optionally the exporter.
struct Agent {
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: Arc<AgentMetrics>,
    export: Option<SinkSender>,
    adapted: mpsc::UnboundedReceiver<RuntimeRequest>,
    /// Export requests received, either protocol.
    requests: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_agent(receiver: OtlpReceiverConfig, export: Option<ExportConfig>) -> Agent {
    let metrics = Arc::new(AgentMetrics::default());
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = channel(&receiver);
    let rcv = OtlpReceiver::build(&receiver, tx, metrics.clone())
        .await
        .expect("receiver binds");
    let (grpc, http) = (rcv.grpc_addr(), rcv.http_addr());
    tokio::spawn(rcv.run(shutdown.clone()));
    let export_tx = export.map(|config| {
        let resolved = config
            .resolve(Vec::new())
            .expect("export config resolves")
            .expect("export endpoint set");
        let exporter =
            OtlpExporter::build(&config, resolved, metrics.clone()).expect("exporter builds");
        let (etx, erx) = config.queue(metrics.clone());
        tokio::spawn(exporter.run(erx, shutdown.clone()));
        etx
    });
    let (adapted_tx, adapted) = mpsc::unbounded_channel();
    let options = AdapterOptions::from(&receiver);
    let forward = export_tx.clone();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let adapted = adapt_request(&request, &options);
            // The raw request encodes to the bytes it was read from: decoded here so that the
            // test enriches prost messages.
            let mut batch = SpanBatch::from(
                ExportTraceServiceRequest::decode(request.encode_to_vec().as_slice())
                    .expect("the receiver validated every span"),
            );
            for r in adapted {
                // What the correlator will do: mark the join, add a finding in the trace.
                batch.add_attributes(
                    &r.trace_id,
                    &r.span_id,
                    [
                        kv_str("inferwatch.join", "traceparent"),
                        kv_str("inferwatch.runtime", r.runtime.as_str()),
                    ],
                );
                batch.push_finding(finding_span(
                    "inferwatch.abort",
                    r.trace_id,
                    r.span_id,
                    r.end,
                    r.end,
                    vec![kv_i64("inferwatch.abort.tokens_after", 5)],
                ));
                let _ = adapted_tx.send(r);
            }
            if let Some(f) = &forward {
                f.send(batch);
            }
        }
    });
    Agent {
        grpc,
        http,
        metrics,
        export: export_tx,
        adapted,
        requests,
        shutdown,
    }
}

fn ephemeral() -> OtlpReceiverConfig {
    OtlpReceiverConfig {
        grpc_port: 0,
        http_port: 0,
        ..Default::default()
    }
}

fn export_to(endpoint: String, protocol: ExportProtocol) -> ExportConfig {
    ExportConfig {
        endpoint: Some(endpoint),
        protocol: Some(protocol),
        retry_initial_ms: 20,
        retry_max_ms: 200,
        ..Default::default()
    }
}

/// Runs the vLLM-shaped Python sender; returns the ids it reports.
async fn send_vllm_spans(protocol: &str, endpoint: String) -> Value {
    let protocol = protocol.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script("otlp_vllm_sender.py"))
            .args(["--protocol", &protocol, "--endpoint", &endpoint])
            .output()
            .expect("run the Python sender")
    })
    .await
    .expect("sender task");
    assert!(
        out.status.success(),
        "Python sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Value = serde_json::from_slice(&out.stdout).expect("sender prints JSON");
    ids[0].clone()
}

// ---------------------------------------------------------------- real peers

async fn python_sdk_through_agent_to_backend(protocol: &str) {
    let backend = tokio::task::spawn_blocking(|| Backend::start(0))
        .await
        .expect("backend");
    let mut agent = start_agent(
        ephemeral(),
        Some(export_to(backend.endpoint(), ExportProtocol::Grpc)),
    )
    .await;
    let endpoint = match protocol {
        "grpc" => format!("http://{}", agent.grpc),
        _ => format!("http://{}/v1/traces", agent.http),
    };
    let ids = send_vllm_spans(protocol, endpoint).await;
    let span_id = ids["span_id"].as_str().expect("span id").to_owned();
    let trace_id = ids["trace_id"].as_str().expect("trace id").to_owned();

    let (forwarded, client, finding) = tokio::task::spawn_blocking(move || {
        let sid = span_id.clone();
        let forwarded = backend.wait_for("the llm_request span", |v| v["span_id"] == sid);
        let client = backend.wait_for("the client span", |v| {
            v["name"] == "POST /v1/chat/completions"
        });
        let finding = backend.wait_for("the abort finding", |v| {
            v["name"] == "inferwatch.abort" && v["parent_span_id"] == span_id
        });
        (forwarded, client, finding)
    })
    .await
    .expect("wait");

    // Ids, kind, resource and the runtime's attributes arrive unchanged.
    assert_eq!(forwarded["name"], "llm_request");
    assert_eq!(forwarded["kind"], 2, "SERVER");
    assert_eq!(forwarded["trace_id"], trace_id);
    assert_eq!(forwarded["parent_span_id"], ids["parent_span_id"]);
    assert_eq!(forwarded["scope"], "vllm.entrypoints.openai.api_server");
    let res = &forwarded["resource"];
    assert_eq!(res["service.name"], "vllm");
    assert_eq!(res["process.pid"], ids["pid"]);
    assert_eq!(res["host.name"], "gpu-node-1");
    let a = &forwarded["attributes"];
    assert_eq!(a["gen_ai.request.id"], "chatcmpl-test-0");
    assert_eq!(a["gen_ai.usage.prompt_tokens"], 1200);
    assert_eq!(a["gen_ai.usage.completion_tokens"], 87);
    assert_eq!(a["gen_ai.latency.time_in_queue"], 0.012);
    assert_eq!(a["gen_ai.latency.time_to_first_token"], 0.145);
    assert_eq!(
        a["gen_ai.response.finish_reasons"],
        serde_json::json!(["stop"])
    );
    assert_eq!(a["tenant.id"], "acme");
    // Plus the agent's attributes.
    assert_eq!(a["inferwatch.join"], "traceparent");
    assert_eq!(a["inferwatch.runtime"], "vllm");
    // The unknown client span passed through untouched.
    assert_eq!(client["attributes"], serde_json::json!({}));
    assert_eq!(client["span_id"], ids["parent_span_id"]);
    // The finding is in the request's trace, under the agent's resource.
    assert_eq!(finding["trace_id"], trace_id);
    assert_eq!(finding["resource"]["service.name"], "inferwatch");
    assert_eq!(finding["attributes"]["inferwatch.abort.tokens_after"], 5);

    // The adapter read vLLM's units (seconds as doubles).
    let r = agent.adapted.recv().await.expect("adapted request");
    assert_eq!(r.runtime, RuntimeKind::Vllm);
    assert_eq!(r.queue_ns, Some(12_000_000));
    assert_eq!(r.first_token, Some(r.arrival + 145_000_000));
    assert_eq!(r.end, r.arrival + 2_500_000_000);
    assert_eq!(r.prompt_tokens, Some(1200));
    assert_eq!(r.output_tokens, Some(87));
    assert_eq!(r.tenant.as_deref(), Some("acme"));
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.instance.service_name.as_deref(), Some("vllm"));
    assert_eq!(r.instance.pid, ids["pid"].as_u64().map(|p| p as u32));
    let proto = match protocol {
        "grpc" => Protocol::Grpc,
        _ => Protocol::HttpProtobuf,
    };
    assert_eq!(agent.metrics.received(proto), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_grpc_spans_reach_backend_unchanged_plus_agent_attributes() {
    python_sdk_through_agent_to_backend("grpc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_http_spans_reach_backend_unchanged_plus_agent_attributes() {
    python_sdk_through_agent_to_backend("http").await;
}

/// The HTTP exporter (gzip) into a second agent's HTTP receiver.
#[tokio::test(flavor = "multi_thread")]
async fn http_exporter_delivers_gzip_protobuf() {
    let mut sink = start_agent(ephemeral(), None).await;
    let mut export = export_to(
        format!("http://{}/v1/traces", sink.http),
        ExportProtocol::HttpProtobuf,
    );
    export.compression = Some(crate::sinks::otlp::ExportCompression::Gzip);
    let agent = start_agent(ephemeral(), Some(export)).await;
    raw_grpc(agent.grpc, vllm_request(0, 3).encode_to_vec())
        .await
        .expect("valid request accepted");
    for _ in 0..3 {
        let r = sink.adapted.recv().await.expect("forwarded span adapted");
        assert_eq!(r.runtime, RuntimeKind::Vllm);
    }
    assert_eq!(
        sink.metrics.received(Protocol::HttpProtobuf),
        3 + 3,
        "3 spans + 3 findings"
    );
}

/// Export requests go at most once per `min_send_interval_ms`: the first at once, the batches
/// that come within the interval after it together in one request.
#[tokio::test(flavor = "multi_thread")]
async fn exporter_merges_the_batches_of_one_send_interval() {
    let sink = start_agent(ephemeral(), None).await;
    let mut export = export_to(format!("http://{}", sink.grpc), ExportProtocol::Grpc);
    export.min_send_interval_ms = 3_000;
    let agent = start_agent(ephemeral(), Some(export)).await;
    let received = || sink.metrics.received(Protocol::Grpc);
    let requests = || sink.requests.load(std::sync::atomic::Ordering::SeqCst);

    raw_grpc(agent.grpc, vllm_request(0, 1).encode_to_vec())
        .await
        .expect("valid request accepted");
    wait_until("the first batch exported", || received() == 2).await;
    assert_eq!(requests(), 1);
    // Five batches (a span and its finding each) within the interval: one request.
    for i in 1..6 {
        raw_grpc(agent.grpc, vllm_request(i, 1).encode_to_vec())
            .await
            .expect("valid request accepted");
    }
    wait_until("the five batches exported", || received() == 2 + 10).await;
    assert_eq!(requests(), 2, "the five batches went in one request");
}

// ---------------------------------------------------------------- backend down

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_queue_bounded_drops_counted_then_resumes() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut export = export_to(format!("http://127.0.0.1:{port}"), ExportProtocol::Grpc);
    export.queue_max_spans = 20;
    export.max_batch_spans = 4;
    let agent = start_agent(ephemeral(), Some(export)).await;
    let queue = agent.export.clone().expect("export queue");

    // 50 requests of 2 spans (each becomes 2 spans + 2 findings) while nothing listens.
    for i in 0..50 {
        raw_grpc(agent.grpc, vllm_request(i * 2, 2).encode_to_vec())
            .await
            .expect("receiver keeps accepting while the backend is down");
        assert!(queue.depth() <= 20, "queue bounded: {}", queue.depth());
    }
    let m = &agent.metrics;
    assert_eq!(m.received(Protocol::Grpc), 100);
    wait_until("export errors and drops", || {
        m.errors("otlp") > 0 && m.dropped("otlp", DropStage::SinkQueue) > 0
    })
    .await;
    assert_eq!(m.exported("otlp"), 0);
    let dropped = m.dropped("otlp", DropStage::SinkQueue);

    // The backend comes back on the same port: export resumes and drains the queue.
    let backend = tokio::task::spawn_blocking(move || Backend::start(port))
        .await
        .expect("backend");
    wait_until("everything not dropped is exported", || {
        m.exported("otlp") + dropped == 200 && queue.depth() == 0
    })
    .await;
    assert_eq!(m.depth("otlp"), 0);
    tokio::task::spawn_blocking(move || {
        backend.wait_for("a span after recovery", |v| v["name"] == "llm_request");
    })
    .await
    .expect("wait");
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition never held: {what}");
}

// ---------------------------------------------------------------- hostile input

/// A gRPC codec that sends arbitrary bytes as the request message.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        ExportTraceServiceResponse::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

async fn raw_grpc_with(addr: SocketAddr, body: Vec<u8>, token: Option<&str>) -> Result<(), Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("metadata"),
        );
    }
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(request, path, RawCodec).await.map(|_| ())
}

async fn raw_grpc(addr: SocketAddr, body: Vec<u8>) -> Result<(), Status> {
    raw_grpc_with(addr, body, None).await
}

fn garbage() -> Vec<u8> {
    vec![0x0a, 0xff, 0xff, 0xff, 0x7f, 0x01, 0x02, 0x03]
}

fn truncated() -> Vec<u8> {
    let full = vllm_request(0, 4).encode_to_vec();
    full[..full.len() / 2].to_vec()
}

fn huge() -> Vec<u8> {
    let mut r = vllm_request(0, 1);
    r.resource_spans[0].scope_spans[0].spans[0]
        .attributes
        .push(kv_str("blob", &"x".repeat(20 * 1024 * 1024)));
    r.encode_to_vec()
}

fn many_attributes() -> Vec<u8> {
    let mut r = vllm_request(0, 1);
    let span = &mut r.resource_spans[0].scope_spans[0].spans[0];
    span.attributes = (0..10_000).map(|i| kv_i64(&format!("k{i}"), i)).collect();
    r.encode_to_vec()
}

fn nested(depth: usize) -> Vec<u8> {
    let mut value = AnyValue {
        value: Some(any_value::Value::IntValue(1)),
    };
    for _ in 0..depth {
        value = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue {
                values: vec![value],
            })),
        };
    }
    let mut r = vllm_request(0, 1);
    r.resource_spans[0].scope_spans[0].spans[0].attributes.push(
        opentelemetry_proto::tonic::common::v1::KeyValue {
            key: "deep".into(),
            value: Some(value),
            ..Default::default()
        },
    );
    r.encode_to_vec()
}

fn invalid_utf8() -> Vec<u8> {
    let mut bytes = vllm_request(0, 1).encode_to_vec();
    let at = bytes
        .windows(11)
        .position(|w| w == b"llm_request")
        .expect("span name in encoding");
    bytes[at] = 0xff;
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_bad_input_gets_protocol_errors_and_receiver_stays_up() {
    let agent = start_agent(ephemeral(), None).await;
    let cases: Vec<(&str, Vec<u8>, Code)> = vec![
        ("garbage", garbage(), Code::InvalidArgument),
        ("truncated", truncated(), Code::InvalidArgument),
        ("20 MiB", huge(), Code::ResourceExhausted),
        (
            "10 000 attributes",
            many_attributes(),
            Code::InvalidArgument,
        ),
        (
            "nested beyond prost's limit",
            nested(200),
            Code::InvalidArgument,
        ),
        ("nested beyond our limit", nested(40), Code::InvalidArgument),
        ("invalid UTF-8", invalid_utf8(), Code::InvalidArgument),
    ];
    for (what, body, code) in cases {
        let err = raw_grpc(agent.grpc, body)
            .await
            .expect_err(&format!("{what} must be refused"));
        assert_eq!(err.code(), code, "{what}: {err:?}");
        raw_grpc(agent.grpc, vllm_request(0, 1).encode_to_vec())
            .await
            .unwrap_or_else(|e| panic!("valid request after {what} refused: {e:?}"));
    }
    assert_eq!(agent.metrics.received(Protocol::Grpc), 7);
    assert_eq!(
        agent
            .metrics
            .rejected(Protocol::Grpc, RejectReason::LimitExceeded),
        2
    );
}

async fn post(
    addr: SocketAddr,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> http::StatusCode {
    try_post(addr, content_type, headers, body)
        .await
        .unwrap_or_else(|e| panic!("HTTP request failed: {e}"))
}

/// Like `post`, but returns the client's error: the server may answer 413 and close before
/// reading a 20 MiB body, and hyper then reports the reset instead of the status.
async fn try_post(
    addr: SocketAddr,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<http::StatusCode, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/traces"));
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

const PB: Option<&str> = Some("application/x-protobuf");
const JSON: Option<&str> = Some("application/json");

fn json_request() -> Vec<u8> {
    serde_json::to_vec(&vllm_request(0, 2)).expect("OTLP JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn http_bad_input_gets_protocol_errors_and_receiver_stays_up() {
    let agent = start_agent(ephemeral(), None).await;
    let bomb = gzip(&vec![0u8; 20 * 1024 * 1024]);
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
    );
    let cases: Vec<Case<'_>> = vec![
        ("garbage protobuf", PB, vec![], garbage(), 400),
        ("truncated protobuf", PB, vec![], truncated(), 400),
        (
            "invalid JSON",
            JSON,
            vec![],
            b"{\"resourceSpans\": [".to_vec(),
            400,
        ),
        ("20 MiB", PB, vec![], huge(), 413),
        (
            "gzip bomb",
            PB,
            vec![("content-encoding", "gzip")],
            bomb,
            413,
        ),
        ("10 000 attributes", PB, vec![], many_attributes(), 400),
        ("nested beyond prost's limit", PB, vec![], nested(200), 400),
        ("nested beyond our limit", PB, vec![], nested(40), 400),
        ("invalid UTF-8", PB, vec![], invalid_utf8(), 400),
        (
            "wrong content type",
            Some("text/plain"),
            vec![],
            json_request(),
            415,
        ),
        ("no content type", None, vec![], json_request(), 415),
    ];
    for (what, ct, headers, body, status) in cases {
        match try_post(agent.http, ct, &headers, body).await {
            Ok(got) => assert_eq!(got.as_u16(), status, "{what}"),
            // Only a too-large body may be cut off by the server's early 413.
            Err(e) => assert_eq!(status, 413, "{what}: {e}"),
        }
        let ok = post(agent.http, PB, &[], vllm_request(0, 1).encode_to_vec()).await;
        assert_eq!(ok.as_u16(), 200, "valid request after {what}");
    }
    assert_eq!(agent.metrics.received(Protocol::HttpProtobuf), 11);
    let ok = post(agent.http, JSON, &[], json_request()).await;
    assert_eq!(ok.as_u16(), 200, "OTLP JSON");
    let gz = gzip(&vllm_request(0, 3).encode_to_vec());
    let ok = post(agent.http, PB, &[("content-encoding", "gzip")], gz).await;
    assert_eq!(ok.as_u16(), 200, "gzip protobuf");
    assert_eq!(agent.metrics.received(Protocol::HttpJson), 2);
    assert_eq!(agent.metrics.received(Protocol::HttpProtobuf), 14);
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_json_ids_are_hex_and_adapt() {
    let mut agent = start_agent(ephemeral(), None).await;
    let expected = vllm_request(5, 1);
    let span = &expected.resource_spans[0].scope_spans[0].spans[0];
    let text = String::from_utf8(json_request()).expect("utf8");
    assert!(text.contains(&hex::encode(
        &vllm_request(0, 1).resource_spans[0].scope_spans[0].spans[0].trace_id
    )));
    let body = serde_json::to_vec(&expected).expect("json");
    assert_eq!(post(agent.http, JSON, &[], body).await.as_u16(), 200);
    let r = agent.adapted.recv().await.expect("adapted");
    assert_eq!(r.trace_id.to_vec(), span.trace_id);
    assert_eq!(r.span_id.to_vec(), span.span_id);
    assert_eq!(r.queue_ns, Some(12_000_000));
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_is_required_when_configured() {
    let config = OtlpReceiverConfig {
        bearer_token: Some("s3cret".into()),
        ..ephemeral()
    };
    let agent = start_agent(config, None).await;
    let body = vllm_request(0, 1).encode_to_vec();
    let err = raw_grpc(agent.grpc, body.clone())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = raw_grpc_with(agent.grpc, body.clone(), Some("wrong"))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
    raw_grpc_with(agent.grpc, body.clone(), Some("s3cret"))
        .await
        .expect("right token");
    assert_eq!(post(agent.http, PB, &[], body.clone()).await.as_u16(), 401);
    let ok = post(agent.http, PB, &[("authorization", "Bearer s3cret")], body).await;
    assert_eq!(ok.as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn full_pipeline_queue_answers_unavailable_and_counts() {
    let config = OtlpReceiverConfig {
        queue_capacity: 1,
        ..ephemeral()
    };
    let metrics = Arc::new(AgentMetrics::default());
    let (tx, _rx_kept_but_never_read) = channel(&config);
    let rcv = OtlpReceiver::build(&config, tx, metrics.clone())
        .await
        .expect("binds");
    let addr = rcv.grpc_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(rcv.run(shutdown.clone()));
    raw_grpc(addr, vllm_request(0, 1).encode_to_vec())
        .await
        .expect("first fits");
    let err = raw_grpc(addr, vllm_request(1, 3).encode_to_vec())
        .await
        .expect_err("queue full");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(metrics.dropped("receiver", DropStage::ReceiverQueue), 3);
    shutdown.cancel();
}
