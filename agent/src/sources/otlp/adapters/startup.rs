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

/// The phase a start-up span name stands for, when it is one.
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

/// The start-up span `span` is, or `None` when it is not one.
pub fn recognise(span: &SpanView<'_>, process: &StartupProcess) -> Option<StartupSpan> {
    let phase = phase_of(span.name)?;
    let code_function = span
        .attributes()
        .find(|a| a.key == "code.function")
        .and_then(|a| str_of(&a.value).map(str::to_owned))?;
    let trace_id: [u8; 16] = span.trace_id.try_into().ok()?;
    let span_id: [u8; 8] = span.span_id.try_into().ok()?;
    let parent_span_id = <[u8; 8]>::try_from(span.parent_span_id)
        .ok()
        .filter(|p| p != &[0; 8]);
    Some(StartupSpan {
        runtime: RuntimeKind::Vllm,
        trace_id,
        span_id,
        parent_span_id,
        name: span.name.to_owned(),
        phase: phase.to_owned(),
        code_function: Some(code_function),
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
