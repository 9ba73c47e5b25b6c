//! Parsing of the request bytes the kernel captured: the request line and the allow-listed
//! headers only. Every other header, and the body, is dropped here and never stored.

use crate::model::{RequestHead, TraceParent};

/// Most headers a request head may carry for us to look at; more are ignored (the request is
/// still reported, with what was found before the limit).
const MAX_HEADERS: usize = 64;

/// Longest header value kept (ids and tenant names are short; anything longer is not an id).
const MAX_VALUE_LEN: usize = 256;

/// Parses request heads with the configured tenant and conversation header names.
#[derive(Debug, Clone)]
pub struct HeadParser {
    tenant_header: String,
    conversation_header: String,
}

impl HeadParser {
    /// A parser that reads `tenant_header` and `conversation_header` (case-insensitive) in
    /// addition to `x-request-id` and `traceparent`.
    pub fn new(tenant_header: &str, conversation_header: &str) -> Self {
        Self {
            tenant_header: tenant_header.to_ascii_lowercase(),
            conversation_header: conversation_header.to_ascii_lowercase(),
        }
    }

    /// Parses the first bytes of an HTTP/1.x request. The capture may end mid-header (the kernel
    /// copies a bounded prefix): the complete header lines are used and the cut one is dropped.
    /// Returns `None` when the bytes are not an HTTP/1.x request.
    pub fn parse(&self, bytes: &[u8]) -> Option<RequestHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(bytes) {
            Ok(httparse::Status::Complete(body_start)) => {
                let mut head = self.extract(&req)?;
                head.model = bytes.get(body_start..).and_then(body_model);
                return Some(head);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return None,
        }
        // Cut capture: keep the complete lines and end the head there.
        let end = last_line_end(bytes)?;
        let mut cut = bytes[..end].to_vec();
        cut.extend_from_slice(b"\r\n");
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&cut) {
            Ok(httparse::Status::Complete(_)) => self.extract(&req),
            _ => None,
        }
    }

    fn extract(&self, req: &httparse::Request<'_, '_>) -> Option<RequestHead> {
        let method = req.method?.to_owned();
        let target = req.path?;
        let path = target.split('?').next().unwrap_or(target).to_owned();
        let mut head = RequestHead {
            method,
            path,
            ..RequestHead::default()
        };
        // The name is matched before the value is read: only allow-listed values are copied
        // (a head carries a handful of other headers, each an allocation for nothing).
        for h in req.headers.iter() {
            let slot = if h.name.eq_ignore_ascii_case("x-request-id") {
                &mut head.request_id
            } else if h.name.eq_ignore_ascii_case("traceparent") {
                if let Some(value) = header_value(h.value) {
                    head.traceparent = parse_traceparent(value);
                }
                continue;
            } else if h.name.eq_ignore_ascii_case(&self.tenant_header) {
                &mut head.tenant
            } else if h.name.eq_ignore_ascii_case(&self.conversation_header) {
                &mut head.conversation
            } else {
                continue;
            };
            if let Some(value) = header_value(h.value) {
                *slot = Some(value.to_owned());
            }
        }
        Some(head)
    }
}

/// Longest model name kept from a body.
const MAX_MODEL_LEN: usize = 128;

/// The top-level `"model"` string of a JSON object body, read from a prefix of it (the kernel
/// captures a bounded prefix, so the body is usually cut). Strings are skipped whole, so a
/// `"model"` inside a message or a nested object is never taken; only the value's characters
/// are copied, and only when it is a short plain string (no escapes).
fn body_model(body: &[u8]) -> Option<String> {
    let mut depth = 0u32;
    let mut i = 0;
    // Whether the last string closed at depth 1 in key position was `"model"`.
    let mut key_is_model = false;
    let mut expect_key = false;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && body[i] == b'{';
                key_is_model = false;
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' => {
                expect_key = depth == 1;
                key_is_model = false;
            }
            b':' => expect_key = false,
            b'"' => {
                let start = i + 1;
                let end = string_end(body, start)?;
                let text = &body[start..end];
                if depth == 1 && expect_key {
                    key_is_model = text == b"model";
                } else if depth == 1 && key_is_model {
                    let value = std::str::from_utf8(text).ok()?;
                    return (!value.is_empty()
                        && value.len() <= MAX_MODEL_LEN
                        && !value.contains('\\'))
                    .then(|| value.to_owned());
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Index of the quote closing the JSON string whose text starts at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// End of the last complete header line (just after its `\r\n`), past the request line.
fn last_line_end(bytes: &[u8]) -> Option<usize> {
    let first = bytes.windows(2).position(|w| w == b"\r\n")? + 2;
    let last = bytes.windows(2).rposition(|w| w == b"\r\n")? + 2;
    (last >= first).then_some(last)
}

fn header_value(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    (!s.is_empty() && s.len() <= MAX_VALUE_LEN).then_some(s)
}

/// Parses a W3C trace-context `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`). All-zero ids are
/// invalid per the spec.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || parent.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut parent_id = [0u8; 8];
    let mut flag = [0u8; 1];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    hex::decode_to_slice(flags, &mut flag).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags: flag[0],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> HeadParser {
        HeadParser::new("X-Tenant-Id", "x-conversation-id")
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_top_level_model_of_the_body() {
        let parse = |body: &str| {
            let bytes = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            parser().parse(bytes.as_bytes()).expect("head").model
        };
        assert_eq!(
            parse(r#"{"model":"m","stream":true}"#).as_deref(),
            Some("m")
        );
        // The OpenAI client writes the messages first; a "model" inside them is not the model.
        assert_eq!(
            parse(r#"{"messages":[{"role":"user","content":"the \"model\": x","model":"no"}], "model" : "llama-3", "n":1}"#)
                .as_deref(),
            Some("llama-3")
        );
        assert_eq!(parse(r#"{"tools":{"model":"nested"},"stream":true}"#), None);
        // Cut before the value ends, not a string, or no body at all: nothing.
        assert_eq!(parse(r#"{"messages":[],"model":"lla"#), None);
        assert_eq!(parse(r#"{"model":7}"#), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse(r#"["model","m"]"#), None);
    }

    #[test]
    fn keeps_only_allow_listed_headers() {
        let req = format!(
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-secret\r\n\
             X-Request-Id: req-1\r\ntraceparent: {TP}\r\nx-tenant-id: acme\r\n\
             X-Conversation-Id: conv-9\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let head = parser().parse(req.as_bytes()).expect("parses");
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/chat/completions");
        assert_eq!(head.request_id.as_deref(), Some("req-1"));
        assert_eq!(head.tenant.as_deref(), Some("acme"));
        assert_eq!(head.conversation.as_deref(), Some("conv-9"));
        let tp = head.traceparent.expect("traceparent");
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.parent_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        // Nothing else survives: the debug form holds no secret.
        assert!(!format!("{head:?}").contains("sk-secret"));
    }

    #[test]
    fn truncated_capture_keeps_complete_lines() {
        let req = b"GET /health HTTP/1.1\r\nx-request-id: abc\r\nx-tenant-id: tru";
        let head = parser().parse(req).expect("parses");
        assert_eq!(head.request_id.as_deref(), Some("abc"));
        assert_eq!(head.tenant, None, "a cut header is dropped, not guessed");
    }

    #[test]
    fn rejects_what_is_not_a_request() {
        assert_eq!(parser().parse(b"{\"model\": \"x\"}"), None);
        assert_eq!(parser().parse(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(parser().parse(b""), None);
        assert_eq!(parser().parse(&[0xff, 0xfe, 0x00]), None);
    }

    #[test]
    fn rejects_body_reads_that_start_like_a_method() {
        // The kernel tests every read of a watched connection by its first four bytes, so a
        // body read on its own can arrive here; only a whole request line passes.
        for body in [
            &b"POST the rest of the prompt, which\nwent on\r\nfor lines"[..],
            b"GET the weather for Paris\r\n\r\n",
            b"PUT it back HTTP/2\r\n\r\n",
            b"DELETE",
            b"OPTIONS  \r\n",
        ] {
            assert_eq!(
                parser().parse(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn traceparent_validation() {
        assert!(parse_traceparent(TP).is_some());
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
