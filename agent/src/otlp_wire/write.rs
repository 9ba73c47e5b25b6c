//! Protobuf writing of spans and of the levels above them, byte for byte what `prost`'s
//! `encode_to_vec` writes, at about half the cost; the request-level writer of a batch
//! (`crate::sinks::otlp`'s `encode_batch`) and [`super::batch::EncodedSpan`] are built on it,
//! and the span reader's rewriting ([`super::read::rewrite_str_attributes`]) uses its
//! length-prefix helpers.
//!
//! prost writes a nested message as key, length, body, and gets the length by walking the
//! message (`encoded_len`); the body's own nested messages are then walked again for theirs.
//! For `request -> ResourceSpans -> ScopeSpans -> Span -> KeyValue -> AnyValue` every attribute
//! is walked once per level above it, six times in all, before it is written. Here each span's
//! length is computed once, kept, and used both for the totals of the levels above and for the
//! span's own length prefix, and each attribute value's length once more while the span is
//! written (prost: twice). The (few) resources and scopes, and span events, links and status,
//! still go through prost.
//!
//! The structs are destructured without `..`, so that a field added to the generated types
//! fails to compile here instead of being dropped silently.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use prost::encoding::{
    WireType, bytes, encoded_len_varint, fixed32, fixed64, int32, key_len, message, uint32,
};

// Field numbers (opentelemetry/proto/trace/v1/trace.proto, collector/trace/v1/trace_service.proto).
pub(crate) const REQUEST_RESOURCE_SPANS: u32 = 1;
pub(crate) const RS_RESOURCE: u32 = 1;
pub(crate) const RS_SCOPE_SPANS: u32 = 2;
pub(crate) const RS_SCHEMA_URL: u32 = 3;
pub(crate) const SS_SCOPE: u32 = 1;
pub(crate) const SS_SPANS: u32 = 2;
pub(crate) const SS_SCHEMA_URL: u32 = 3;

/// A span's encoding (`span.encode_to_vec()`), for holding it as bytes.
pub fn encode_span(span: &Span) -> Vec<u8> {
    let mut buf = Vec::with_capacity(span.encoded_len() + APPEND_ROOM);
    write_span(span, &mut buf);
    buf
}

/// Room left at the end of an encoded span for the attributes the join appends
/// (`inferwatch.join`, `inferwatch.start`, the GPU), so that appending rarely reallocates.
const APPEND_ROOM: usize = 96;

/// Appends one attribute to an encoded span (field 9, repeated: decoders append it to the
/// attributes already read).
pub fn append_attribute(kv: KeyValue, span: &mut Vec<u8>) {
    write_key_value(9, &kv, span);
}

/// Appends a string attribute to an encoded span, the same bytes as [`append_attribute`] with
/// [`super::batch::kv_str`], without building the message (two allocations per
/// attribute on the per-request path).
pub fn append_str_attribute(key: &str, value: &str, span: &mut Vec<u8>) {
    // AnyValue { string_value = 1 }: a oneof member is written even when empty.
    let any_len = field_len(1, value.len());
    put_len_key(9, string_len(1, key) + field_len(2, any_len), span);
    write_string(1, key, span);
    put_len_key(2, any_len, span);
    put_len_key(1, value.len(), span);
    span.extend_from_slice(value.as_bytes());
}

/// Appends a `trace_id` (field 1) and a `parent_span_id` (field 4) to an encoded span: for
/// singular fields the last value read wins, so the span moves into that trace under that
/// parent without being decoded.
pub fn append_trace_and_parent(trace_id: &[u8; 16], parent_span_id: &[u8; 8], span: &mut Vec<u8>) {
    put_len_key(1, trace_id.len(), span);
    span.extend_from_slice(trace_id);
    put_len_key(4, parent_span_id.len(), span);
    span.extend_from_slice(parent_span_id);
}

/// The key and length prefix of a length-delimited field, as prost's `encode_key` +
/// `encode_varint` write them; the loop form keeps the common one-byte case to a compare and a
/// push into the (pre-sized) buffer, where prost's generic `BufMut` path costs several times
/// that, and these two varints are most of what the encoder writes itself.
/// The key and length of a length-delimited field.
pub(crate) fn put_len_key(tag: u32, len: usize, buf: &mut Vec<u8>) {
    put_varint(u64::from(tag << 3 | WireType::LengthDelimited as u32), buf);
    put_varint(len as u64, buf);
}

fn put_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Key + length prefix + body of a length-delimited field.
/// The encoded size of a length-delimited field whose body is `len` bytes.
pub(crate) fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A proto3 string field: absent when empty.
pub(crate) fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(tag, s.len())
    }
}

pub(crate) fn resource_spans_len(rs: &ResourceSpans, lens: &mut Vec<usize>) -> usize {
    let ResourceSpans {
        resource,
        scope_spans,
        schema_url,
    } = rs;
    let slot = lens.len();
    lens.push(0);
    let mut len = resource
        .as_ref()
        .map_or(0, |r| message::encoded_len(RS_RESOURCE, r));
    for ss in scope_spans {
        len += field_len(RS_SCOPE_SPANS, scope_spans_len(ss, lens));
    }
    len += string_len(RS_SCHEMA_URL, schema_url);
    lens[slot] = len;
    len
}

fn scope_spans_len(ss: &ScopeSpans, lens: &mut Vec<usize>) -> usize {
    let ScopeSpans {
        scope,
        spans,
        schema_url,
    } = ss;
    let slot = lens.len();
    lens.push(0);
    let mut len = scope
        .as_ref()
        .map_or(0, |s| message::encoded_len(SS_SCOPE, s));
    for span in spans {
        let n = span.encoded_len();
        lens.push(n);
        len += field_len(SS_SPANS, n);
    }
    len += string_len(SS_SCHEMA_URL, schema_url);
    lens[slot] = len;
    len
}

fn write_len_prefix(tag: u32, lens: &mut impl Iterator<Item = usize>, buf: &mut Vec<u8>) {
    let len = lens.next().expect("pass 1 recorded every length");
    put_len_key(tag, len, buf);
}

pub(crate) fn write_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_len_key(tag, s.len(), buf);
        buf.extend_from_slice(s.as_bytes());
    }
}

pub(crate) fn write_resource_spans(
    rs: &ResourceSpans,
    lens: &mut impl Iterator<Item = usize>,
    buf: &mut Vec<u8>,
) {
    let ResourceSpans {
        resource,
        scope_spans,
        schema_url,
    } = rs;
    write_len_prefix(REQUEST_RESOURCE_SPANS, lens, buf);
    if let Some(r) = resource {
        message::encode(RS_RESOURCE, r, buf);
    }
    for ss in scope_spans {
        write_scope_spans(ss, lens, buf);
    }
    write_string(RS_SCHEMA_URL, schema_url, buf);
}

fn write_scope_spans(ss: &ScopeSpans, lens: &mut impl Iterator<Item = usize>, buf: &mut Vec<u8>) {
    let ScopeSpans {
        scope,
        spans,
        schema_url,
    } = ss;
    write_len_prefix(RS_SCOPE_SPANS, lens, buf);
    if let Some(s) = scope {
        message::encode(SS_SCOPE, s, buf);
    }
    for span in spans {
        write_len_prefix(SS_SPANS, lens, buf);
        write_span(span, buf);
    }
    write_string(SS_SCHEMA_URL, schema_url, buf);
}

/// `span.encode_raw(buf)`, fields in tag order as prost writes them (proto3: defaults are
/// left out), except that each attribute's value length is computed once instead of twice.
fn write_span(span: &Span, buf: &mut Vec<u8>) {
    let Span {
        trace_id,
        span_id,
        trace_state,
        parent_span_id,
        flags,
        name,
        kind,
        start_time_unix_nano,
        end_time_unix_nano,
        attributes,
        dropped_attributes_count,
        events,
        dropped_events_count,
        links,
        dropped_links_count,
        status,
    } = span;
    if !trace_id.is_empty() {
        bytes::encode(1, trace_id, buf);
    }
    if !span_id.is_empty() {
        bytes::encode(2, span_id, buf);
    }
    write_string(3, trace_state, buf);
    if !parent_span_id.is_empty() {
        bytes::encode(4, parent_span_id, buf);
    }
    write_string(5, name, buf);
    if *kind != 0 {
        int32::encode(6, kind, buf);
    }
    if *start_time_unix_nano != 0 {
        fixed64::encode(7, start_time_unix_nano, buf);
    }
    if *end_time_unix_nano != 0 {
        fixed64::encode(8, end_time_unix_nano, buf);
    }
    for kv in attributes {
        write_key_value(9, kv, buf);
    }
    if *dropped_attributes_count != 0 {
        uint32::encode(10, dropped_attributes_count, buf);
    }
    message::encode_repeated(11, events, buf);
    if *dropped_events_count != 0 {
        uint32::encode(12, dropped_events_count, buf);
    }
    message::encode_repeated(13, links, buf);
    if *dropped_links_count != 0 {
        uint32::encode(14, dropped_links_count, buf);
    }
    if let Some(status) = status {
        message::encode(15, status, buf);
    }
    if *flags != 0 {
        fixed32::encode(16, flags, buf);
    }
}

/// `message::encode(tag, kv, buf)` with the value's length computed once.
fn write_key_value(tag: u32, kv: &KeyValue, buf: &mut Vec<u8>) {
    let KeyValue {
        key,
        value,
        key_strindex,
    } = kv;
    let value_len = value.as_ref().map(Message::encoded_len);
    let strindex_len = if *key_strindex != 0 {
        int32::encoded_len(3, key_strindex)
    } else {
        0
    };
    let len = string_len(1, key) + value_len.map_or(0, |n| field_len(2, n)) + strindex_len;
    put_len_key(tag, len, buf);
    write_string(1, key, buf);
    if let (Some(value), Some(n)) = (value, value_len) {
        put_len_key(2, n, buf);
        value.encode_raw(buf);
    }
    // Profiling's key reference: meaningless on a span, but forwarded as received.
    if *key_strindex != 0 {
        int32::encode(3, key_strindex, buf);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::Span;

    use super::*;
    use crate::otlp_wire::batch::kv_str;

    /// The direct string attribute writes what prost writes for the message, empty strings
    /// included (an empty oneof string is still present, an empty key is not).
    #[test]
    fn a_string_attribute_is_written_as_prost_writes_it() {
        for (key, value) in [
            ("inferwatch.join", "request_id"),
            ("k", ""),
            ("", "v"),
            ("long", &*"x".repeat(300)),
        ] {
            let mut direct = Vec::new();
            append_str_attribute(key, value, &mut direct);
            let mut expected = Vec::new();
            append_attribute(kv_str(key, value), &mut expected);
            assert_eq!(direct, expected, "{key:?} = {value:?}");
            let span = Span::decode(direct.as_slice()).expect("decodes as a span");
            assert_eq!(span.attributes, vec![kv_str(key, value)]);
        }
    }
}
