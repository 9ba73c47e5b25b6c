//! Receiver tests, driven by real clients: raw gRPC / HTTP clients for hostile input, limits,
//! authentication and a full queue. All ports are ephemeral. The harness (receiver plus a
//! minimal pipeline) is shared with the pass-through tests (`crate::pipeline`'s `otlp_tests`),
//! which add the exporter and real peers.

use std::io::Write;
use std::net::SocketAddr;
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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::adapted::{AdaptedSpan, SpanRole};
use super::sample::vllm_request;
use super::{OtlpReceiver, OtlpReceiverConfig, channel};
use crate::internal_events::{AgentMetrics, DropStage, Protocol, RejectReason};
use crate::model::RuntimeRequest;
use crate::otlp_wire::batch::{EncodedGroup, SpanBatch, finding_span, kv_i64, kv_str};

// ---------------------------------------------------------------- harness

/// The receiver and a minimal pipeline (adapt, enrich, forward). The enriched batches wait in
/// `batches` for whoever takes them (the pass-through tests in `crate::pipeline` forward them
/// to the exporter; a source does not reach a sink).
pub(crate) struct Agent {
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) batches: Option<mpsc::UnboundedReceiver<SpanBatch>>,
    pub(crate) adapted: mpsc::UnboundedReceiver<RuntimeRequest>,
    /// Export requests received, either protocol.
    pub(crate) requests: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) shutdown: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn start_agent(receiver: OtlpReceiverConfig) -> Agent {
    let metrics = Arc::new(AgentMetrics::default());
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = channel(&receiver, &metrics);
    let rcv = OtlpReceiver::build(&receiver, tx, metrics.clone(), None)
        .await
        .expect("receiver binds");
    let (grpc, http) = (rcv.grpc_addr(), rcv.http_addr());
    tokio::spawn(rcv.run(shutdown.clone()));
    let (adapted_tx, adapted) = mpsc::unbounded_channel();
    let (forward, batches) = mpsc::unbounded_channel();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // The runtime requests the receiver's adapters read, and the spans decoded (one
            // `ResourceSpans` per scope, as the pipeline groups them) so that the test
            // enriches prost messages.
            let mut adapted = Vec::new();
            let mut resource_spans = Vec::new();
            for scope in request.resources.into_iter().flat_map(|r| r.scopes) {
                let mut spans = Vec::new();
                for AdaptedSpan { span, role } in scope.spans {
                    if let SpanRole::Request(r) = role {
                        adapted.push(r);
                    }
                    spans.push(span);
                }
                resource_spans.push(
                    EncodedGroup {
                        group: scope.group,
                        spans,
                    }
                    .decode(),
                );
            }
            let mut batch = SpanBatch::from(ExportTraceServiceRequest { resource_spans });
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
            let _ = forward.send(batch);
        }
    });
    Agent {
        grpc,
        http,
        metrics,
        batches: Some(batches),
        adapted,
        requests,
        shutdown,
    }
}

pub(crate) fn ephemeral() -> OtlpReceiverConfig {
    OtlpReceiverConfig {
        grpc_port: 0,
        http_port: 0,
        ..Default::default()
    }
}

pub(crate) async fn wait_until(what: &str, cond: impl Fn() -> bool) {
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

pub(crate) async fn raw_grpc(addr: SocketAddr, body: Vec<u8>) -> Result<(), Status> {
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
    let agent = start_agent(ephemeral()).await;
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
    let agent = start_agent(ephemeral()).await;
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
    let mut agent = start_agent(ephemeral()).await;
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
    let agent = start_agent(config).await;
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
    let (tx, _rx_kept_but_never_read) = channel(&config, &metrics);
    let rcv = OtlpReceiver::build(&config, tx, metrics.clone(), None)
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
