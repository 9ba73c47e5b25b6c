//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`) and their seed inputs.
//!
//! Each target is one function from untrusted bytes to nothing: it feeds the bytes to the same
//! public decoders the agent runs on network and kernel input and checks that they return
//! (an error is fine; a panic, a hang or an unbounded allocation is the bug). The fuzz crate and
//! `agent/tests/fuzz_regressions.rs` both call these, so the seeds and the committed crash
//! reproducers are replayed by a plain `cargo test` on every CI run, without libFuzzer.
//!
//! Not part of the agent's API: hidden from the docs, and free to change with the targets.

use std::path::Path;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::config::AgentConfig;
use crate::otlp_wire::read::{SpanView, WireLimits};
use crate::sources::kernel::event::{self, raw};
use crate::sources::kernel::http::{HeadParser, parse_traceparent};
use crate::sources::kernel::{EventConverter, KernelConfig, MonotonicToWall};
use crate::sources::kvevents;
use crate::sources::otlp::adapters::{AdapterOptions, adapt, adapt_decoded, instance};
use crate::sources::otlp::{OtlpReceiverConfig, RawTraceRequest, validate, validate_decoded};

mod target;

pub use self::target::Target;

impl Target {
    /// Runs the target's body on one input.
    pub fn run(self, data: &[u8]) {
        match self {
            Target::Otlp => otlp(data),
            Target::KernelHead => kernel_head(data),
            Target::KvEvents => kv_events(data),
            Target::Config => config(data),
        }
    }
}

/// OTLP receiver path: the bytes as an OTLP/protobuf body (what gRPC and `application/x-protobuf`
/// decode: spans kept encoded, [`RawTraceRequest`]) and as an OTLP/JSON body (what
/// `application/json` decodes with serde_json); each request goes through [`validate`] with the
/// default limits and, if it passes, every span through [`adapt`].
///
/// The span walker is also held to prost, which it replaced on this path: [`validate`] accepts
/// a protobuf body exactly when prost decodes it whole and [`validate_decoded`] accepts that,
/// and every accepted span adapts the same read in place (fully walked, or only its top level
/// as the pipeline reads it) as decoded by prost.
pub fn otlp(data: &[u8]) {
    let config = OtlpReceiverConfig::default();
    let options = AdapterOptions::from(&config);
    let by_prost = ExportTraceServiceRequest::decode(data)
        .is_ok_and(|request| validate_decoded(&request, &config).is_ok());
    let accepted = match RawTraceRequest::decode(data) {
        Ok(request) => otlp_request(request, &config, &options),
        Err(_) => false,
    };
    assert_eq!(
        accepted, by_prost,
        "the receiver and prost disagree on whether this request is valid"
    );
    if let Ok(request) = serde_json::from_slice::<ExportTraceServiceRequest>(data) {
        otlp_request(RawTraceRequest::from(request), &config, &options);
    }
}

/// Validates and adapts a request as the receiver and the pipeline do; true when accepted.
fn otlp_request(
    mut request: RawTraceRequest,
    config: &OtlpReceiverConfig,
    options: &AdapterOptions,
) -> bool {
    if validate(&mut request, config).is_err() {
        return false;
    }
    for rs in &request.resource_spans {
        for bytes in rs.scope_spans.iter().flat_map(|ss| ss.spans.iter()) {
            let view = SpanView::parse(bytes, WireLimits::from(config));
            assert!(view.is_ok(), "a validated span does not read: {view:?}");
            let Ok(view) = view else { continue };
            let decoded = Span::decode(bytes.as_slice());
            assert!(decoded.is_ok(), "a validated span does not decode");
            let Ok(decoded) = decoded else { continue };
            let identity = instance(rs.resource.as_ref());
            let adapted = adapt(&view, &identity, options);
            assert_eq!(
                adapted,
                adapt_decoded(&decoded, rs.resource.as_ref(), options),
                "the span adapts differently read in place and decoded"
            );
            // The pipeline's read of a validated span (top level only) adapts the same.
            let top = SpanView::read_validated(bytes);
            assert!(top.is_some(), "a validated span's top level does not read");
            assert_eq!(
                top.and_then(|top| adapt(&top, &identity, options)),
                adapted,
                "the span adapts differently read by the pipeline"
            );
        }
    }
    true
}

/// Kernel path: the bytes as one ring-buffer record ([`event::decode`], then
/// [`EventConverter::convert`], which parses a request head), as a captured request head
/// ([`HeadParser::parse`]) and as a `traceparent` value ([`parse_traceparent`]).
pub fn kernel_head(data: &[u8]) {
    let config = KernelConfig::default();
    if let Ok(raw) = event::decode(data) {
        let converter = EventConverter::new(MonotonicToWall::with_offset(0), &config);
        let _ = converter.convert(&raw);
    }
    let parser = HeadParser::new(&config.tenant_header, &config.conversation_header);
    let _ = parser.parse(data);
    let _ = parse_traceparent(&String::from_utf8_lossy(data));
}

/// KV event path: the bytes as a msgpack payload ([`kvevents::decode_payload`]) and, when at
/// least 8 bytes long, as a whole `[topic, seq, payload]` message whose sequence frame is the
/// first 8 bytes ([`kvevents::decode_message`]).
pub fn kv_events(data: &[u8]) {
    let _ = kvevents::decode_payload(data, "fuzz");
    if let Some((seq, payload)) = data.split_at_checked(8) {
        let _ = kvevents::decode_message(&[b"kv-events", seq, payload], "fuzz");
    }
}

/// Separates the config text from the environment lines in a [`config`] input.
pub const CONFIG_ENV_SEPARATOR: u8 = 0;

/// Config path: the bytes up to the first NUL as the TOML file, the rest as `NAME=value`
/// environment lines, through [`AgentConfig::from_toml_str`] (what `resolve` does before the
/// flags); a config that loads is also serialised back to TOML.
pub fn config(data: &[u8]) {
    let (text, env) = match data.iter().position(|&b| b == CONFIG_ENV_SEPARATOR) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Ok(config) = AgentConfig::from_toml_str(text, Path::new("fuzz.toml"), env) {
        let _ = toml::to_string(&config);
    }
}

/// Realistic seed inputs for `target`, named: vLLM-shaped OTLP requests, request heads of real
/// clients wrapped in ring-buffer records, vLLM KV event batches and the shipped configs.
pub fn seeds(target: Target) -> Vec<(String, Vec<u8>)> {
    match target {
        Target::Otlp => otlp_seeds(),
        Target::KernelHead => kernel_seeds(),
        Target::KvEvents => kv_seeds(),
        Target::Config => config_seeds(),
    }
}

fn otlp_seeds() -> Vec<(String, Vec<u8>)> {
    use crate::sources::otlp::sample::vllm_request;
    let mut out = Vec::new();
    for (name, request) in [
        ("vllm-1", vllm_request(0, 1)),
        ("vllm-4", vllm_request(100, 4)),
    ] {
        out.push((format!("{name}.pb"), request.encode_to_vec()));
        if let Ok(json) = serde_json::to_vec(&request) {
            out.push((format!("{name}.json"), json));
        }
    }
    // SGLang, TGI and GenAI-convention spans: rename the vLLM span and keep its attributes.
    for (name, span_name) in [
        ("sglang", "Req 7f3a"),
        ("tgi", "generate_stream"),
        ("genai", "chat"),
    ] {
        let mut request = vllm_request(7, 1);
        for rs in &mut request.resource_spans {
            for ss in &mut rs.scope_spans {
                for span in &mut ss.spans {
                    span.name = span_name.into();
                }
            }
        }
        out.push((format!("{name}.pb"), request.encode_to_vec()));
    }
    out
}

/// A ring-buffer record: the common header then `body`.
fn record(ty: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + body.len());
    out.extend_from_slice(&(ty as u16).to_ne_bytes());
    out.extend_from_slice(&((24 + body.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes());
    out.extend_from_slice(&1_000_000_000u64.to_ne_bytes());
    out.extend_from_slice(&0xffff_8880_1234_5600u64.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

fn kernel_seeds() -> Vec<(String, Vec<u8>)> {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let heads: [(&str, String); 5] = [
        (
            "openai-python",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8000\r\n\
                 Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n\
                 Accept: application/json\r\nContent-Type: application/json\r\n\
                 User-Agent: OpenAI/Python 1.54.3\r\nX-Stainless-Lang: python\r\n\
                 X-Stainless-Package-Version: 1.54.3\r\nX-Stainless-Runtime: CPython\r\n\
                 Authorization: Bearer sk-test\r\nx-stainless-retry-count: 0\r\n\
                 x-request-id: req-0001\r\ntraceparent: {TP}\r\nx-tenant-id: acme\r\n\
                 x-conversation-id: conv-42\r\nContent-Length: 98\r\n\r\n\
                 {{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"model\":\"m\",\"stream\":true}}"
            ),
        ),
        (
            "curl",
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: curl/7.88.1\r\n\
             Accept: */*\r\nContent-Type: application/json\r\nContent-Length: 45\r\n\r\n\
             {\"model\":\"m\",\"prompt\":\"a\",\"max_tokens\":8}"
                .to_owned(),
        ),
        (
            "health",
            "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
        ),
        (
            "cut",
            "GET /v1/models?x=1 HTTP/1.1\r\nx-request-id: abc\r\nx-tenant-id: tru".to_owned(),
        ),
        ("traceparent", TP.to_owned()),
    ];
    let mut out = Vec::new();
    for (name, head) in &heads {
        out.push((format!("head-{name}"), head.as_bytes().to_vec()));
        let mut body = Vec::new();
        body.extend_from_slice(&7i32.to_ne_bytes());
        body.extend_from_slice(&(head.len() as u32).to_ne_bytes());
        body.extend_from_slice(&(head.len() as u64).to_ne_bytes());
        body.extend_from_slice(head.as_bytes());
        out.push((
            format!("record-head-{name}"),
            record(raw::IW_EVENT_REQUEST_HEAD, &body),
        ));
    }
    let mut listen = Vec::new();
    listen.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    listen.extend_from_slice(&8000u16.to_ne_bytes());
    listen.extend_from_slice(&[0; 4]);
    out.push((
        "record-listen".into(),
        record(raw::IW_EVENT_LISTEN, &listen),
    ));
    for (name, family) in [("v4", libc::AF_INET), ("v6", libc::AF_INET6)] {
        let mut accepted = Vec::new();
        accepted.extend_from_slice(&9i32.to_ne_bytes());
        accepted.extend_from_slice(&(family as u16).to_ne_bytes());
        accepted.extend_from_slice(&8000u16.to_ne_bytes());
        accepted.extend_from_slice(&51234u16.to_ne_bytes());
        accepted.extend_from_slice(&[0; 6]);
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[127, 0, 0, 1]);
        accepted.extend_from_slice(&local);
        accepted.extend_from_slice(&local);
        out.push((
            format!("record-accepted-{name}"),
            record(raw::IW_EVENT_ACCEPTED, &accepted),
        ));
    }
    let mut peer_closed = Vec::new();
    peer_closed.extend_from_slice(&raw::IW_CLOSE_RST.to_ne_bytes());
    peer_closed.extend_from_slice(&3u32.to_ne_bytes());
    out.push((
        "record-peer-closed".into(),
        record(raw::IW_EVENT_PEER_CLOSED, &peer_closed),
    ));
    let mut wapc = Vec::new();
    wapc.extend_from_slice(&9i32.to_ne_bytes());
    wapc.extend_from_slice(&32i32.to_ne_bytes());
    wapc.extend_from_slice(&0u64.to_ne_bytes());
    out.push((
        "record-write-after-peer-close".into(),
        record(raw::IW_EVENT_WRITE_AFTER_PEER_CLOSE, &wapc),
    ));
    let mut local_closed = Vec::new();
    local_closed.extend_from_slice(&9i32.to_ne_bytes());
    local_closed.extend_from_slice(&[0; 4]);
    out.push((
        "record-local-closed".into(),
        record(raw::IW_EVENT_LOCAL_CLOSED, &local_closed),
    ));
    out.push(("record-closed".into(), record(raw::IW_EVENT_CLOSED, &[])));
    out
}

fn kv_seeds() -> Vec<(String, Vec<u8>)> {
    use rmpv::Value;
    let ints = |h: &[u64]| Value::Array(h.iter().map(|x| Value::from(*x)).collect());
    let batch = |ts: f64, events: Vec<Value>, rank: Value| {
        let mut out = Vec::new();
        let value = Value::Array(vec![Value::F64(ts), Value::Array(events), rank]);
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, &value);
        out
    };
    let stored_int = Value::Array(vec![
        "BlockStored".into(),
        ints(&[0x1111, 0x2222]),
        Value::from(0x0fffu64),
        Value::Array(vec![Value::from(0u32); 32]),
        Value::from(16u64),
        Value::Nil,
        "GPU".into(),
    ]);
    // Newer vLLM: SHA-256 block hashes as bytes, trailing defaults omitted.
    let stored_bytes = Value::Array(vec![
        "BlockStored".into(),
        Value::Array(vec![
            Value::Binary(vec![0xab; 32]),
            Value::Binary(vec![0xcd; 32]),
        ]),
        Value::Nil,
        Value::Array(vec![Value::from(1u32); 16]),
        Value::from(16u64),
    ]);
    let removed = Value::Array(vec!["BlockRemoved".into(), ints(&[0x1111]), "GPU".into()]);
    let cleared = Value::Array(vec!["AllBlocksCleared".into()]);
    let mut out = vec![
        (
            "stored-int".into(),
            batch(1_760_000_000.25, vec![stored_int.clone()], Value::Nil),
        ),
        (
            "stored-bytes-dp1".into(),
            batch(1_760_000_001.5, vec![stored_bytes], Value::from(1u32)),
        ),
        (
            "mixed".into(),
            batch(
                1_760_000_002.0,
                vec![stored_int, removed, cleared],
                Value::Nil,
            ),
        ),
    ];
    // A whole message: the 8-byte big-endian sequence number, then the payload.
    let mut message = 41u64.to_be_bytes().to_vec();
    message.extend_from_slice(&out[0].1);
    out.push(("message-seq41".into(), message));
    out
}

fn config_seeds() -> Vec<(String, Vec<u8>)> {
    let shipped = include_str!("../../deploy/kubernetes/base/configmap.yaml");
    // The ConfigMap's `inferwatch.toml: |` block, de-indented.
    let toml: String = shipped
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("inferwatch.toml:"))
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let mut with_env = toml.clone().into_bytes();
    with_env.push(CONFIG_ENV_SEPARATOR);
    with_env.extend_from_slice(
        b"INFERWATCH_KERNEL__WATCH_PORTS=[8000,8001]\nINFERWATCH_OTLP__BEARER_TOKEN=s3cret\n\
          INFERWATCH_CORRELATOR__KV_EVICTION__HASH_TENANTS=true\n\
          INFERWATCH_EXPORT__ENDPOINT=http://collector:4317\n",
    );
    let defaults = toml::to_string(&AgentConfig::default()).unwrap_or_default();
    vec![
        ("configmap.toml".into(), toml.into_bytes()),
        ("configmap-env".into(), with_env),
        ("defaults.toml".into(), defaults.into_bytes()),
        (
            "small.toml".into(),
            b"[kernel]\nwatch_ports = [8000]\ntenant_header = \"x-org\"\n".to_vec(),
        ),
    ]
}
