//! The OTLP pass-through, receiver to exporter, driven by real peers: the Python
//! OpenTelemetry SDK as the runtime, a Python gRPC receiver on the SDK's protobuf types as the
//! backend, and a second agent's receiver behind the HTTP exporter. All ports are ephemeral.
//! They sit here, above the OTLP source and the OTLP sink, on the receiver's harness
//! (`crate::sources::otlp`'s tests) with the exporter behind it.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::Message;
use serde_json::Value;

use crate::internal_events::{DropStage, Protocol};
use crate::model::RuntimeKind;
use crate::sinks::SinkSender;
use crate::sinks::otlp::{ExportCompression, ExportConfig, ExportProtocol, OtlpExporter};
use crate::sources::otlp::OtlpReceiverConfig;
use crate::sources::otlp::sample::vllm_request;
use crate::sources::otlp::tests::{Agent, ephemeral, raw_grpc, start_agent, wait_until};

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

/// The receiver's harness with the OTLP exporter behind it: every enriched batch is sent to
/// the exporter's queue, which is returned.
async fn start_exporting(
    receiver: OtlpReceiverConfig,
    export: ExportConfig,
) -> (Agent, SinkSender) {
    let mut agent = start_agent(receiver).await;
    let resolved = export
        .resolve(Vec::new())
        .expect("export config resolves")
        .expect("export endpoint set");
    let exporter =
        OtlpExporter::build(&export, resolved, agent.metrics.clone()).expect("exporter builds");
    let (etx, erx) = export.queue(agent.metrics.clone());
    tokio::spawn(exporter.run(erx, agent.shutdown.clone()));
    let mut batches = agent.batches.take().expect("batches not taken yet");
    let forward = etx.clone();
    tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            forward.send(batch);
        }
    });
    (agent, etx)
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
    let (mut agent, _export) = start_exporting(
        ephemeral(),
        export_to(backend.endpoint(), ExportProtocol::Grpc),
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
    assert_eq!(r.prefill_ns, Some(130_000_000));
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
    let mut sink = start_agent(ephemeral()).await;
    let mut export = export_to(
        format!("http://{}/v1/traces", sink.http),
        ExportProtocol::HttpProtobuf,
    );
    export.compression = Some(ExportCompression::Gzip);
    let (agent, _export) = start_exporting(ephemeral(), export).await;
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
    let sink = start_agent(ephemeral()).await;
    let mut export = export_to(format!("http://{}", sink.grpc), ExportProtocol::Grpc);
    export.min_send_interval_ms = 3_000;
    let (agent, _export) = start_exporting(ephemeral(), export).await;
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
    let (agent, queue) = start_exporting(ephemeral(), export).await;

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
