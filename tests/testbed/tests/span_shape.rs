//! Receives the runtime's spans with an in-process OTLP/gRPC receiver and checks them against
//! vLLM's `llm_request` shape (name, kind, attribute keys and value types).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inferwatch_testbed::config::RuntimeConfig;
use inferwatch_testbed::otel::{EXTRA_ATTRIBUTES, SPAN_NAME, VLLM_ATTRIBUTES};
use inferwatch_testbed::runtime::{self, ServeOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut g = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                g.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn type_of(v: &Option<Value>) -> &'static str {
    match v {
        Some(Value::StringValue(_)) => "string",
        Some(Value::IntValue(_)) => "int",
        Some(Value::DoubleValue(_)) => "double",
        Some(Value::BoolValue(_)) => "bool",
        Some(Value::ArrayValue(a)) => {
            if a.values
                .iter()
                .all(|x| matches!(x.value, Some(Value::StringValue(_))))
            {
                "string_array"
            } else {
                "array"
            }
        }
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn span_matches_vllm_llm_request() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let svc = sink.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let running = runtime::start(ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        runtime: RuntimeConfig {
            decode_ms: 1.0,
            ..RuntimeConfig::default()
        },
        duration_scale: 1.0,
        truth: None,
        otlp_endpoint: Some(format!("http://{otlp}")),
        nvml_script: None,
    })
    .await
    .unwrap();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello there general kenobi"}],"max_tokens":5,"stream":true,"temperature":0.5,"top_p":0.9}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: abc123\r\ntraceparent: 00-{trace}-{parent}-01\r\nx-tenant-id: acme\r\nx-conversation-id: conv-1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert_eq!(resp.matches("\"content\":\" o").count(), 5, "{resp}");
    assert!(resp.contains("data: [DONE]"));
    running.shutdown().await;

    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = sink.0.lock().unwrap().clone();
        if !spans.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, SPAN_NAME);
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex::encode(&span.trace_id), trace);
    assert_eq!(hex::encode(&span.parent_span_id), parent);
    let attrs: Vec<(&str, &'static str)> = span
        .attributes
        .iter()
        .map(|kv| {
            (
                kv.key.as_str(),
                type_of(&kv.value.as_ref().and_then(|v| v.value.clone())),
            )
        })
        .collect();
    for (key, ty) in VLLM_ATTRIBUTES.iter().chain(EXTRA_ATTRIBUTES) {
        let got = attrs.iter().find(|(k, _)| k == key);
        assert_eq!(got.map(|g| g.1), Some(*ty), "attribute {key}");
    }
    assert_eq!(
        attrs.len(),
        VLLM_ATTRIBUTES.len() + EXTRA_ATTRIBUTES.len(),
        "{attrs:?}"
    );
    let get = |k: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.as_ref().and_then(|v| v.value.clone()))
    };
    assert_eq!(
        get("gen_ai.request.id"),
        Some(Value::StringValue("chatcmpl-abc123".into()))
    );
    assert_eq!(
        get("gen_ai.usage.completion_tokens"),
        Some(Value::IntValue(5))
    );
    assert_eq!(get("tenant.id"), Some(Value::StringValue("acme".into())));
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
}
