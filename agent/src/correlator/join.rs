//! The join of contract §2: which rule tied a runtime span to a request read on a connection, and
//! what the connection showed.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::{CloseHow, ConnId, RuntimeRequest, TraceParent, UnixNanos};

/// The rule that joined a runtime span to a request head, in order of preference
/// (`inferwatch.join`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRule {
    /// The trace id of the `traceparent` header = the span's trace id.
    Traceparent,
    /// The `x-request-id` header = the runtime's request id (exactly or after a known prefix).
    RequestId,
    /// The response's own id (the first SSE chunk's or the JSON body's `"id"`, or an
    /// `x-request-id` response header, read by the kernel from the server's first response
    /// bytes) = the span's `gen_ai.request.id` / `gen_ai.response.id`.
    ResponseId,
    /// The span's `client.address` / `client.port` = the connection's peer.
    ClientAddr,
    /// The head read on the span's instance closest in time to the span's arrival, within
    /// the temporal window: a guess, and said so.
    Temporal,
    /// No exact rule matched and several heads fit the span by time as well as each other: no
    /// join is made (and no finding), rather than a guess.
    Ambiguous,
    /// Nothing matched (TLS inside the runtime, HTTP/2, an unwatched port, or a head lost to
    /// an eviction).
    Unjoined,
}

impl JoinRule {
    /// The value of `inferwatch.join`.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinRule::Traceparent => "traceparent",
            JoinRule::RequestId => "request_id",
            JoinRule::ResponseId => "response_id",
            JoinRule::ClientAddr => "client_addr",
            JoinRule::Temporal => "temporal",
            JoinRule::Ambiguous => "ambiguous",
            JoinRule::Unjoined => "unjoined",
        }
    }
}

/// A peer close seen by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerClose {
    /// When the peer's FIN or RST arrived.
    pub ts: UnixNanos,
    /// FIN or RST.
    pub how: CloseHow,
}

/// What the kernel saw of one request on its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionFacts {
    /// The connection.
    pub conn: ConnId,
    /// The server's address, when the accept was seen.
    pub local: Option<SocketAddr>,
    /// The client's address, when the accept was seen.
    pub peer: Option<SocketAddr>,
    /// The server process (from the accept or the read).
    pub pid: Option<u32>,
    /// When the request head was read.
    pub head_ts: UnixNanos,
    /// The request method.
    pub method: String,
    /// The request path.
    pub path: String,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// `traceparent`.
    pub traceparent: Option<TraceParent>,
    /// The tenant header.
    pub tenant: Option<String>,
    /// The conversation header.
    pub conversation: Option<String>,
    /// The first peer close while this request was the connection's current one.
    pub peer_closed: Option<PeerClose>,
    /// Writes after the peer left that look like token chunks.
    pub token_writes_after_close: u64,
}

/// A runtime span as it leaves the correlator: the request, the join rule, and what the
/// kernel saw of it. Emitted once per span received, when the span settles, so the exporter
/// can add `inferwatch.join` to the forwarded span.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinedRequest {
    /// The runtime's request, as received. Boxed: it is moved from the pending table to the
    /// exporter, and 392 bytes moved at every step (B-tree node shifts, output vectors) showed
    /// up as `memmove` in the profile.
    pub request: Box<RuntimeRequest>,
    /// The rule that joined it.
    pub join: JoinRule,
    /// The connection side; `None` when unjoined.
    pub connection: Option<ConnectionFacts>,
    /// `true` when the span settled early because the pending-span table was full.
    pub settled_early: bool,
    /// Through a watched gateway that did not propagate the client's trace (LiteLLM's proxy):
    /// the `traceparent` the client sent the gateway, when the runtime span is a root of
    /// another trace. The exporter moves the span into the client's trace under it (SPEC 2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_trace: Option<TraceParent>,
}

/// The header values a runtime request id can come from: itself and itself without each known
/// prefix (the keys of the request-id index).
pub(crate) fn request_id_keys<'a>(runtime_id: &'a str, prefixes: &'a [String]) -> Vec<&'a str> {
    let mut keys = vec![runtime_id];
    for p in prefixes {
        if let Some(rest) = runtime_id.strip_prefix(p.as_str())
            && !rest.is_empty()
            && !keys.contains(&rest)
        {
            keys.push(rest);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_keys_are_the_id_and_the_id_without_a_known_prefix() {
        let prefixes = vec!["chatcmpl-".to_string(), "cmpl-".to_string()];
        assert_eq!(request_id_keys("abc", &prefixes), vec!["abc"]);
        assert_eq!(
            request_id_keys("cmpl-abc", &prefixes),
            vec!["cmpl-abc", "abc"]
        );
        assert_eq!(
            request_id_keys("chatcmpl-abc", &prefixes),
            vec!["chatcmpl-abc", "abc"]
        );
        assert_eq!(request_id_keys("xcmpl-abc", &prefixes), vec!["xcmpl-abc"]);
        assert_eq!(request_id_keys("cmpl-", &prefixes), vec!["cmpl-"]);
    }
}
