//! Runtimes' start-up spans: their own account of a cold start (contract §1.2, §3.2).
//!
//! vLLM 0.32 exports, once per start and all in one trace, spans named after its start-up
//! steps, each with `code.function` / `code.namespace` / `code.filepath` / `code.lineno`:
//! `Overall Loading` (the API server, the root, `EngineCoreClient.make_async_mp_client`) >
//! `AsyncMPClient init`; `EngineCoreProc init` (the engine core) > `Executor init` >
//! `Worker init` > `Loading (CPU|CUDA)` > `Load model` > `Initialize model`, `Load weights`;
//! `Prepare model` (`EngineCore._initialize_kv_caches`) > `Warmup (CPU|CUDA)` (a worker),
//! `Allocate KV cache`. The resource names the emitting process: `vllm.process_id` (its pid)
//! and `vllm.process_kind` (`engine_core`, `worker`; absent for the API server).
//!
//! A span is recognised by its name together with a `code.function` attribute, so that an
//! application's own span that happens to be called `Load model` is not taken for vLLM's.
//!
//! TGI (read from its source, 3.3.6-dev0, January 2026; `--otlp-endpoint`): the router
//! (`text-generation-router`, started by the launcher once every shard has loaded its weights)
//! calls the shards before it listens (`backends/v3/src/lib.rs`, `connect_backend`) through
//! `#[instrument]`ed methods, each call the root of its own trace: `service_discovery` (the
//! master shard's `Client`), then `clear_cache`, `info` and `warmup` (its `ShardedClient`,
//! each over one per-shard `Client` span of the same name). `tracing-opentelemetry` 0.21 names a span after the function and adds
//! `code.namespace` (the module path: `text_generation_router_v3::client::sharded_client`;
//! `text_generation_client::sharded_client` before 2.1), `code.filepath`, `code.lineno`,
//! `thread.id`, `thread.name`, and at its end `busy_ns` / `idle_ns`; `target` and `level` go
//! on events only. The shard (Python) answers over gRPC on a unix socket, and its server
//! interceptor (`server/text_generation_server/tracing.py`) makes a SERVER span per call,
//! parented on the router's (its context is injected): `/generate.v3.TextGenerationService/
//! Warmup` with `rpc.system = grpc`, `rpc.service`, `rpc.method = Warmup`,
//! `net.transport = unix`. Both resources carry only `service.name` (the launcher passes its
//! `--otlp-service-name`, `text-generation-inference.router`, to the router and the shards
//! alike): no pid. Weight loading happens before the shard's gRPC server starts and has no
//! span. The router's `warmup` (the critical path over all shards) and the shard's `Warmup`
//! are recognised: by name with the router crate's `code.namespace`, and by name with the
//! gRPC attributes that TGI's interceptor sets.
//!
//! SGLang exports no start-up span: every span it makes belongs to a request (or to a HiCache
//! operation); its start-up phase durations go to Prometheus only.

use opentelemetry_proto::tonic::resource::v1::Resource;

use super::{scalar_view, str_of, u64_of};
use crate::model::{RuntimeKind, StartupSpan};
use crate::otlp_wire::read::SpanView;

/// vLLM's start-up span names and the phase each stands for.
pub const VLLM_STARTUP_SPANS: &[(&str, &str)] = &[
    ("Overall Loading", "overall_loading"),
    ("AsyncMPClient init", "async_mp_client_init"),
    ("EngineCoreProc init", "engine_core_init"),
    ("Executor init", "executor_init"),
    ("Worker init", "worker_init"),
    ("Load model", "load_model"),
    ("Initialize model", "initialize_model"),
    ("Load weights", "load_weights"),
    ("Prepare model", "prepare_model"),
    ("Allocate KV cache", "allocate_kv_cache"),
];

/// vLLM's start-up span names that end with the device in parentheses (`Warmup (CPU)`,
/// `Warmup (CUDA)`, `Loading (CPU)`), and the phase each stands for.
pub const VLLM_STARTUP_PREFIXES: &[(&str, &str)] =
    &[("Warmup (", "warmup"), ("Loading (", "loading")];

/// The process facts of a resource that start-up spans need: `vllm.process_id` (else
/// `process.pid`) and `vllm.process_kind`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupProcess {
    /// The emitting process's pid.
    pub pid: Option<u32>,
    /// `vllm.process_kind`.
    pub kind: Option<String>,
}

/// Reads [`StartupProcess`] from a resource (once per resource, not per span).
pub fn process(resource: Option<&Resource>) -> StartupProcess {
    let mut vllm_pid = None;
    let mut process_pid = None;
    let mut kind = None;
    for kv in resource
        .map(|r| r.attributes.as_slice())
        .unwrap_or_default()
    {
        let Some(value) = kv.value.as_ref().and_then(|v| v.value.as_ref()) else {
            continue;
        };
        let value = scalar_view(value);
        match kv.key.as_str() {
            "vllm.process_id" => vllm_pid = u64_of(&value).and_then(|p| u32::try_from(p).ok()),
            "process.pid" => process_pid = u64_of(&value).and_then(|p| u32::try_from(p).ok()),
            "vllm.process_kind" => kind = str_of(&value).map(str::to_owned),
            _ => {}
        }
    }
    StartupProcess {
        pid: vllm_pid.or(process_pid),
        kind,
    }
}

/// TGI's router: its `ShardedClient::warmup` span, and the phase it stands for.
pub const TGI_ROUTER_WARMUP: (&str, &str) = ("warmup", "warmup");

/// TGI's shard: its gRPC server span for the `Warmup` call (`/generate.v3.TextGenerationService/
/// Warmup`, `v2` in older versions), and the phase it stands for.
pub const TGI_SHARD_WARMUP: (&str, &str) = ("Warmup", "shard_warmup");

/// The phase a vLLM start-up span name stands for, when it is one.
pub fn phase_of(name: &str) -> Option<&'static str> {
    VLLM_STARTUP_SPANS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, phase)| *phase)
        .or_else(|| {
            VLLM_STARTUP_PREFIXES
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix) && name.ends_with(')'))
                .map(|(_, phase)| *phase)
        })
}

/// The phase of a TGI start-up span, when `span` is one (see the module's documentation).
fn tgi_phase(span: &SpanView<'_>) -> Option<&'static str> {
    let attribute = |key: &str| {
        span.attributes()
            .find(|a| a.key == key)
            .and_then(|a| str_of(&a.value))
    };
    if span.name == TGI_ROUTER_WARMUP.0 {
        // The router's `ShardedClient`, whatever the crate's name in this version: an
        // application's `warmup` has its own module path.
        let namespace = attribute("code.namespace")?;
        return (namespace.starts_with("text_generation_")
            && namespace.ends_with("::sharded_client"))
        .then_some(TGI_ROUTER_WARMUP.1);
    }
    let (service, method) = span.name.strip_prefix('/')?.split_once('/')?;
    let tgi_service =
        service.starts_with("generate.v") && service.ends_with(".TextGenerationService");
    // Only TGI's own interceptor names the transport `unix` next to the call: a gRPC client
    // of TGI's protocol instrumented by OpenTelemetry has the same name but a peer address.
    let from_interceptor = attribute("rpc.system") == Some("grpc")
        && attribute("rpc.service") == Some(service)
        && attribute("rpc.method") == Some(method)
        && attribute("net.transport") == Some("unix");
    (tgi_service && method == TGI_SHARD_WARMUP.0 && from_interceptor).then_some(TGI_SHARD_WARMUP.1)
}

/// The start-up span `span` is, or `None` when it is not one.
pub fn recognise(span: &SpanView<'_>, process: &StartupProcess) -> Option<StartupSpan> {
    let vllm = phase_of(span.name).and_then(|phase| {
        let code_function = span
            .attributes()
            .find(|a| a.key == "code.function")
            .and_then(|a| str_of(&a.value).map(str::to_owned))?;
        Some((RuntimeKind::Vllm, phase, Some(code_function)))
    });
    let (runtime, phase, code_function) =
        vllm.or_else(|| tgi_phase(span).map(|phase| (RuntimeKind::Tgi, phase, None)))?;
    let trace_id: [u8; 16] = span.trace_id.try_into().ok()?;
    let span_id: [u8; 8] = span.span_id.try_into().ok()?;
    let parent_span_id = <[u8; 8]>::try_from(span.parent_span_id)
        .ok()
        .filter(|p| p != &[0; 8]);
    Some(StartupSpan {
        runtime,
        trace_id,
        span_id,
        parent_span_id,
        name: span.name.to_owned(),
        phase: phase.to_owned(),
        code_function,
        start: span.start_time_unix_nano,
        end: span.end_time_unix_nano.max(span.start_time_unix_nano),
        process_pid: process.pid,
        process_kind: process.kind.clone(),
    })
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;

    use super::*;
    use crate::otlp_wire::batch::{kv_i64, kv_str};
    use crate::otlp_wire::read::WireLimits;
    use crate::sources::otlp::adapters::{AdapterOptions, adapt_decoded, instance};

    fn span(name: &str, parent: Vec<u8>, attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: parent,
            name: name.into(),
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 26_000,
            attributes,
            ..Default::default()
        }
    }

    fn resource(attributes: Vec<KeyValue>) -> Resource {
        Resource {
            attributes,
            ..Default::default()
        }
    }

    fn recognised(s: &Span, r: &Resource) -> Option<StartupSpan> {
        let bytes = s.encode_to_vec();
        let view = SpanView::parse(&bytes, WireLimits::unlimited()).ok()?;
        recognise(&view, &process(Some(r)))
    }

    #[test]
    fn vllm_start_up_spans_are_recognised_with_their_process() {
        let code = || kv_str("code.function", "Worker.compile_or_warm_up_model");
        let worker = resource(vec![
            kv_i64("vllm.process_id", 4242),
            kv_str("vllm.process_kind", "worker"),
            kv_str("service.instance.id", "random"),
        ]);
        let s = recognised(&span("Warmup (CPU)", vec![3; 8], vec![code()]), &worker)
            .expect("Warmup (CPU) is a start-up span");
        assert_eq!(s.phase, "warmup");
        assert_eq!(s.name, "Warmup (CPU)");
        assert_eq!(s.process_pid, Some(4242));
        assert_eq!(s.process_kind.as_deref(), Some("worker"));
        assert_eq!(s.parent_span_id, Some([3; 8]));
        assert_eq!((s.start, s.end), (1_000, 26_000));
        let api = resource(vec![kv_i64("vllm.process_id", 4000)]);
        let root =
            recognised(&span("Overall Loading", Vec::new(), vec![code()]), &api).expect("the root");
        assert_eq!(root.phase, "overall_loading");
        assert_eq!(root.parent_span_id, None);
        assert_eq!(root.process_kind, None);
        for (name, phase) in VLLM_STARTUP_SPANS {
            let s = recognised(&span(name, vec![3; 8], vec![code()]), &api).expect(name);
            assert_eq!(&s.phase, phase);
        }
    }

    #[test]
    fn a_span_named_like_one_without_code_function_is_not_one() {
        let api = resource(vec![kv_i64("vllm.process_id", 4000)]);
        assert!(recognised(&span("Load model", vec![3; 8], Vec::new()), &api).is_none());
        let code = vec![kv_str("code.function", "f")];
        assert!(recognised(&span("Warmup", vec![3; 8], code.clone()), &api).is_none());
        assert!(recognised(&span("llm_request", vec![3; 8], code), &api).is_none());
    }

    /// TGI 3.3.6's router span for `ShardedClient::warmup` (`backends/v3/src/client/
    /// sharded_client.rs`, `#[instrument(skip(self))]`) as `tracing-opentelemetry` 0.21 makes
    /// it: named after the function, the location and thread attributes, the arguments as
    /// fields, `busy_ns` / `idle_ns` at its end; the resource names the service only.
    fn tgi_router_warmup(namespace: &str) -> Span {
        span(
            "warmup",
            Vec::new(),
            vec![
                kv_str("code.filepath", "backends/v3/src/client/sharded_client.rs"),
                kv_str("code.namespace", namespace),
                kv_i64("code.lineno", 102),
                kv_i64("thread.id", 3),
                kv_str("thread.name", "tokio-runtime-worker"),
                kv_str("max_input_length", "None"),
                kv_i64("max_prefill_tokens", 4096),
                kv_str("max_total_tokens", "None"),
                kv_str("max_batch_size", "None"),
                kv_i64("busy_ns", 2_100_000),
                kv_i64("idle_ns", 21_000_000_000),
            ],
        )
    }

    /// TGI's shard span for the `Warmup` call, as its `UDSOpenTelemetryAioServerInterceptor`
    /// (`server/text_generation_server/tracing.py`) makes it, parented on the router's
    /// per-shard `warmup` span through the injected context.
    fn tgi_shard_warmup(transport: KeyValue) -> Span {
        span(
            "/generate.v3.TextGenerationService/Warmup",
            vec![4; 8],
            vec![
                kv_str("rpc.system", "grpc"),
                kv_i64("rpc.grpc.status_code", 0),
                kv_str("rpc.method", "Warmup"),
                kv_str("rpc.service", "generate.v3.TextGenerationService"),
                kv_str("rpc.user_agent", "tonic/0.10.2"),
                transport,
            ],
        )
    }

    #[test]
    fn tgi_start_up_spans_are_recognised_without_a_pid() {
        let router = resource(vec![kv_str(
            "service.name",
            "text-generation-inference.router",
        )]);
        let s = recognised(
            &tgi_router_warmup("text_generation_router_v3::client::sharded_client"),
            &router,
        )
        .expect("the router's warmup is a start-up span");
        assert_eq!((s.runtime, s.phase.as_str()), (RuntimeKind::Tgi, "warmup"));
        assert_eq!(s.name, "warmup");
        assert_eq!((s.parent_span_id, s.process_pid), (None, None));
        assert_eq!(s.code_function, None);
        // Before TGI 2.1 the client was its own crate.
        let old = recognised(
            &tgi_router_warmup("text_generation_client::sharded_client"),
            &router,
        )
        .expect("an older router's warmup");
        assert_eq!(old.phase, "warmup");
        let shard = recognised(&tgi_shard_warmup(kv_str("net.transport", "unix")), &router)
            .expect("the shard's Warmup is a start-up span");
        assert_eq!(
            (shard.runtime, shard.phase.as_str()),
            (RuntimeKind::Tgi, "shard_warmup")
        );
        assert_eq!(shard.parent_span_id, Some([4; 8]));
    }

    #[test]
    fn spans_named_like_tgi_start_up_spans_are_not_taken() {
        let app = resource(vec![kv_str("service.name", "my-app")]);
        // An application's own `warmup`: another module, or no location at all.
        assert!(recognised(&tgi_router_warmup("my_app::model"), &app).is_none());
        assert!(recognised(&span("warmup", Vec::new(), Vec::new()), &app).is_none());
        // The router's per-shard client span is nested in the sharded one: not a phase.
        let per_shard = tgi_router_warmup("text_generation_router_v3::client::grpc_client");
        assert!(recognised(&per_shard, &app).is_none());
        // A gRPC client of TGI's protocol, instrumented by OpenTelemetry: a peer, no `unix`.
        let client = tgi_shard_warmup(kv_str("net.peer.name", "tgi.internal"));
        assert!(recognised(&client, &app).is_none());
        // Another call of the shard is not the warmup.
        let mut info = tgi_shard_warmup(kv_str("net.transport", "unix"));
        info.name = "/generate.v3.TextGenerationService/Info".into();
        assert!(recognised(&info, &app).is_none());
    }

    /// SGLang's spans (`python/sglang/srt/observability/trace.py`) all belong to a request:
    /// its root `" Req <rid[:8]>"`, a thread span and stage slices. None is a start-up span.
    #[test]
    fn sglang_request_spans_are_not_start_up_spans() {
        let sglang = resource(vec![kv_str("service.name", "sglang")]);
        for name in [
            " Req 0123abcd",
            "Scheduler [TP 0] (host:abcdef01 | pid:77)",
            "tokenize",
        ] {
            let s = span(name, Vec::new(), vec![kv_str("rid", "0123abcd")]);
            assert!(recognised(&s, &sglang).is_none(), "{name}");
        }
    }

    #[test]
    fn start_up_spans_are_not_requests() {
        let api = resource(vec![kv_i64("vllm.process_id", 4000)]);
        let s = span(
            "Overall Loading",
            Vec::new(),
            vec![kv_str("code.function", "f")],
        );
        assert!(adapt_decoded(&s, Some(&api), &AdapterOptions::default()).is_none());
    }

    #[test]
    fn vllm_process_id_is_the_instance_pid_of_the_api_server_only() {
        let api = resource(vec![kv_i64("vllm.process_id", 4000)]);
        assert_eq!(instance(Some(&api)).pid, Some(4000));
        let engine = resource(vec![
            kv_i64("vllm.process_id", 4001),
            kv_str("vllm.process_kind", "engine_core"),
        ]);
        assert_eq!(instance(Some(&engine)).pid, None);
        let both = resource(vec![
            kv_i64("vllm.process_id", 4000),
            kv_i64("process.pid", 9),
        ]);
        assert_eq!(instance(Some(&both)).pid, Some(9));
    }
}
