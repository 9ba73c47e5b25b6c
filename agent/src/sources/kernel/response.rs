//! What the first bytes of a server's response that the kernel captured say: the response's own
//! id (SPEC §2, rule 3: an `x-request-id` response header, else the `"id"` of the first SSE
//! chunk or of the JSON body), and whether the send carried no token (a bare response head, or
//! an SSE chunk with no text, such as the role-only chunk an OpenAI-compatible server sends
//! first). Only these are kept; every other byte is dropped here.

/// Longest id kept (OpenAI-style ids are ~40 bytes; anything longer is not an id).
const MAX_ID_LEN: usize = 128;

/// Most response headers looked at.
const MAX_HEADERS: usize = 64;

/// What one captured send of a response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseSend {
    /// The response's own id, when the send held one.
    pub id: Option<String>,
    /// The send carried no output token: a response head with no body after it, or an SSE
    /// event without text (the role-only first chunk, a usage chunk, `[DONE]`). Sends it
    /// cannot judge (cut by the capture, not SSE) count as carrying one.
    pub tokenless: bool,
}

/// Reads the captured pieces of one send (see `iw_response_head_event`; `send_len` bytes in
/// all). The pieces are the start of what the send wrote: a status line and headers, a
/// chunk-size line, an SSE `data:` line or a JSON body, in any split.
pub fn read_send(pieces: &[&[u8]], send_len: u32) -> ResponseSend {
    let bytes: Vec<u8> = pieces.concat();
    let head = bytes.starts_with(b"HTTP/1.");
    let (header_id, body) = if head {
        let (id, body_at) = header_request_id(&bytes);
        (id, body_at.map(|at| &bytes[at..]))
    } else {
        (None, Some(&bytes[..]))
    };
    let body = body.map(skip_chunk_size);
    let tokenless = match body {
        // The head alone, when the capture holds the whole send.
        Some([]) => head && bytes.len() == send_len as usize,
        Some(body) => event_without_token(body),
        None => false,
    };
    ResponseSend {
        id: header_id.or_else(|| body.and_then(body_id)),
        tokenless,
    }
}

/// Whether a body starting with an SSE event is one without a token.
fn event_without_token(body: &[u8]) -> bool {
    let Some(data) = body.strip_prefix(b"data:") else {
        return false;
    };
    // The event's line must be all there to judge it.
    let Some(end) = data.iter().position(|b| *b == b'\n') else {
        return false;
    };
    let line = trim_start(&data[..end]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"[DONE]" {
        return true;
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    let Some(choices) = event.get("choices").and_then(|c| c.as_array()) else {
        return false;
    };
    let has_text = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    !choices.iter().any(|c| {
        let delta = c.get("delta");
        let text = c
            .get("text")
            .or_else(|| delta.and_then(|d| d.get("content")));
        let role = delta.and_then(|d| d.get("role")).is_some();
        has_text(text)
            || has_text(delta.and_then(|d| d.get("reasoning_content")))
            || delta
                .and_then(|d| d.get("tool_calls"))
                .is_some_and(|t| !t.is_null())
            // Empty text without a role is a token that decoded to nothing (vLLM sends
            // `<unk>` so); with the role it is the role-only first chunk.
            || (text.is_some_and(serde_json::Value::is_string) && !role)
    })
}

/// The `x-request-id` header of a response head, and where its body starts when the head is
/// complete. A head cut by the capture is read up to its last complete line.
fn header_request_id(bytes: &[u8]) -> (Option<String>, Option<usize>) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let body_at = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => Some(n),
        Ok(httparse::Status::Partial) => {
            // Cut capture: parse the complete lines only.
            let Some(end) = bytes.windows(2).rposition(|w| w == b"\r\n") else {
                return (None, None);
            };
            let mut cut = bytes[..end + 2].to_vec();
            cut.extend_from_slice(b"\r\n");
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            if resp.parse(&cut).is_err() {
                return (None, None);
            }
            return (find_header(resp.headers), None);
        }
        Err(_) => return (None, None),
    };
    (find_header(resp.headers), body_at)
}

fn find_header(headers: &[httparse::Header<'_>]) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("x-request-id"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
        .filter(|v| is_id(v))
        .map(str::to_owned)
}

/// Skips a chunked transfer-encoding size line (`1f4\r\n`) at the start of a body.
fn skip_chunk_size(body: &[u8]) -> &[u8] {
    let digits = body.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > 0 && digits <= 8 && body[digits..].starts_with(b"\r\n") {
        &body[digits + 2..]
    } else {
        body
    }
}

/// The first `"id": "<value>"` of a JSON object, after an optional SSE `data:` prefix: the
/// OpenAI-compatible chunk and body put it first.
fn body_id(body: &[u8]) -> Option<String> {
    let body = body.strip_prefix(b"data:").unwrap_or(body);
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    let key = body.windows(4).position(|w| w == b"\"id\"")?;
    let rest = &body[key + 4..];
    let rest = trim_start(rest).strip_prefix(b":")?;
    let rest = trim_start(rest).strip_prefix(b"\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    is_id(id).then(|| id.to_owned())
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let n = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &bytes[n..]
}

/// Ids are short and plain: no escapes, no spaces.
fn is_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_id(pieces: &[&[u8]]) -> Option<String> {
        let len = pieces.iter().map(|p| p.len() as u32).sum();
        read_send(pieces, len).id
    }

    fn carries_no_token(pieces: &[&[u8]], send_len: u32) -> bool {
        read_send(pieces, send_len).tokenless
    }

    #[test]
    fn ids_from_headers_sse_chunks_and_json_bodies() {
        // uvicorn: the head in one send, each chunk in the next.
        let head = b"HTTP/1.1 200 OK\r\ndate: x\r\nserver: uvicorn\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(response_id(&[head]), None);
        let chunk = b"8f\r\ndata: {\"id\":\"chatcmpl-abc123\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\r\n";
        assert_eq!(response_id(&[chunk]).as_deref(), Some("chatcmpl-abc123"));
        // nginx: writev of the chunk-size line and the data as separate pieces.
        assert_eq!(
            response_id(&[
                b"8f\r\n",
                b"data: {\"id\": \"chatcmpl-x\", \"object\": \"c\"}"
            ])
            .as_deref(),
            Some("chatcmpl-x")
        );
        // Head and first chunk in one send; an x-request-id header wins over the body.
        let both = b"HTTP/1.1 200 OK\r\nX-Request-Id: req-7\r\n\r\ndata: {\"id\":\"chatcmpl-7\"}";
        assert_eq!(response_id(&[both]).as_deref(), Some("req-7"));
        let no_header =
            b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\n{\"id\":\"cmpl-9\",\"object\":\"x\"}";
        assert_eq!(response_id(&[no_header]).as_deref(), Some("cmpl-9"));
        // A head cut by the capture still gives its complete header lines.
        let cut = b"HTTP/1.1 200 OK\r\nx-request-id: r1\r\ncontent-ty";
        assert_eq!(response_id(&[cut]).as_deref(), Some("r1"));
    }

    #[test]
    fn sends_without_a_token_are_told_from_token_chunks() {
        let len = |b: &[u8]| b.len() as u32;
        // uvicorn (vLLM, SGLang): the head alone, then vLLM's role-only first chunk.
        let head = b"HTTP/1.1 200 OK\r\ndate: x\r\nserver: uvicorn\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(carries_no_token(&[head], len(head)));
        let role = b"a5\r\ndata: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n\r\n";
        assert!(carries_no_token(&[role], len(role)));
        let token = b"9a\r\ndata: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" Hello\"}}]}\n\n\r\n";
        assert!(!carries_no_token(&[token], len(token)));
        let completion =
            b"data: {\"id\":\"cmpl-1\",\"choices\":[{\"index\":0,\"text\":\" Hi\"}]}\n\n";
        assert!(!carries_no_token(&[completion], len(completion)));
        // A token that decoded to nothing is still a token.
        let empty = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"}}]}\n\n";
        assert!(!carries_no_token(&[empty], len(empty)));
        let finish =
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        assert!(carries_no_token(&[finish], len(finish)));
        // The role and the first token in one chunk (TGI, some servers).
        let both =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\" Hi\"}}]}\n\n";
        assert!(!carries_no_token(&[both], len(both)));
        // hyper (TGI): the head and the first chunk in one send carry that chunk's token.
        let joined = [&head[..], &token[..]].concat();
        assert!(!carries_no_token(&[&joined], len(&joined)));
        // A usage chunk and the end of the stream carry none.
        let usage = b"data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n";
        assert!(carries_no_token(&[usage], len(usage)));
        assert!(carries_no_token(&[b"data: [DONE]\n\n"], 14));
        // What cannot be judged counts as a token: a head cut by the capture, a line cut by
        // it, a non-SSE body.
        assert!(!carries_no_token(&[head], len(head) + 200));
        assert!(!carries_no_token(&[&role[..40]], len(role)));
        assert!(!carries_no_token(&[b"{\"id\":\"cmpl-9\"}"], 15));
    }

    #[test]
    fn no_id_is_made_up() {
        for bytes in [
            &b""[..],
            b"data: [DONE]\n\n",
            b"{\"object\":\"x\"}",
            b"{\"id\": 5}",
            b"{\"id\":\"has space\"}",
            b"{\"id\":\"cut-off",
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
            b"\x00\x01\x02garbage",
        ] {
            assert_eq!(response_id(&[bytes]), None, "{bytes:?}");
        }
        let long = format!("{{\"id\":\"{}\"}}", "a".repeat(MAX_ID_LEN + 1));
        assert_eq!(response_id(&[long.as_bytes()]), None);
    }
}
