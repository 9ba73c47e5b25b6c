//! Which runtime the testbed plays: the span shapes, ids and headers of vLLM, SGLang or TGI.
//!
//! Each flavor changes only what that runtime puts on the wire (span names, ids, resource,
//! attributes; the response `id`; response headers). The disconnect policy stays its own
//! setting (`disconnect_policy`): SGLang's is `delayed:2000` by design, and `never` plays the
//! variant that decodes to `max_tokens`; TGI's is `immediate` (dropping the response stream
//! cancels the request).

use serde::{Deserialize, Serialize};

/// The runtime whose wire shapes the testbed produces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// vLLM 0.32: one `llm_request` span per request (see [`crate::otel`]).
    #[default]
    Vllm,
    /// SGLang: a `" Req <rid8>"` root with thread and stage spans, 64-bit trace ids
    /// (see [`crate::shapes::sglang`]).
    Sglang,
    /// TGI: the axum layer's SERVER span and the handler span with `Duration` debug strings
    /// (see [`crate::shapes::tgi`]).
    Tgi,
}

impl Flavor {
    /// The resource's `service.name`, as each runtime sets it by default (the testbed's vLLM
    /// has always named itself `vllm`).
    pub fn service_name(self) -> &'static str {
        match self {
            Flavor::Vllm => "vllm",
            Flavor::Sglang => "sglang",
            Flavor::Tgi => "text-generation-inference.router",
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Vllm => "vllm",
            Flavor::Sglang => "sglang",
            Flavor::Tgi => "tgi",
        }
    }
}
