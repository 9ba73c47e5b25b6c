//! Tests of the span walker: real spans, a differential test against prost on mutated spans,
//! limits, rewriting and hostile nesting.

use std::collections::BTreeMap;
use std::time::Instant;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use super::*;

const DEFAULT: WireLimits = WireLimits {
    max_attributes: 1024,
    max_value_depth: 16,
};
const LOOSE: WireLimits = WireLimits {
    max_attributes: 1000,
    max_value_depth: 1000,
};
const TIGHT: WireLimits = WireLimits {
    max_attributes: 5,
    max_value_depth: 3,
};

// ---------------------------------------------------------------- builders

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn array(values: Vec<any_value::Value>) -> any_value::Value {
    any_value::Value::ArrayValue(ArrayValue {
        values: values
            .into_iter()
            .map(|v| AnyValue { value: Some(v) })
            .collect(),
    })
}

fn kvlist(values: Vec<KeyValue>) -> any_value::Value {
    any_value::Value::KvlistValue(KeyValueList { values })
}

/// A vLLM-like `llm_request` span with every value kind, events, links and a status.
fn vllm_like(i: u64) -> Span {
    let start = 1_760_000_000_000_000_000 + i * 1_000_000;
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(i + 1).to_be_bytes());
    Span {
        trace_id: trace_id.to_vec(),
        span_id: (i + 11).to_be_bytes().to_vec(),
        parent_span_id: (i + 7).to_be_bytes().to_vec(),
        trace_state: "vendor=1".into(),
        name: "llm_request".into(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 2_500_000_000,
        attributes: vec![
            kv(
                "gen_ai.response.model",
                s("meta-llama/Llama-3.1-8B-Instruct"),
            ),
            kv("gen_ai.request.id", s(&format!("chatcmpl-{i:016x}"))),
            kv(
                "gen_ai.request.temperature",
                any_value::Value::DoubleValue(0.7),
            ),
            kv("gen_ai.request.top_p", any_value::Value::DoubleValue(1.0)),
            kv("gen_ai.request.max_tokens", any_value::Value::IntValue(512)),
            kv("gen_ai.request.n", any_value::Value::IntValue(1)),
            kv(
                "gen_ai.usage.prompt_tokens",
                any_value::Value::IntValue(1200 + i as i64),
            ),
            kv(
                "gen_ai.usage.completion_tokens",
                any_value::Value::IntValue(-80),
            ),
            kv(
                "gen_ai.latency.time_to_first_token",
                any_value::Value::DoubleValue(0.145),
            ),
            kv("gen_ai.latency.e2e", any_value::Value::DoubleValue(2.5)),
            kv("gen_ai.request.stream", any_value::Value::BoolValue(true)),
            kv(
                "gen_ai.prompt.hash",
                any_value::Value::BytesValue(vec![0xde, 0xad, 0xbe, 0xef]),
            ),
            kv(
                "gen_ai.response.finish_reasons",
                array(vec![s("stop"), s("length")]),
            ),
            kv(
                "gen_ai.request.metadata",
                kvlist(vec![
                    kv("user", s("u-42")),
                    kv("priority", any_value::Value::IntValue(3)),
                    kv(
                        "tags",
                        array(vec![s("a"), any_value::Value::BoolValue(false)]),
                    ),
                    KeyValue {
                        key: "unset".into(),
                        value: None,
                        ..Default::default()
                    },
                ]),
            ),
            KeyValue {
                key: "empty.value".into(),
                value: Some(AnyValue { value: None }),
                ..Default::default()
            },
            kv("tenant.id", s(&format!("tenant-{}", i % 8))),
            kv("gen_ai.conversation.id", s("conv-1")),
        ],
        dropped_attributes_count: 2,
        events: (0..3)
            .map(|t| span::Event {
                time_unix_nano: start + 100_000_000 * (t + 1),
                name: "token".into(),
                attributes: vec![kv("index", any_value::Value::IntValue(t as i64))],
                dropped_attributes_count: 0,
            })
            .collect(),
        dropped_events_count: 1,
        links: vec![span::Link {
            trace_id: vec![9; 16],
            span_id: vec![8; 8],
            trace_state: "x=y".into(),
            attributes: vec![kv("link.kind", s("follows"))],
            dropped_attributes_count: 0,
            flags: 0x100,
        }],
        dropped_links_count: 0,
        status: Some(Status {
            message: "ok".into(),
            code: status::StatusCode::Ok as i32,
        }),
        flags: 0x101,
    }
}

/// `key, varint(len), body` for a length-delimited field.
fn field(tag: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

fn varint_field(tag: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::Varint, &mut out);
    encode_varint(value, &mut out);
    out
}

/// Appends, reversed, the key and length prefix of a field holding the (reversed) bytes
/// already in `rev`: building from the inside out in one pass, without quadratic copying.
fn wrap_rev(rev: &mut Vec<u8>, tag: u32) {
    let mut header = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut header);
    encode_varint(rev.len() as u64, &mut header);
    rev.extend(header.iter().rev());
}

/// The body of an `AnyValue` nested `depth` levels deep (1 = a string). `kinds` picks, level
/// by level from the outside, an array (false) or a key-value list (true).
fn nested_value(depth: usize, kinds: impl FnMut(usize) -> bool) -> Vec<u8> {
    nested_value_around(depth, kinds, &field(1, b"leaf"))
}

/// [`nested_value`] with `leaf` as the innermost `AnyValue`'s body.
fn nested_value_around(depth: usize, mut kinds: impl FnMut(usize) -> bool, leaf: &[u8]) -> Vec<u8> {
    let mut rev: Vec<u8> = leaf.iter().rev().copied().collect();
    for level in (1..depth).rev() {
        if kinds(level) {
            // AnyValue{6: KeyValueList{1: KeyValue{1: "k", 2: inner}}}
            wrap_rev(&mut rev, 2);
            rev.extend(field(1, b"k").iter().rev());
            wrap_rev(&mut rev, 1);
            wrap_rev(&mut rev, 6);
        } else {
            // AnyValue{5: ArrayValue{1: inner}}
            wrap_rev(&mut rev, 1);
            wrap_rev(&mut rev, 5);
        }
    }
    rev.reverse();
    rev
}

/// The body of `KeyValue{key, value: AnyValue(value_body)}`.
fn key_value(key: &str, value_body: &[u8]) -> Vec<u8> {
    let mut kv = field(1, key.as_bytes());
    kv.extend(field(2, value_body));
    kv
}

/// Span field 9 holding `KeyValue{key, value: AnyValue(value_body)}`.
fn attribute_field(key: &str, value_body: &[u8]) -> Vec<u8> {
    field(9, &key_value(key, value_body))
}

/// `span` as the only span of an export request.
fn in_request(span: &[u8]) -> Vec<u8> {
    field(1, &field(2, &field(2, span)))
}

/// prost's decoding of `span` the way the receiver meets it: inside an export request.
fn decode_in_request(span: &[u8]) -> Result<Span, prost::DecodeError> {
    let mut request = ExportTraceServiceRequest::decode(in_request(span).as_slice())?;
    Ok(request
        .resource_spans
        .pop()
        .and_then(|mut rs| rs.scope_spans.pop())
        .and_then(|mut ss| ss.spans.pop())
        .unwrap_or_default())
}

// ---------------------------------------------------------------- reference checks

/// The limits as `super::validate` applies them, on a decoded span.
fn within_limits(span: &Span, limits: WireLimits) -> bool {
    fn list(kvs: &[KeyValue], depth: usize, l: WireLimits) -> bool {
        kvs.len() <= l.max_attributes
            && kvs
                .iter()
                .all(|kv| kv.value.as_ref().is_none_or(|v| value(v, depth, l)))
    }
    fn value(v: &AnyValue, depth: usize, l: WireLimits) -> bool {
        depth <= l.max_value_depth
            && match &v.value {
                Some(any_value::Value::ArrayValue(a)) => {
                    a.values.iter().all(|v| value(v, depth + 1, l))
                }
                Some(any_value::Value::KvlistValue(kvs)) => list(&kvs.values, depth + 1, l),
                _ => true,
            }
    }
    list(&span.attributes, 1, limits)
        && span.events.iter().all(|e| list(&e.attributes, 1, limits))
        && span.links.iter().all(|k| list(&k.attributes, 1, limits))
}

/// The span types again, with every singular message field declared `repeated` (same wire
/// format) so that prost itself counts the occurrences: the reference for canonical form.
mod mirror {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "3")]
        pub trace_state: String,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start: u64,
        #[prost(fixed64, tag = "8")]
        pub end: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "10")]
        pub dropped_attributes: u32,
        #[prost(message, repeated, tag = "11")]
        pub events: Vec<Event>,
        #[prost(uint32, tag = "12")]
        pub dropped_events: u32,
        #[prost(message, repeated, tag = "13")]
        pub links: Vec<Link>,
        #[prost(uint32, tag = "14")]
        pub dropped_links: u32,
        #[prost(message, repeated, tag = "15")]
        pub status: Vec<Status>,
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(fixed64, tag = "1")]
        pub time: u64,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "3")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "4")]
        pub dropped: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Link {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "3")]
        pub trace_state: String,
        #[prost(message, repeated, tag = "4")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "5")]
        pub dropped: u32,
        #[prost(fixed32, tag = "6")]
        pub flags: u32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(int32, tag = "3")]
        pub code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, repeated, tag = "2")]
        pub value: Vec<AnyValue>,
        #[prost(int32, tag = "3")]
        pub key_strindex: i32,
    }
    /// The oneof as separate fields: scalars `optional` (last wins, as in the oneof), the two
    /// message variants repeated.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, optional, tag = "1")]
        pub string: Option<String>,
        #[prost(bool, optional, tag = "2")]
        pub boolean: Option<bool>,
        #[prost(int64, optional, tag = "3")]
        pub int: Option<i64>,
        #[prost(double, optional, tag = "4")]
        pub double: Option<f64>,
        #[prost(message, repeated, tag = "5")]
        pub array: Vec<ArrayValue>,
        #[prost(message, repeated, tag = "6")]
        pub kvlist: Vec<KeyValueList>,
        #[prost(bytes = "vec", optional, tag = "7")]
        pub bytes: Option<Vec<u8>>,
        #[prost(int32, optional, tag = "8")]
        pub strindex: Option<i32>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ArrayValue {
        #[prost(message, repeated, tag = "1")]
        pub values: Vec<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValueList {
        #[prost(message, repeated, tag = "1")]
        pub values: Vec<KeyValue>,
    }

    pub fn canonical(span: &Span) -> bool {
        span.status.len() <= 1
            && list(&span.attributes)
            && span.events.iter().all(|e| list(&e.attributes))
            && span.links.iter().all(|l| list(&l.attributes))
    }
    fn list(kvs: &[KeyValue]) -> bool {
        kvs.iter()
            .all(|kv| kv.value.len() <= 1 && kv.value.iter().all(value))
    }
    fn value(v: &AnyValue) -> bool {
        let messages = v.array.len() + v.kvlist.len();
        let scalars = [
            v.string.is_some(),
            v.boolean.is_some(),
            v.int.is_some(),
            v.double.is_some(),
            v.bytes.is_some(),
            v.strindex.is_some(),
        ]
        .into_iter()
        .filter(|&x| x)
        .count();
        !(messages >= 1 && messages + scalars >= 2)
            && v.array.iter().all(|a| a.values.iter().all(value))
            && v.kvlist.iter().all(|l| list(&l.values))
    }
}

// ---------------------------------------------------------------- view vs prost

fn value_matches(view: ValueView<'_>, value: Option<&AnyValue>) -> Result<(), String> {
    use any_value::Value as V;
    match (view, value.and_then(|v| v.value.as_ref())) {
        (ValueView::Empty, None | Some(V::StringValueStrindex(_))) => Ok(()),
        (ValueView::Str(a), Some(V::StringValue(b))) if a == b => Ok(()),
        (ValueView::Bool(a), Some(V::BoolValue(b))) if a == *b => Ok(()),
        (ValueView::Int(a), Some(V::IntValue(b))) if a == *b => Ok(()),
        (ValueView::Double(a), Some(V::DoubleValue(b))) if a.to_bits() == b.to_bits() => Ok(()),
        (ValueView::Bytes(a), Some(V::BytesValue(b))) if a == b.as_slice() => Ok(()),
        (ValueView::Array(a), Some(V::ArrayValue(b))) => {
            let views: Vec<_> = a.values().collect();
            if views.len() != b.values.len() {
                return Err(format!("array of {} vs {}", views.len(), b.values.len()));
            }
            for (v, p) in views.into_iter().zip(&b.values) {
                value_matches(v, Some(p))?;
            }
            Ok(())
        }
        (ValueView::KvList(a), Some(V::KvlistValue(b))) => attributes_match(a.values(), &b.values),
        (view, value) => Err(format!("{view:?} vs {value:?}")),
    }
}

fn attributes_match<'a>(
    views: impl Iterator<Item = AttributeView<'a>>,
    kvs: &[KeyValue],
) -> Result<(), String> {
    let views: Vec<_> = views.collect();
    if views.len() != kvs.len() {
        return Err(format!("{} attributes vs {}", views.len(), kvs.len()));
    }
    for (v, kv) in views.into_iter().zip(kvs) {
        if v.key != kv.key {
            return Err(format!("key {:?} vs {:?}", v.key, kv.key));
        }
        value_matches(v.value, kv.value.as_ref())?;
    }
    Ok(())
}

fn view_matches(view: &SpanView<'_>, span: &Span) -> Result<(), String> {
    // The pipeline's top-level read of a validated span gives the same view.
    let fast = SpanView::read_validated(view.bytes()).ok_or("read_validated refused it")?;
    fn fields<'a>(v: &SpanView<'a>) -> (&'a [u8], &'a [u8], &'a [u8], &'a str, u64, u64, usize) {
        (
            v.trace_id,
            v.span_id,
            v.parent_span_id,
            v.name,
            v.start_time_unix_nano,
            v.end_time_unix_nano,
            v.attribute_count,
        )
    }
    if fields(&fast) != fields(view) {
        return Err(format!("read_validated {fast:?} vs parse {view:?}"));
    }
    if view.trace_id != span.trace_id.as_slice()
        || view.span_id != span.span_id.as_slice()
        || view.parent_span_id != span.parent_span_id.as_slice()
    {
        return Err("ids differ".into());
    }
    if view.name != span.name {
        return Err(format!("name {:?} vs {:?}", view.name, span.name));
    }
    if view.start_time_unix_nano != span.start_time_unix_nano
        || view.end_time_unix_nano != span.end_time_unix_nano
    {
        return Err("times differ".into());
    }
    if view.attribute_count != span.attributes.len() {
        return Err("attribute_count differs".into());
    }
    attributes_match(view.attributes(), &span.attributes)?;
    let events: Vec<_> = view.events().collect();
    let expected: Vec<_> = span
        .events
        .iter()
        .map(|e| EventView {
            name: &e.name,
            time_unix_nano: e.time_unix_nano,
        })
        .collect();
    if events != expected {
        return Err(format!("events {events:?} vs {expected:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------- 1. real spans

#[test]
fn real_spans_read_as_prost_decodes_them() {
    for i in 0..20 {
        let span = vllm_like(i);
        let bytes = span.encode_to_vec();
        let view = SpanView::parse(&bytes, DEFAULT).unwrap();
        assert_eq!(view.bytes(), bytes.as_slice());
        view_matches(&view, &span).unwrap();
        assert_eq!(view.name, "llm_request");
        assert_eq!(view.attribute_count, 17);
        assert_eq!(view.trace_id, span.trace_id.as_slice());
        let finish = view
            .attributes()
            .find(|a| a.key == "gen_ai.response.finish_reasons")
            .unwrap();
        let ValueView::Array(reasons) = finish.value else {
            panic!("{finish:?}");
        };
        assert_eq!(
            reasons.values().collect::<Vec<_>>(),
            [ValueView::Str("stop"), ValueView::Str("length")]
        );
        let tenant = view.attributes().find(|a| a.key == "tenant.id").unwrap();
        assert_eq!(tenant.value, ValueView::Str(&format!("tenant-{}", i % 8)));
        assert_eq!(
            view.attributes()
                .find(|a| a.key == "gen_ai.request.stream")
                .map(|a| a.value),
            Some(ValueView::Bool(true))
        );
        assert_eq!(
            view.attributes()
                .find(|a| a.key == "empty.value")
                .map(|a| a.value),
            Some(ValueView::Empty)
        );
        let ValueView::KvList(meta) = view.attributes().nth(13).unwrap().value else {
            panic!("kvlist expected");
        };
        let meta: Vec<_> = meta.values().collect();
        assert_eq!(meta[0].key, "user");
        assert_eq!(meta[1].value, ValueView::Int(3));
        assert_eq!(
            meta[3],
            AttributeView {
                key: "unset",
                value: ValueView::Empty
            }
        );
        assert!(view.events().all(|e| e.name == "token"));
        assert_eq!(view.events().count(), 3);
    }
}

#[test]
fn the_last_of_a_repeated_scalar_field_wins() {
    let mut bytes = field(5, b"first");
    bytes.extend(field(1, &[1; 16]));
    bytes.extend(field(5, b"second"));
    bytes.extend(field(1, &[2; 16]));
    // AnyValue{string "a", int 7}: the int wins; {int 7, string "b"}: the string.
    let mut any = field(1, b"a");
    any.extend(varint_field(3, 7));
    bytes.extend(attribute_field("x", &any));
    let mut any = varint_field(3, 7);
    any.extend(field(1, b"b"));
    bytes.extend(attribute_field("y", &any));
    // A profiles string index after a string: reads as empty, as prost's oneof holds the index.
    let mut any = field(1, b"c");
    any.extend(varint_field(8, 4));
    bytes.extend(attribute_field("z", &any));
    let view = SpanView::parse(&bytes, DEFAULT).unwrap();
    let span = Span::decode(bytes.as_slice()).unwrap();
    view_matches(&view, &span).unwrap();
    assert_eq!(view.name, "second");
    assert_eq!(view.trace_id, &[2; 16]);
    let values: Vec<_> = view.attributes().map(|a| a.value).collect();
    assert_eq!(
        values,
        [ValueView::Int(7), ValueView::Str("b"), ValueView::Empty]
    );
}

#[test]
fn repeated_singular_messages_are_not_canonical() {
    let base = vllm_like(1).encode_to_vec();
    let status = field(15, &field(2, b"again"));
    let string_any = field(1, b"s");
    let array_any = field(5, &field(1, &string_any));
    let mut cases = Vec::new();
    // Status twice.
    cases.push([base.clone(), status.clone()].concat());
    // KeyValue.value twice.
    let mut kv = field(1, b"k");
    kv.extend(field(2, &string_any));
    kv.extend(field(2, &string_any));
    cases.push([base.clone(), field(9, &kv)].concat());
    // array_value twice, and array_value with a string.
    cases.push(
        [
            base.clone(),
            attribute_field("a", &[array_any.clone(), array_any.clone()].concat()),
        ]
        .concat(),
    );
    cases.push(
        [
            base.clone(),
            attribute_field("a", &[string_any.clone(), array_any.clone()].concat()),
        ]
        .concat(),
    );
    cases.push(
        [
            base.clone(),
            attribute_field("a", &[array_any.clone(), string_any.clone()].concat()),
        ]
        .concat(),
    );
    // Inside an event's attribute, and inside a nested key-value list.
    let twice = [array_any.clone(), array_any].concat();
    let event = [field(2, b"token"), field(3, &key_value("e", &twice))].concat();
    cases.push([base.clone(), field(11, &event)].concat());
    let list = field(6, &field(1, &key_value("inner", &twice)));
    cases.push([base.clone(), attribute_field("outer", &list)].concat());
    for case in &cases {
        assert!(Span::decode(case.as_slice()).is_ok());
        assert_eq!(
            SpanView::parse(case, DEFAULT).unwrap_err(),
            WireError::NotCanonical
        );
    }
    // Not canonical wins over a limit (the limits need the merged span).
    let over = SpanView::parse(&cases[0], limits(3, 16));
    assert_eq!(over.err(), Some(WireError::NotCanonical));
    // Malformed wins over not canonical.
    let mut bad = cases[0].clone();
    bad.extend(field(5, &[0xff]));
    assert!(matches!(
        SpanView::parse(&bad, DEFAULT),
        Err(WireError::Malformed(_))
    ));
}

#[test]
fn malformed_spans_are_refused_as_prost_refuses_them() {
    let good = vllm_like(3).encode_to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "name as varint",
            [good.clone(), varint_field(5, 1)].concat(),
        ),
        (
            "name not UTF-8",
            [good.clone(), field(5, &[0xc3, 0x28])].concat(),
        ),
        ("tag 0", [good.clone(), vec![0x00, 0x01]].concat()),
        ("wire type 6", [good.clone(), vec![0x0e]].concat()),
        (
            "varint of 11 bytes",
            [good.clone(), vec![0x50], vec![0x80; 10], vec![0x01]].concat(),
        ),
        (
            "key above u32",
            [good.clone(), vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x01]].concat(),
        ),
        (
            "length past the end",
            [good.clone(), vec![0x2a, 0x05, b'a']].concat(),
        ),
        (
            "truncated fixed64",
            [good.clone(), vec![0x39, 1, 2, 3]].concat(),
        ),
        ("lone end group", [good.clone(), vec![0x84, 0x06]].concat()),
        (
            "group closed by another tag",
            [good.clone(), vec![0x83, 0x06, 0x8c, 0x06]].concat(),
        ),
        (
            "unterminated group",
            [good.clone(), vec![0x83, 0x06, 0x08, 0x01]].concat(),
        ),
        (
            "status code as fixed32",
            [good.clone(), field(15, &[0x1d, 0, 0, 0, 0])].concat(),
        ),
    ];
    // A nested message whose field overruns its length: KeyValue claims 3 bytes, its key 5.
    let mut overrun = vec![0x4a, 0x03, 0x0a, 0x05];
    overrun.extend(b"abcde");
    cases.push(("nested overrun", [good.clone(), overrun].concat()));
    for (what, bytes) in cases {
        assert!(decode_in_request(&bytes).is_err(), "{what}: prost accepts");
        assert!(
            matches!(
                SpanView::parse(&bytes, DEFAULT),
                Err(WireError::Malformed(_))
            ),
            "{what}: {:?}",
            SpanView::parse(&bytes, DEFAULT)
        );
    }
    // Unknown fields of every wire type, groups nested, are skipped.
    let mut unknown = good.clone();
    unknown.extend(varint_field(100, u64::MAX));
    unknown.extend([0x85, 0x06, 1, 2, 3, 4]); // 80: fixed32
    unknown.extend([0x83, 0x06, 0x8b, 0x06, 0x08, 0x01, 0x8c, 0x06, 0x84, 0x06]); // nested groups
    unknown.extend(field(101, b"\xff\xfe"));
    let view = SpanView::parse(&unknown, DEFAULT).unwrap();
    view_matches(&view, &decode_in_request(&unknown).unwrap()).unwrap();
}

// ---------------------------------------------------------------- 2. differential

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One field of a message: its bytes `start..end`; for a length-delimited field, where the key
/// ends and the body starts.
#[derive(Debug, Clone, Copy)]
struct RawField {
    start: usize,
    key_end: usize,
    body_start: usize,
    end: usize,
    len_delimited: bool,
}

/// Splits `b` into fields, groups kept whole; None when it is not a sequence of fields.
fn split(b: &[u8]) -> Option<Vec<RawField>> {
    let mut fields = Vec::new();
    let mut buf = b;
    while !buf.is_empty() {
        let start = b.len() - buf.len();
        let (_, wire_type) = decode_key(&mut buf).ok()?;
        let key_end = b.len() - buf.len();
        let mut body_start = key_end;
        let len_delimited = wire_type == WireType::LengthDelimited;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
            }
            WireType::SixtyFourBit => buf = buf.get(8..)?,
            WireType::ThirtyTwoBit => buf = buf.get(4..)?,
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).ok()? as usize;
                body_start = b.len() - buf.len();
                buf = buf.get(len..)?;
            }
            WireType::StartGroup => {
                let mut open = 1;
                while open > 0 {
                    let (_, wt) = decode_key(&mut buf).ok()?;
                    match wt {
                        WireType::StartGroup => open += 1,
                        WireType::EndGroup => open -= 1,
                        WireType::Varint => {
                            decode_varint(&mut buf).ok()?;
                        }
                        WireType::SixtyFourBit => buf = buf.get(8..)?,
                        WireType::ThirtyTwoBit => buf = buf.get(4..)?,
                        WireType::LengthDelimited => {
                            let len = decode_varint(&mut buf).ok()? as usize;
                            buf = buf.get(len..)?;
                        }
                    }
                }
            }
            WireType::EndGroup => return None,
        }
        fields.push(RawField {
            start,
            key_end,
            body_start,
            end: b.len() - buf.len(),
            len_delimited,
        });
    }
    Some(fields)
}

/// Every field, at every level that splits cleanly: material to insert elsewhere.
fn collect_donors(b: &[u8], level: usize, donors: &mut Vec<Vec<u8>>) {
    let Some(fields) = split(b) else { return };
    for f in fields {
        donors.push(b[f.start..f.end].to_vec());
        if f.len_delimited && level < 12 {
            collect_donors(&b[f.body_start..f.end], level + 1, donors);
        }
    }
}

fn random_unknown_field(rng: &mut Rng) -> Vec<u8> {
    let tag = match rng.below(3) {
        0 => 17 + rng.below(100) as u32,
        1 => 1 + rng.below(16) as u32,
        _ => (1 << 29) - 1 - rng.below(5) as u32,
    };
    let mut out = Vec::new();
    match rng.below(5) {
        0 => {
            encode_key(tag, WireType::Varint, &mut out);
            encode_varint(rng.next() >> rng.below(64), &mut out);
        }
        1 => {
            encode_key(tag, WireType::SixtyFourBit, &mut out);
            out.extend(rng.next().to_le_bytes());
        }
        2 => {
            encode_key(tag, WireType::ThirtyTwoBit, &mut out);
            out.extend(&rng.next().to_le_bytes()[..4]);
        }
        3 => {
            let body: Vec<u8> = (0..rng.below(6)).map(|_| rng.next() as u8).collect();
            out = field(tag, &body);
        }
        _ => {
            encode_key(tag, WireType::StartGroup, &mut out);
            if rng.chance(50) {
                out.extend(random_unknown_field(rng));
            }
            // Sometimes closed by the wrong tag.
            let end = if rng.chance(90) { tag } else { tag % 100 + 1 };
            encode_key(end, WireType::EndGroup, &mut out);
        }
    }
    out
}

/// Field-level mutations, descending into nested messages and fixing up their lengths, so
/// that most results still decode and the interesting cases (repeats, unknown fields, wrong
/// wire types, limits) are reached often.
fn mutate_fields(b: &[u8], rng: &mut Rng, donors: &[Vec<u8>], level: usize) -> Vec<u8> {
    let Some(fields) = split(b) else {
        return mutate_bytes(b, rng);
    };
    let mut parts: Vec<Vec<u8>> = fields.iter().map(|f| b[f.start..f.end].to_vec()).collect();
    let donor = |rng: &mut Rng| donors[rng.below(donors.len())].clone();
    if parts.is_empty() {
        parts.push(donor(rng));
        return parts.concat();
    }
    let i = rng.below(parts.len());
    let f = fields[i];
    match rng.below(12) {
        0..=3 if f.len_delimited && level < 10 && split(&b[f.body_start..f.end]).is_some() => {
            let body = mutate_fields(&b[f.body_start..f.end], rng, donors, level + 1);
            let mut out = b[f.start..f.key_end].to_vec();
            encode_varint(body.len() as u64, &mut out);
            out.extend(body);
            parts[i] = out;
        }
        0..=4 => {
            let j = rng.below(parts.len() + 1);
            let copy = parts[i].clone();
            parts.insert(j, copy);
        }
        5 => {
            parts.remove(i);
        }
        6 => {
            let j = rng.below(parts.len());
            parts.swap(i, j);
        }
        7 => {
            let j = rng.below(parts.len() + 1);
            parts.insert(j, donor(rng));
        }
        8 => parts[i] = donor(rng),
        9 => {
            let j = rng.below(parts.len() + 1);
            parts.insert(j, random_unknown_field(rng));
        }
        10 => {
            // Another wire type or another tag on the same value.
            let mut key_buf = &b[f.start..f.key_end];
            let Ok((tag, wire_type)) = decode_key(&mut key_buf) else {
                return parts.concat();
            };
            let mut out = Vec::new();
            let (tag, wt) = if rng.chance(50) {
                (tag, rng.below(6) as u64)
            } else {
                (1 + rng.below(17) as u32, wire_type as u64)
            };
            encode_varint(u64::from(tag) << 3 | wt, &mut out);
            out.extend(&b[f.key_end..f.end]);
            parts[i] = out;
        }
        _ => {
            // A new varint value, or a byte of the field changed.
            if let Some(last) = parts[i].last_mut() {
                *last ^= 1 << rng.below(8);
            }
        }
    }
    parts.concat()
}

/// Descends a random path of nested messages and duplicates one field there: where that field
/// is a singular message (status, a value, an array or list variant) the span stops being
/// canonical.
fn duplicate_nested(b: &[u8], rng: &mut Rng, level: usize) -> Vec<u8> {
    let Some(fields) = split(b) else {
        return b.to_vec();
    };
    if fields.is_empty() {
        return b.to_vec();
    }
    let mut parts: Vec<Vec<u8>> = fields.iter().map(|f| b[f.start..f.end].to_vec()).collect();
    // Length-delimited fields only, where there are some: only they can be messages.
    let nested: Vec<usize> = (0..fields.len())
        .filter(|&i| fields[i].len_delimited)
        .collect();
    let i = match nested.len() {
        0 => rng.below(parts.len()),
        n => nested[rng.below(n)],
    };
    let f = fields[i];
    if f.len_delimited && level < 10 && rng.chance(60) && split(&b[f.body_start..f.end]).is_some() {
        let body = duplicate_nested(&b[f.body_start..f.end], rng, level + 1);
        let mut out = b[f.start..f.key_end].to_vec();
        encode_varint(body.len() as u64, &mut out);
        out.extend(body);
        parts[i] = out;
    } else {
        let j = rng.below(parts.len() + 1);
        let copy = parts[i].clone();
        parts.insert(j, copy);
    }
    parts.concat()
}

fn mutate_bytes(b: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = b.to_vec();
    match rng.below(4) {
        0 if !out.is_empty() => {
            for _ in 0..=rng.below(3) {
                let i = rng.below(out.len());
                out[i] = if rng.chance(50) {
                    out[i] ^ (1 << rng.below(8))
                } else {
                    rng.next() as u8
                };
            }
        }
        1 => out.truncate(rng.below(out.len() + 1)),
        2 => {
            let at = rng.below(out.len() + 1);
            let bytes: Vec<u8> = (0..=rng.below(4)).map(|_| rng.next() as u8).collect();
            out.splice(at..at, bytes);
        }
        _ if !out.is_empty() => {
            let at = rng.below(out.len());
            let end = (at + 1 + rng.below(8)).min(out.len());
            out.drain(at..end);
        }
        _ => out.push(rng.next() as u8),
    }
    out
}

/// A seed with a deep attribute value (arrays and key-value lists mixed) appended.
fn deep(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let depth = 1 + rng.below(60);
    let mix = rng.next();
    let body = nested_value(depth, |level| mix >> (level % 64) & 1 == 1);
    let mut out = seed.to_vec();
    out.extend(attribute_field("deep", &body));
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Ok,
    Malformed,
    NotCanonical,
    Limit,
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![
        vllm_like(1).encode_to_vec(),
        Span {
            attributes: vllm_like(2).attributes[..4].to_vec(),
            events: vec![],
            links: vec![],
            ..vllm_like(2)
        }
        .encode_to_vec(),
        Span {
            name: "minimal".into(),
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        }
        .encode_to_vec(),
        Vec::new(),
    ];
    // Every list exactly at the tight limit (5): one more entry anywhere breaks it.
    seeds.push(
        Span {
            name: "at-limit".into(),
            attributes: vec![
                kv("list", kvlist(n_attributes(5))),
                kv("reasons", array(vec![s("stop")])),
            ],
            events: vec![span::Event {
                name: "token".into(),
                attributes: n_attributes(5),
                ..Default::default()
            }],
            links: vec![span::Link {
                attributes: n_attributes(5),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    // Unknown fields and groups, at the top and inside an attribute.
    let mut odd = vllm_like(3).encode_to_vec();
    odd.extend([0x83, 0x06, 0x8b, 0x06, 0x08, 0x01, 0x8c, 0x06, 0x84, 0x06]);
    let mut kv = key_value("odd", &[field(1, b"v"), varint_field(50, 1)].concat());
    kv.extend(varint_field(3, 0));
    odd.extend(field(9, &kv));
    seeds.push(odd);
    // Deep values around the limits' edges.
    let base = seeds[2].clone();
    for depth in [3, 4, 16, 17, 46, 47] {
        seeds.push(
            [
                base.clone(),
                attribute_field("deep", &nested_value(depth, |l| l.is_multiple_of(3))),
            ]
            .concat(),
        );
    }
    seeds
}

#[test]
fn differential_against_prost() {
    const INPUTS: usize = 30_000;
    let seeds = seeds();
    let mut donors = Vec::new();
    for seed in &seeds {
        collect_donors(seed, 0, &mut donors);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut classes: BTreeMap<(&str, Class), usize> = BTreeMap::new();
    let mut only_standalone = 0usize;
    let mut rewritten = 0usize;
    for n in 0..INPUTS {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        let mut input = match rng.below(14) {
            0..=4 => mutate_fields(a, &mut rng, &donors, 0),
            5 | 6 => mutate_bytes(a, &mut rng),
            10..=13 => {
                let mut input = a.clone();
                for _ in 0..=rng.below(3) {
                    input = duplicate_nested(&input, &mut rng, 0);
                }
                input
            }
            7 => {
                // Splice: a's fields up to one point, b's from another.
                let (fa, fb) = (split(a).unwrap_or_default(), split(b).unwrap_or_default());
                let cut_a = fa.get(rng.below(fa.len() + 1)).map_or(a.len(), |f| f.start);
                let cut_b = fb.get(rng.below(fb.len() + 1)).map_or(b.len(), |f| f.start);
                [&a[..cut_a], &b[cut_b..]].concat()
            }
            8 => {
                let cut_a = rng.below(a.len() + 1);
                let cut_b = rng.below(b.len() + 1);
                [&a[..cut_a], &b[cut_b..]].concat()
            }
            _ => deep(a, &mut rng),
        };
        // Stack a second mutation now and then.
        if rng.chance(30) {
            input = mutate_fields(&input, &mut rng, &donors, 0);
        }

        let in_request = decode_in_request(&input);
        let standalone = Span::decode(input.as_slice());
        for (name, limits) in [("tight", TIGHT), ("default", DEFAULT), ("loose", LOOSE)] {
            let parsed = SpanView::parse(&input, limits);
            let expected = match &in_request {
                Err(_) => Class::Malformed,
                Ok(span) => {
                    let mirror = mirror::Span::decode(input.as_slice()).unwrap_or_else(|e| {
                        panic!("input {n}: mirror fails where prost decodes: {e}")
                    });
                    if !mirror::canonical(&mirror) {
                        Class::NotCanonical
                    } else if !within_limits(span, limits) {
                        Class::Limit
                    } else {
                        Class::Ok
                    }
                }
            };
            let actual = match &parsed {
                Ok(_) => Class::Ok,
                Err(WireError::Malformed(_)) => Class::Malformed,
                Err(WireError::NotCanonical) => Class::NotCanonical,
                Err(WireError::Limit(_)) => Class::Limit,
            };
            assert_eq!(
                actual, expected,
                "input {n} ({name}): {parsed:?} vs prost {in_request:?}\n{input:02x?}"
            );
            *classes.entry((name, actual)).or_default() += 1;
            if let (Ok(view), Ok(span)) = (&parsed, &in_request) {
                // Ok ⇒ prost decodes it (on its own too) and the view agrees.
                assert_eq!(standalone.as_ref().ok(), Some(span), "input {n}");
                view_matches(view, span).unwrap_or_else(|e| panic!("input {n}: {e}\n{input:02x?}"));
                if name == "loose" {
                    rewritten += check_rewrite(&input, span, &mut rng) as usize;
                }
            }
            if actual == Class::Malformed && name == "loose" && standalone.is_ok() {
                // prost alone has three levels more budget than inside a request.
                let error = in_request
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                assert!(error.contains("recursion limit"), "input {n}: {error}");
                only_standalone += 1;
            }
        }
    }
    println!("differential: {INPUTS} inputs x 3 limit sets");
    for ((limits, class), count) in &classes {
        println!("  {limits:>7} {class:?}: {count}");
    }
    println!("  malformed only inside a request (recursion budget): {only_standalone}");
    println!("  rewrites checked: {rewritten}");
    for limits in ["tight", "default", "loose"] {
        for class in [Class::Ok, Class::Malformed, Class::NotCanonical] {
            let count = classes.get(&(limits, class)).copied().unwrap_or(0);
            assert!(count >= INPUTS / 50, "{limits} {class:?}: only {count}");
        }
    }
    for limits in ["tight", "default"] {
        let count = classes.get(&(limits, Class::Limit)).copied().unwrap_or(0);
        assert!(count >= INPUTS / 100, "{limits} Limit: only {count}");
    }
    assert!(only_standalone > 0);
    assert!(rewritten >= INPUTS / 10);
}

/// Rewrites the string attributes of one key of a decoded-Ok input and checks the result
/// against prost. Returns whether anything was rewritten.
fn check_rewrite(input: &[u8], span: &Span, rng: &mut Rng) -> bool {
    let strings: Vec<&str> = span
        .attributes
        .iter()
        .filter(|kv| {
            matches!(
                kv.value.as_ref().and_then(|v| v.value.as_ref()),
                Some(any_value::Value::StringValue(_))
            )
        })
        .map(|kv| kv.key.as_str())
        .collect();
    let mut out = vec![0xaa, 0xbb];
    if strings.is_empty() {
        assert!(!rewrite_str_attributes(
            input,
            "gen_ai.request.id",
            |_| unreachable!(),
            &mut out
        ));
        assert_eq!(out, [0xaa, 0xbb]);
        return false;
    }
    let key = strings[rng.below(strings.len())];
    assert!(rewrite_str_attributes(
        input,
        key,
        |old| format!("<{old}>"),
        &mut out
    ));
    assert_eq!(&out[..2], [0xaa, 0xbb]);
    let mut expected = span.clone();
    for kv in &mut expected.attributes {
        if let (
            true,
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(v)),
            }),
        ) = (kv.key == key, &mut kv.value)
        {
            *v = format!("<{v}>");
        }
    }
    let rewritten = &out[2..];
    assert_eq!(decode_in_request(rewritten).as_ref(), Ok(&expected));
    let view = SpanView::parse(rewritten, LOOSE).unwrap();
    view_matches(&view, &expected).unwrap();
    true
}

// ---------------------------------------------------------------- 3. limits

fn limits(max_attributes: usize, max_value_depth: usize) -> WireLimits {
    WireLimits {
        max_attributes,
        max_value_depth,
    }
}

fn n_attributes(n: usize) -> Vec<KeyValue> {
    (0..n)
        .map(|i| kv(&format!("k{i}"), any_value::Value::IntValue(i as i64)))
        .collect()
}

fn check_limit(span: &Span, l: WireLimits, ok: bool) {
    let bytes = span.encode_to_vec();
    let parsed = SpanView::parse(&bytes, l);
    assert_eq!(within_limits(span, l), ok);
    if ok {
        view_matches(&parsed.unwrap(), span).unwrap();
    } else {
        assert!(matches!(parsed, Err(WireError::Limit(_))), "{parsed:?}");
    }
}

#[test]
fn attribute_counts_are_limited_per_list() {
    let l = limits(8, 16);
    for (n, ok) in [(8, true), (9, false)] {
        let on_span = Span {
            attributes: n_attributes(n),
            ..Default::default()
        };
        check_limit(&on_span, l, ok);
        let on_event = Span {
            events: vec![span::Event {
                attributes: n_attributes(n),
                ..Default::default()
            }],
            ..Default::default()
        };
        check_limit(&on_event, l, ok);
        let on_link = Span {
            links: vec![span::Link {
                attributes: n_attributes(n),
                ..Default::default()
            }],
            ..Default::default()
        };
        check_limit(&on_link, l, ok);
        let in_list = Span {
            attributes: vec![kv("list", kvlist(n_attributes(n)))],
            ..Default::default()
        };
        check_limit(&in_list, l, ok);
    }
    // Eight on the span, eight on each event: each list counts alone.
    let spread = Span {
        attributes: n_attributes(8),
        events: vec![
            span::Event {
                attributes: n_attributes(8),
                ..Default::default()
            };
            3
        ],
        ..Default::default()
    };
    check_limit(&spread, l, true);
    let err = SpanView::parse(
        &Span {
            attributes: n_attributes(9),
            ..Default::default()
        }
        .encode_to_vec(),
        l,
    )
    .unwrap_err();
    assert_eq!(
        err,
        WireError::Limit(LimitError::TooManyAttributes {
            owner: "span",
            count: 9,
            limit: 8
        })
    );
}

#[test]
fn value_depth_is_limited_as_check_depth_counts_it() {
    fn nested(depth: usize, list: bool) -> any_value::Value {
        let mut value = s("leaf");
        for _ in 1..depth {
            value = if list {
                kvlist(vec![kv("k", value)])
            } else {
                array(vec![value])
            };
        }
        value
    }
    for list in [false, true] {
        for max in [1, 2, 5, 16] {
            let at = Span {
                attributes: vec![kv("v", nested(max, list))],
                ..Default::default()
            };
            check_limit(&at, limits(100, max), true);
            let over = Span {
                attributes: vec![kv("v", nested(max + 1, list))],
                ..Default::default()
            };
            check_limit(&over, limits(100, max), false);
            let err = SpanView::parse(&over.encode_to_vec(), limits(100, max)).unwrap_err();
            assert_eq!(err, WireError::Limit(LimitError::TooDeep { limit: max }));
        }
    }
    // Depth 0: any present value is too deep; an absent one is not.
    let present = Span {
        attributes: vec![KeyValue {
            key: "k".into(),
            value: Some(AnyValue { value: None }),
            ..Default::default()
        }],
        ..Default::default()
    };
    check_limit(&present, limits(100, 0), false);
    let absent = Span {
        attributes: vec![KeyValue {
            key: "k".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    check_limit(&absent, limits(100, 0), true);
    // An event attribute counts from 1 too.
    let event = Span {
        events: vec![span::Event {
            attributes: vec![kv("v", nested(3, false))],
            ..Default::default()
        }],
        ..Default::default()
    };
    check_limit(&event, limits(100, 3), true);
    check_limit(&event, limits(100, 2), false);
}

// ---------------------------------------------------------------- 4. rewriting

#[test]
fn rewrite_replaces_string_values_in_place() {
    let mut span = vllm_like(5);
    // The key a second time (string) and a third time (not a string).
    span.attributes.insert(3, kv("tenant.id", s("second")));
    span.attributes
        .push(kv("tenant.id", any_value::Value::IntValue(9)));
    let bytes = span.encode_to_vec();
    let mut out = b"prefix".to_vec();
    let mut seen = Vec::new();
    assert!(rewrite_str_attributes(
        &bytes,
        "tenant.id",
        |old| {
            seen.push(old.to_owned());
            format!("hashed:{}", old.len())
        },
        &mut out
    ));
    assert_eq!(seen, ["second", "tenant-5"]);
    assert_eq!(&out[..6], b"prefix");
    let rewritten = Span::decode(&out[6..]).unwrap();
    let mut expected = span.clone();
    expected.attributes[3] = kv("tenant.id", s("hashed:6"));
    expected.attributes[16] = kv("tenant.id", s("hashed:8"));
    assert_eq!(rewritten, expected);
    // Everything before the first replaced attribute (the 4th) and after the last (the 17th)
    // is copied byte for byte.
    let fields = split(&bytes).unwrap();
    let attributes: Vec<_> = fields.iter().filter(|f| bytes[f.start] == 0x4a).collect();
    let (first, last) = (attributes[3].start, attributes[16].end);
    assert_eq!(&out[6..6 + first], &bytes[..first]);
    assert_eq!(&out[out.len() - (bytes.len() - last)..], &bytes[last..]);

    // A longer replacement that needs a longer length prefix.
    let mut out = Vec::new();
    let long = "x".repeat(300);
    assert!(rewrite_str_attributes(
        &bytes,
        "gen_ai.request.id",
        |_| long.clone(),
        &mut out
    ));
    let rewritten = Span::decode(out.as_slice()).unwrap();
    assert_eq!(
        rewritten.attributes[1].value,
        Some(AnyValue {
            value: Some(s(&long))
        })
    );
    assert_eq!(rewritten.attributes.len(), span.attributes.len());

    // No match, or a match without a string value: false, `out` untouched.
    let mut out = b"keep".to_vec();
    assert!(!rewrite_str_attributes(
        &bytes,
        "no.such.key",
        |_| unreachable!(),
        &mut out
    ));
    assert!(!rewrite_str_attributes(
        &bytes,
        "gen_ai.request.n",
        |_| unreachable!(),
        &mut out
    ));
    assert_eq!(out, b"keep");
}

#[test]
fn rewrite_copies_every_other_byte() {
    // Unknown fields in the span and inside the replaced KeyValue survive; the bytes around
    // the replaced field are the input's.
    let before = [field(5, b"name"), varint_field(99, 7)].concat();
    let kv = [
        field(1, b"k"),
        varint_field(40, 1),
        field(2, &field(1, b"old")),
        varint_field(3, 0),
    ]
    .concat();
    let after = [
        field(9, &key_value("other", &field(1, b"o"))),
        field(100, b"zz"),
    ]
    .concat();
    let span = [before.clone(), field(9, &kv), after.clone()].concat();
    assert!(SpanView::parse(&span, DEFAULT).is_ok());
    let mut out = Vec::new();
    assert!(rewrite_str_attributes(
        &span,
        "k",
        |_| "new".into(),
        &mut out
    ));
    let new_kv = [
        field(1, b"k"),
        varint_field(40, 1),
        field(2, &field(1, b"new")),
        varint_field(3, 0),
    ]
    .concat();
    assert_eq!(out, [before, field(9, &new_kv), after].concat());
}

// ---------------------------------------------------------------- 5. recursion

/// A span whose one attribute value nests `depth` levels.
fn deep_span(depth: usize, kinds: impl FnMut(usize) -> bool) -> Vec<u8> {
    let mut span = field(5, b"deep");
    span.extend(attribute_field("v", &nested_value(depth, kinds)));
    span
}

#[test]
fn hostile_nesting_fails_without_overflowing_the_stack() {
    for kinds in [|_| false, |_| true, |l: usize| l.is_multiple_of(2)] {
        let bytes = deep_span(10_000, kinds);
        for l in [DEFAULT, LOOSE] {
            assert_eq!(
                SpanView::parse(&bytes, l).err(),
                Some(WireError::Malformed("recursion limit reached"))
            );
        }
        assert!(decode_in_request(&bytes).is_err());
        // The lazy readers do not recurse either.
        let view = SpanView::empty(&bytes);
        assert_eq!(view.attributes().count(), 1);
    }
    // 10 000 nested unknown groups.
    let mut groups = field(5, b"groups");
    groups.extend(std::iter::repeat_n([0x83, 0x06], 10_000).flatten());
    groups.extend(std::iter::repeat_n([0x84, 0x06], 10_000).flatten());
    assert!(decode_in_request(&groups).is_err());
    assert_eq!(
        SpanView::parse(&groups, LOOSE).err(),
        Some(WireError::Malformed("recursion limit reached"))
    );
    let mut out = Vec::new();
    assert!(!rewrite_str_attributes(
        &groups,
        "k",
        |_| unreachable!(),
        &mut out
    ));
}

#[test]
fn recursion_budget_matches_prost_inside_a_request() {
    let mut thresholds = Vec::new();
    let kinds: [fn(usize) -> bool; 3] = [|_| false, |_| true, |l| l % 2 == 1];
    for kinds in kinds {
        let mut last_ok = 0;
        for depth in 1..=70 {
            let bytes = deep_span(depth, kinds);
            let prost_ok = decode_in_request(&bytes).is_ok();
            let ours = SpanView::parse(&bytes, LOOSE);
            assert_eq!(ours.is_ok(), prost_ok, "depth {depth}: {ours:?}");
            if prost_ok {
                last_ok = depth;
                view_matches(&ours.unwrap(), &decode_in_request(&bytes).unwrap()).unwrap();
            }
            // An unknown field in the innermost value: skip_field needs budget too.
            let leaf = [field(1, b"leaf"), varint_field(99, 1)].concat();
            let with_unknown = [
                field(5, b"deep"),
                attribute_field("v", &nested_value_around(depth, kinds, &leaf)),
            ]
            .concat();
            assert_eq!(
                SpanView::parse(&with_unknown, LOOSE).is_ok(),
                decode_in_request(&with_unknown).is_ok(),
                "depth {depth} with an unknown field"
            );
        }
        thresholds.push(last_ok);
    }
    // Unknown groups nested at the top of the span.
    let mut group_threshold = 0;
    for depth in 1..=100 {
        let mut bytes = field(5, b"g");
        bytes.extend(std::iter::repeat_n([0x83, 0x06], depth).flatten());
        bytes.extend(std::iter::repeat_n([0x84, 0x06], depth).flatten());
        let prost_ok = decode_in_request(&bytes).is_ok();
        assert_eq!(
            SpanView::parse(&bytes, LOOSE).is_ok(),
            prost_ok,
            "groups {depth}"
        );
        if prost_ok {
            group_threshold = depth;
        }
    }
    println!(
        "deepest accepted value (arrays, lists, mixed): {thresholds:?}; groups: {group_threshold}"
    );
    assert!(thresholds.iter().all(|&t| t > 16 && t < 70));
    assert!(group_threshold > 50 && group_threshold < 100);
}

// ---------------------------------------------------------------- timing

#[test]
fn parse_timing() {
    let bytes = vllm_like(7).encode_to_vec();
    const N: u32 = 20_000;
    let started = Instant::now();
    let mut sum = 0usize;
    for _ in 0..N {
        let view = SpanView::parse(std::hint::black_box(&bytes), DEFAULT).unwrap();
        sum += view.attribute_count;
    }
    let parse = started.elapsed() / N;
    let started = Instant::now();
    for _ in 0..N {
        let view = SpanView::parse(std::hint::black_box(&bytes), DEFAULT).unwrap();
        sum += view
            .attributes()
            .filter(|a| matches!(a.value, ValueView::Str(_)))
            .count();
    }
    let parse_and_walk = started.elapsed() / N;
    let started = Instant::now();
    for _ in 0..N {
        let span = Span::decode(std::hint::black_box(bytes.as_slice())).unwrap();
        sum += span.attributes.len();
    }
    let prost = started.elapsed() / N;
    println!(
        "span of {} bytes, {} attributes: parse {parse:?}, parse + attributes() \
         {parse_and_walk:?}, prost decode {prost:?} ({sum})",
        bytes.len(),
        vllm_like(7).attributes.len()
    );
}

#[test]
fn read_validated_refuses_a_top_level_that_does_not_read() {
    let bytes = vllm_like(3).encode_to_vec();
    assert!(SpanView::read_validated(&bytes).is_some());
    // Cut inside the last field: its length runs past the end.
    assert!(SpanView::read_validated(&bytes[..bytes.len() - 1]).is_none());
    // A stray end-group key.
    let mut stray = bytes.clone();
    stray.push(0x0c);
    assert!(SpanView::read_validated(&stray).is_none());
}
