//! A borrowing, allocation-free reader of one `Span`'s protobuf encoding.
//!
//! Decoding a span into prost's owned `Span` allocates every id, name, key and string value
//! (~33 allocations for a vLLM span) although the agent reads only a handful of them. Here a
//! span stays the bytes it arrived as, and [`SpanView::parse`] walks those bytes once, checking
//! everything the prost decode plus [`super::validate`] would have checked, and keeps slices
//! into them. [`SpanView::attributes`] and [`SpanView::events`] walk the top-level fields again
//! on demand (attributes may be interleaved with other fields, so there is no single range to
//! keep), and [`rewrite_str_attributes`] copies a span with some string attributes replaced.
//!
//! # Matching prost
//!
//! [`SpanView::parse`] accepts exactly the spans for which, when the span is one of the `spans`
//! of an `ExportTraceServiceRequest`, `ExportTraceServiceRequest::decode` succeeds,
//! [`super::validate`] accepts the span's attribute lists, and the span is canonical (below):
//!
//! - Unknown fields of any valid wire type are skipped; groups must close with their own tag.
//!   A known field with another wire type, tag 0, wire types 6 and 7, a key above `u32::MAX`,
//!   a varint longer than 10 bytes, a length past the end, a nested message whose fields run
//!   past its length, and a string field that is not UTF-8 are errors.
//! - A singular scalar, string or bytes field given several times: the last one counts (each
//!   string occurrence must still be UTF-8, as prost checks each one).
//! - prost stops at 100 nested messages counted from the top of the request it decodes, unknown
//!   groups included (`skip_field` recurses). A span's fields are read three messages down
//!   (request, `ResourceSpans`, `ScopeSpans`), so the walk starts with `SPAN_FIELD_BUDGET` (97)
//!   and applies prost's rule: entering a nested message, or skipping any unknown field, needs
//!   a budget above zero and costs one level. A span given to `Span::decode` on its own gets
//!   three levels more; the walk follows the request, which is how spans arrive.
//! - The fields of the `profiles` signal that opentelemetry-proto 0.33 added to the common
//!   types (`AnyValue.string_value_strindex`, tag 8; `KeyValue.key_strindex`, tag 3) are known
//!   fields (wire type varint); a string index reads as [`ValueView::Empty`], as the
//!   specification tells non-profiling receivers to treat it.
//!
//! # Canonical form
//!
//! When a singular message field occurs more than once prost merges the occurrences (repeated
//! fields of the two concatenate), so attribute counts and the values would have to be
//! computed over the merge. Real SDKs never write that, so instead of merging, the walk
//! reports [`WireError::NotCanonical`] and the caller decodes such a span with prost. The
//! singular message fields are `Span.status`, `KeyValue.value` and the `array_value` /
//! `kvlist_value` variants of `AnyValue`; an `AnyValue` holding one of those variants and any
//! other value field (where prost would merge or replace) is not canonical either.
//!
//! # Which error
//!
//! The whole span is walked before an error is returned, so the precedence is: `Malformed`
//! (prost would fail), then `NotCanonical` (the limits cannot be judged without merging), then
//! `Limit`. Walking on past a limit costs nothing for valid spans and makes the answer not
//! depend on where in the span the violation sits.
//!
//! # Bounds
//!
//! The walk recurses once per nested message, and never more than prost's budget allows, so a
//! hostile span nested ten thousand levels deep fails after ~100 frames. The views' iterators
//! skip groups with a counter instead of recursion. Nothing here allocates, except prost's own
//! error value inside `decode_varint` / `decode_key` on malformed input (dropped at once).

use prost::encoding::{WireType, decode_key, decode_varint};

use super::{LimitError, OtlpReceiverConfig};
use crate::otlp_wire::write::{field_len, put_len_key};

/// The recursion budget prost has left when it reads a span's fields inside an
/// `ExportTraceServiceRequest`: 100 at the request, minus one per message entered (the
/// `ResourceSpans`, the `ScopeSpans`, the `Span`). Checked against prost in the tests.
pub(crate) const SPAN_FIELD_BUDGET: u32 = 97;

// Field numbers: opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_DROPPED_ATTRIBUTES: u32 = 10;
const SPAN_EVENTS: u32 = 11;
const SPAN_DROPPED_EVENTS: u32 = 12;
const SPAN_LINKS: u32 = 13;
const SPAN_DROPPED_LINKS: u32 = 14;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;

const EVENT_TIME: u32 = 1;
const EVENT_NAME: u32 = 2;
const EVENT_ATTRIBUTES: u32 = 3;
const EVENT_DROPPED_ATTRIBUTES: u32 = 4;

const LINK_TRACE_ID: u32 = 1;
const LINK_SPAN_ID: u32 = 2;
const LINK_TRACE_STATE: u32 = 3;
const LINK_ATTRIBUTES: u32 = 4;
const LINK_DROPPED_ATTRIBUTES: u32 = 5;
const LINK_FLAGS: u32 = 6;

const STATUS_MESSAGE: u32 = 2;
const STATUS_CODE: u32 = 3;

const KV_KEY: u32 = 1;
const KV_VALUE: u32 = 2;
const KV_KEY_STRINDEX: u32 = 3;

const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
const ANY_ARRAY: u32 = 5;
const ANY_KVLIST: u32 = 6;
const ANY_BYTES: u32 = 7;
const ANY_STRINDEX: u32 = 8;

/// `ArrayValue.values` and `KeyValueList.values`.
const LIST_VALUES: u32 = 1;

/// Limits applied while walking (same meaning as [`super::validate`]: attribute count per list,
/// `AnyValue` depth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Most attributes in one list (span, event, link, key-value list).
    pub max_attributes: usize,
    /// Deepest `AnyValue` nesting; a top-level attribute value is depth 1.
    pub max_value_depth: usize,
}

impl WireLimits {
    /// No attribute-count or depth limit: for spans already checked, or built by the agent.
    /// prost's recursion budget still bounds the walk.
    pub const fn unlimited() -> Self {
        Self {
            max_attributes: usize::MAX,
            max_value_depth: usize::MAX,
        }
    }
}

impl From<&OtlpReceiverConfig> for WireLimits {
    fn from(config: &OtlpReceiverConfig) -> Self {
        Self {
            max_attributes: config.max_attributes,
            max_value_depth: config.max_value_depth,
        }
    }
}

/// Why [`SpanView::parse`] refused a span.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a `Span` prost would decode (inside an export request); the text says what broke.
    #[error("malformed span: {0}")]
    Malformed(&'static str),
    /// Decodes, but breaks a limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// Decodes, but a singular message field occurs more than once (prost would merge the
    /// occurrences); the caller then decodes with prost and re-encodes canonically. Real SDKs
    /// never write this.
    #[error("span is not in canonical form")]
    NotCanonical,
}

// ---------------------------------------------------------------- raw fields

/// One field's value as it sits on the wire.
#[derive(Debug, Clone, Copy)]
enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
    /// The group's fields follow in the buffer; the caller skips them.
    StartGroup,
    EndGroup,
}

type Walk<T> = Result<T, &'static str>;

const RECURSION: &str = "recursion limit reached";
const WRONG_WIRE_TYPE: &str = "unexpected wire type";

/// prost's `decode_varint`, with the one-byte case (keys of fields 1-15, short lengths, small
/// numbers: most of a span) handled inline; prost's function is not inlined here and was a
/// seventh of the walk.
#[inline(always)]
fn read_varint(buf: &mut &[u8]) -> Walk<u64> {
    match buf.split_first() {
        Some((&byte, rest)) if byte < 0x80 => {
            *buf = rest;
            Ok(u64::from(byte))
        }
        _ => decode_varint(buf).map_err(|_| "invalid varint"),
    }
}

/// prost's `decode_key`, with the one-byte case inline (same checks: wire types 6 and 7 and
/// tag 0 are errors; a one-byte key cannot exceed `u32::MAX`).
#[inline(always)]
fn read_key(buf: &mut &[u8]) -> Walk<(u32, WireType)> {
    match buf.split_first() {
        Some((&byte, rest)) if byte < 0x80 => {
            let wire_type = match byte & 0x07 {
                0 => WireType::Varint,
                1 => WireType::SixtyFourBit,
                2 => WireType::LengthDelimited,
                3 => WireType::StartGroup,
                4 => WireType::EndGroup,
                5 => WireType::ThirtyTwoBit,
                _ => return Err("invalid field key"),
            };
            let tag = u32::from(byte >> 3);
            if tag == 0 {
                return Err("invalid field key");
            }
            *buf = rest;
            Ok((tag, wire_type))
        }
        _ => decode_key(buf).map_err(|_| "invalid field key"),
    }
}

/// Reads one field key and its value (not a group's contents), advancing `buf`.
#[inline(always)]
fn read_field<'a>(buf: &mut &'a [u8]) -> Walk<(u32, Raw<'a>)> {
    let (tag, wire_type) = read_key(buf)?;
    let raw = match wire_type {
        WireType::Varint => Raw::Varint(read_varint(buf)?),
        WireType::SixtyFourBit => {
            let (value, rest) = buf.split_first_chunk::<8>().ok_or("truncated fixed64")?;
            *buf = rest;
            Raw::Fixed64(u64::from_le_bytes(*value))
        }
        WireType::ThirtyTwoBit => {
            let (value, rest) = buf.split_first_chunk::<4>().ok_or("truncated fixed32")?;
            *buf = rest;
            Raw::Fixed32(u32::from_le_bytes(*value))
        }
        WireType::LengthDelimited => {
            let len = read_varint(buf)?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.len())
                .ok_or("length past the end")?;
            let (body, rest) = buf.split_at(len);
            *buf = rest;
            Raw::Len(body)
        }
        WireType::StartGroup => Raw::StartGroup,
        WireType::EndGroup => Raw::EndGroup,
    };
    Ok((tag, raw))
}

#[inline]
fn len(raw: Raw<'_>) -> Walk<&[u8]> {
    match raw {
        Raw::Len(body) => Ok(body),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

const NOT_UTF8: &str = "string field is not UTF-8";

#[inline]
fn string(raw: Raw<'_>) -> Walk<&str> {
    std::str::from_utf8(len(raw)?).map_err(|_| NOT_UTF8)
}

/// [`string`] where only validity matters: keys and values are mostly ASCII, which an inlined
/// check settles faster than the call into `from_utf8`.
#[inline]
fn check_string(raw: Raw<'_>) -> Walk<()> {
    let bytes = len(raw)?;
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(NOT_UTF8)
    }
}

#[inline]
fn varint(raw: Raw<'_>) -> Walk<u64> {
    match raw {
        Raw::Varint(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

#[inline]
fn fixed64(raw: Raw<'_>) -> Walk<u64> {
    match raw {
        Raw::Fixed64(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

#[inline]
fn fixed32(raw: Raw<'_>) -> Walk<u32> {
    match raw {
        Raw::Fixed32(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

/// prost's `message::merge` entry check: a nested message needs budget left, and its fields
/// are read with one level less.
#[inline]
fn enter(budget: u32) -> Walk<u32> {
    budget.checked_sub(1).ok_or(RECURSION)
}

/// prost's `skip_field` for an unknown field already read by [`read_field`]: needs budget
/// left (for every wire type, as prost checks before looking at it); a group's fields are
/// skipped one level down and it must close with its own tag. Recursion is bounded by
/// `budget`.
fn skip(tag: u32, raw: Raw<'_>, buf: &mut &[u8], budget: u32) -> Walk<()> {
    if budget == 0 {
        return Err(RECURSION);
    }
    match raw {
        Raw::StartGroup => loop {
            let (inner_tag, inner) = read_field(buf)?;
            match inner {
                Raw::EndGroup if inner_tag == tag => return Ok(()),
                Raw::EndGroup => return Err("unexpected end group tag"),
                _ => skip(inner_tag, inner, buf, budget - 1)?,
            }
        },
        Raw::EndGroup => Err("unexpected end group tag"),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- the checking walk

/// State of one [`SpanView::parse`] walk: the first limit broken, and whether a singular
/// message repeated. Both are reported only after the whole span proved decodable.
struct Checker {
    limits: WireLimits,
    limit: Option<LimitError>,
    not_canonical: bool,
}

impl Checker {
    fn broke(&mut self, error: LimitError) {
        if self.limit.is_none() {
            self.limit = Some(error);
        }
    }

    fn count(&mut self, owner: &'static str, count: usize) {
        if count > self.limits.max_attributes {
            self.broke(LimitError::TooManyAttributes {
                owner,
                count,
                limit: self.limits.max_attributes,
            });
        }
    }

    /// The body of a `KeyValue` field of a message whose fields are read with `budget`; its
    /// value, if any, is at `depth`.
    fn key_value(&mut self, mut buf: &[u8], budget: u32, depth: usize) -> Walk<()> {
        let budget = enter(budget)?;
        let mut values = 0u32;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                KV_KEY => {
                    check_string(raw)?;
                }
                KV_VALUE => {
                    values += 1;
                    self.any_value(len(raw)?, budget, depth)?;
                }
                KV_KEY_STRINDEX => {
                    varint(raw)?;
                }
                _ => skip(tag, raw, &mut buf, budget)?,
            }
        }
        if values > 1 {
            self.not_canonical = true;
        }
        Ok(())
    }

    /// The body of an `AnyValue` at nesting `depth` (1 for an attribute's own value), as
    /// `check_depth` counts it.
    fn any_value(&mut self, mut buf: &[u8], budget: u32, depth: usize) -> Walk<()> {
        let budget = enter(budget)?;
        if depth > self.limits.max_value_depth {
            self.broke(LimitError::TooDeep {
                limit: self.limits.max_value_depth,
            });
        }
        // Value fields seen, and how many of them were message variants.
        let mut values = 0u32;
        let mut messages = 0u32;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                ANY_STRING => {
                    check_string(raw)?;
                }
                ANY_BOOL | ANY_INT | ANY_STRINDEX => {
                    varint(raw)?;
                }
                ANY_DOUBLE => {
                    fixed64(raw)?;
                }
                ANY_BYTES => {
                    len(raw)?;
                }
                ANY_ARRAY => {
                    let mut items = len(raw)?;
                    let budget = enter(budget)?;
                    while !items.is_empty() {
                        let (tag, raw) = read_field(&mut items)?;
                        match tag {
                            LIST_VALUES => self.any_value(len(raw)?, budget, depth + 1)?,
                            _ => skip(tag, raw, &mut items, budget)?,
                        }
                    }
                    messages += 1;
                }
                ANY_KVLIST => {
                    let mut items = len(raw)?;
                    let budget = enter(budget)?;
                    let mut count = 0;
                    while !items.is_empty() {
                        let (tag, raw) = read_field(&mut items)?;
                        match tag {
                            LIST_VALUES => {
                                count += 1;
                                self.key_value(len(raw)?, budget, depth + 1)?;
                            }
                            _ => skip(tag, raw, &mut items, budget)?,
                        }
                    }
                    self.count("key-value list", count);
                    messages += 1;
                }
                _ => {
                    skip(tag, raw, &mut buf, budget)?;
                    continue;
                }
            }
            values += 1;
        }
        if messages > 0 && values > 1 {
            self.not_canonical = true;
        }
        Ok(())
    }

    /// The body of an `Event` of the span (whose fields are read with `budget`).
    fn event(&mut self, mut buf: &[u8], budget: u32) -> Walk<()> {
        let budget = enter(budget)?;
        let mut count = 0;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                EVENT_TIME => {
                    fixed64(raw)?;
                }
                EVENT_NAME => {
                    check_string(raw)?;
                }
                EVENT_ATTRIBUTES => {
                    count += 1;
                    self.key_value(len(raw)?, budget, 1)?;
                }
                EVENT_DROPPED_ATTRIBUTES => {
                    varint(raw)?;
                }
                _ => skip(tag, raw, &mut buf, budget)?,
            }
        }
        self.count("event", count);
        Ok(())
    }

    /// The body of a `Link` of the span.
    fn link(&mut self, mut buf: &[u8], budget: u32) -> Walk<()> {
        let budget = enter(budget)?;
        let mut count = 0;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                LINK_TRACE_ID | LINK_SPAN_ID => {
                    len(raw)?;
                }
                LINK_TRACE_STATE => {
                    check_string(raw)?;
                }
                LINK_ATTRIBUTES => {
                    count += 1;
                    self.key_value(len(raw)?, budget, 1)?;
                }
                LINK_DROPPED_ATTRIBUTES => {
                    varint(raw)?;
                }
                LINK_FLAGS => {
                    fixed32(raw)?;
                }
                _ => skip(tag, raw, &mut buf, budget)?,
            }
        }
        self.count("link", count);
        Ok(())
    }

    /// The body of the span's `Status`.
    fn status(mut buf: &[u8], budget: u32) -> Walk<()> {
        let budget = enter(budget)?;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                STATUS_MESSAGE => {
                    check_string(raw)?;
                }
                STATUS_CODE => {
                    varint(raw)?;
                }
                _ => skip(tag, raw, &mut buf, budget)?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- views

/// A span read in place from its protobuf encoding (the body of a `Span` message). The
/// scalar fields are read once by [`SpanView::parse`]; lists are walked on demand.
#[derive(Debug, Clone, Copy)]
pub struct SpanView<'a> {
    bytes: &'a [u8],
    /// `trace_id` (empty when absent).
    pub trace_id: &'a [u8],
    /// `span_id` (empty when absent).
    pub span_id: &'a [u8],
    /// `parent_span_id` (empty for a root span).
    pub parent_span_id: &'a [u8],
    /// `name`.
    pub name: &'a str,
    /// `start_time_unix_nano`.
    pub start_time_unix_nano: u64,
    /// `end_time_unix_nano`.
    pub end_time_unix_nano: u64,
    /// How many attributes the span has (as prost's `attributes.len()`).
    pub attribute_count: usize,
}

impl<'a> SpanView<'a> {
    /// A view of `bytes` with every field at its default, before a walk fills it.
    fn empty(bytes: &'a [u8]) -> Self {
        SpanView {
            bytes,
            trace_id: &[],
            span_id: &[],
            parent_span_id: &[],
            name: "",
            start_time_unix_nano: 0,
            end_time_unix_nano: 0,
            attribute_count: 0,
        }
    }

    /// Walks the whole span once. Ok exactly when `Span::decode(bytes)` succeeds (at the depth
    /// of a span inside an export request), [`super::validate`] would accept the span's
    /// attribute lists (the span's, every event's and every link's: at most
    /// `limits.max_attributes` each, nested key-value lists included; `AnyValue` depth at most
    /// `limits.max_value_depth`, a top-level attribute value being depth 1), and the span is
    /// canonical (see [`WireError::NotCanonical`]).
    ///
    /// # Errors
    /// [`WireError::Malformed`] when prost would fail; otherwise [`WireError::NotCanonical`]
    /// when a singular message field repeats; otherwise [`WireError::Limit`] with the first
    /// limit found (events', links' and values' limits in wire order, the span's own
    /// attribute count last).
    pub fn parse(bytes: &'a [u8], limits: WireLimits) -> Result<Self, WireError> {
        let mut view = SpanView::empty(bytes);
        let mut checker = Checker {
            limits,
            limit: None,
            not_canonical: false,
        };
        let mut statuses = 0u32;
        view.walk(&mut checker, &mut statuses)
            .map_err(WireError::Malformed)?;
        checker.count("span", view.attribute_count);
        if checker.not_canonical || statuses > 1 {
            return Err(WireError::NotCanonical);
        }
        match checker.limit {
            Some(error) => Err(WireError::Limit(error)),
            None => Ok(view),
        }
    }

    fn walk(&mut self, checker: &mut Checker, statuses: &mut u32) -> Walk<()> {
        let budget = SPAN_FIELD_BUDGET;
        let mut buf = self.bytes;
        while !buf.is_empty() {
            let (tag, raw) = read_field(&mut buf)?;
            match tag {
                SPAN_TRACE_ID => self.trace_id = len(raw)?,
                SPAN_SPAN_ID => self.span_id = len(raw)?,
                SPAN_PARENT_SPAN_ID => self.parent_span_id = len(raw)?,
                SPAN_TRACE_STATE => {
                    check_string(raw)?;
                }
                SPAN_NAME => self.name = string(raw)?,
                SPAN_KIND | SPAN_DROPPED_ATTRIBUTES | SPAN_DROPPED_EVENTS | SPAN_DROPPED_LINKS => {
                    varint(raw)?;
                }
                SPAN_START => self.start_time_unix_nano = fixed64(raw)?,
                SPAN_END => self.end_time_unix_nano = fixed64(raw)?,
                SPAN_ATTRIBUTES => {
                    self.attribute_count += 1;
                    checker.key_value(len(raw)?, budget, 1)?;
                }
                SPAN_EVENTS => checker.event(len(raw)?, budget)?,
                SPAN_LINKS => checker.link(len(raw)?, budget)?,
                SPAN_STATUS => {
                    *statuses += 1;
                    Checker::status(len(raw)?, budget)?;
                }
                SPAN_FLAGS => {
                    fixed32(raw)?;
                }
                _ => skip(tag, raw, &mut buf, budget)?,
            }
        }
        Ok(())
    }

    /// Reads the top-level fields of a span that already passed [`SpanView::parse`] (the
    /// receiver's `validate`), without walking into attributes, events and links again: the
    /// pipeline's read of every span it adapts, a second full walk being a visible share of
    /// the agent's CPU. `None` when the top level does not read (bytes that never passed
    /// `parse`); nested content that does not is skipped by the iterators, as after `parse`.
    pub fn read_validated(bytes: &'a [u8]) -> Option<Self> {
        let mut view = SpanView::empty(bytes);
        let mut fields = Fields::new(bytes);
        for (tag, raw) in fields.by_ref() {
            match (tag, raw) {
                (SPAN_TRACE_ID, Raw::Len(b)) => view.trace_id = b,
                (SPAN_SPAN_ID, Raw::Len(b)) => view.span_id = b,
                (SPAN_PARENT_SPAN_ID, Raw::Len(b)) => view.parent_span_id = b,
                (SPAN_NAME, raw) => view.name = string(raw).ok()?,
                (SPAN_START, Raw::Fixed64(t)) => view.start_time_unix_nano = t,
                (SPAN_END, Raw::Fixed64(t)) => view.end_time_unix_nano = t,
                (SPAN_ATTRIBUTES, _) => view.attribute_count += 1,
                _ => {}
            }
        }
        (!fields.failed).then_some(view)
    }

    /// The span's encoding, as given to [`SpanView::parse`].
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The attributes in wire order. The span parsed, so this cannot fail (the walk would stop
    /// silently at an error).
    pub fn attributes(&self) -> impl Iterator<Item = AttributeView<'a>> + use<'a> {
        Fields::new(self.bytes).filter_map(|(tag, raw)| match (tag, raw) {
            (SPAN_ATTRIBUTES, Raw::Len(body)) => Some(AttributeView::read(body)),
            _ => None,
        })
    }

    /// The events in wire order.
    pub fn events(&self) -> impl Iterator<Item = EventView<'a>> + use<'a> {
        Fields::new(self.bytes).filter_map(|(tag, raw)| match (tag, raw) {
            (SPAN_EVENTS, Raw::Len(body)) => Some(EventView::read(body)),
            _ => None,
        })
    }
}

/// The fields of one message in wire order, unknown groups skipped. Meant for bytes that
/// already passed [`SpanView::parse`]; on anything else it ends at the first error. Groups are
/// skipped with a nesting counter, so hostile input cannot make it recurse.
struct Fields<'a> {
    buf: &'a [u8],
    /// The walk ended at an error rather than at the end.
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, failed: false }
    }

    fn fail(&mut self) -> Option<(u32, Raw<'a>)> {
        self.buf = &[];
        self.failed = true;
        None
    }

    fn skip_group(&mut self) -> Option<()> {
        let mut open = 1usize;
        while open > 0 {
            match read_field(&mut self.buf).ok()?.1 {
                Raw::StartGroup => open += 1,
                Raw::EndGroup => open -= 1,
                _ => {}
            }
        }
        Some(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u32, Raw<'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.buf.is_empty() {
                return None;
            }
            let Ok((tag, raw)) = read_field(&mut self.buf) else {
                return self.fail();
            };
            match raw {
                Raw::StartGroup => {
                    if self.skip_group().is_none() {
                        return self.fail();
                    }
                }
                Raw::EndGroup => return self.fail(),
                _ => return Some((tag, raw)),
            }
        }
    }
}

/// One attribute (`KeyValue`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttributeView<'a> {
    /// The key (empty when absent).
    pub key: &'a str,
    /// The value ([`ValueView::Empty`] when absent).
    pub value: ValueView<'a>,
}

impl<'a> AttributeView<'a> {
    fn read(body: &'a [u8]) -> Self {
        let mut view = AttributeView {
            key: "",
            value: ValueView::Empty,
        };
        for (tag, raw) in Fields::new(body) {
            match (tag, raw) {
                // Checked UTF-8 by the parse; checked again (cheaply) to stay safe code.
                (KV_KEY, Raw::Len(b)) => view.key = std::str::from_utf8(b).unwrap_or_default(),
                (KV_VALUE, Raw::Len(b)) => view.value = ValueView::read(b),
                _ => {}
            }
        }
        view
    }
}

/// An attribute value (`AnyValue`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueView<'a> {
    /// No value, no variant set, or a profiles string-table index (`string_value_strindex`,
    /// which non-profiling receivers are to treat as absent).
    Empty,
    /// `string_value`.
    Str(&'a str),
    /// `bool_value`.
    Bool(bool),
    /// `int_value`.
    Int(i64),
    /// `double_value`.
    Double(f64),
    /// `bytes_value`.
    Bytes(&'a [u8]),
    /// `array_value`.
    Array(ArrayView<'a>),
    /// `kvlist_value`.
    KvList(KvListView<'a>),
}

impl<'a> ValueView<'a> {
    /// The last value field wins, as in prost's oneof decoding (a canonical `AnyValue` with a
    /// message variant has no other value field, so there is nothing to merge).
    fn read(body: &'a [u8]) -> Self {
        let mut value = ValueView::Empty;
        for (tag, raw) in Fields::new(body) {
            value = match (tag, raw) {
                (ANY_STRING, Raw::Len(b)) => {
                    ValueView::Str(std::str::from_utf8(b).unwrap_or_default())
                }
                (ANY_BOOL, Raw::Varint(v)) => ValueView::Bool(v != 0),
                // prost's int64 decoding: the varint's 64 bits reinterpreted.
                (ANY_INT, Raw::Varint(v)) => ValueView::Int(v as i64),
                (ANY_DOUBLE, Raw::Fixed64(v)) => ValueView::Double(f64::from_bits(v)),
                (ANY_ARRAY, Raw::Len(b)) => ValueView::Array(ArrayView { bytes: b }),
                (ANY_KVLIST, Raw::Len(b)) => ValueView::KvList(KvListView { bytes: b }),
                (ANY_BYTES, Raw::Len(b)) => ValueView::Bytes(b),
                (ANY_STRINDEX, Raw::Varint(_)) => ValueView::Empty,
                _ => continue,
            };
        }
        value
    }
}

/// An `ArrayValue`, read on demand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrayView<'a> {
    bytes: &'a [u8],
}

impl<'a> ArrayView<'a> {
    /// The elements in wire order.
    pub fn values(&self) -> impl Iterator<Item = ValueView<'a>> + use<'a> {
        Fields::new(self.bytes).filter_map(|(tag, raw)| match (tag, raw) {
            (LIST_VALUES, Raw::Len(body)) => Some(ValueView::read(body)),
            _ => None,
        })
    }
}

/// A `KeyValueList`, read on demand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvListView<'a> {
    bytes: &'a [u8],
}

impl<'a> KvListView<'a> {
    /// The entries in wire order.
    pub fn values(&self) -> impl Iterator<Item = AttributeView<'a>> + use<'a> {
        Fields::new(self.bytes).filter_map(|(tag, raw)| match (tag, raw) {
            (LIST_VALUES, Raw::Len(body)) => Some(AttributeView::read(body)),
            _ => None,
        })
    }
}

/// A span event (`Span.Event`): the fields the agent reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventView<'a> {
    /// `name`.
    pub name: &'a str,
    /// `time_unix_nano`.
    pub time_unix_nano: u64,
}

impl<'a> EventView<'a> {
    fn read(body: &'a [u8]) -> Self {
        let mut view = EventView {
            name: "",
            time_unix_nano: 0,
        };
        for (tag, raw) in Fields::new(body) {
            match (tag, raw) {
                (EVENT_NAME, Raw::Len(b)) => view.name = std::str::from_utf8(b).unwrap_or_default(),
                (EVENT_TIME, Raw::Fixed64(t)) => view.time_unix_nano = t,
                _ => {}
            }
        }
        view
    }
}

// ---------------------------------------------------------------- rewriting

/// Writes `span` to `out` with the string value of every attribute (top-level span attributes
/// only) whose key is `key` replaced by `replace(old)`. Each replaced attribute is re-encoded
/// in place (same position among the span's fields): its `KeyValue` fields are copied as they
/// were except the value, which becomes an `AnyValue` holding only the new string; every other
/// byte of the span is copied as it was. Attributes with that key but a non-string value are
/// left alone. Returns false and leaves `out` unchanged when no attribute was replaced.
///
/// `span` has passed [`SpanView::parse`]; on bytes that did not, the result is false and `out`
/// unchanged when the walk meets an error.
pub fn rewrite_str_attributes(
    span: &[u8],
    key: &str,
    mut replace: impl FnMut(&str) -> String,
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    match rewrite(span, key, &mut replace, out) {
        Ok(true) => true,
        Ok(false) | Err(_) => {
            out.truncate(start);
            false
        }
    }
}

fn rewrite(
    span: &[u8],
    key: &str,
    replace: &mut impl FnMut(&str) -> String,
    out: &mut Vec<u8>,
) -> Walk<bool> {
    // Bytes of `span` before `copied` are in `out` already. Nothing is written before the
    // first match, so a span without one costs no copy.
    let mut copied = 0;
    let mut replaced = false;
    let mut buf = span;
    while !buf.is_empty() {
        let field_start = span.len() - buf.len();
        let (tag, raw) = read_field(&mut buf)?;
        if let Raw::StartGroup = raw {
            // Unknown group at the top level: skip its contents (already checked by parse).
            let mut fields = Fields::new(buf);
            fields.skip_group().ok_or("unterminated group")?;
            buf = fields.buf;
            continue;
        }
        let (SPAN_ATTRIBUTES, Raw::Len(body)) = (tag, raw) else {
            continue;
        };
        let attribute = AttributeView::read(body);
        let ValueView::Str(old) = attribute.value else {
            continue;
        };
        if attribute.key != key {
            continue;
        }
        let new = replace(old);
        out.extend_from_slice(&span[copied..field_start]);
        write_key_value(body, &new, out)?;
        copied = span.len() - buf.len();
        replaced = true;
    }
    if replaced {
        out.extend_from_slice(&span[copied..]);
    }
    Ok(replaced)
}

/// Writes span field 9 (`attributes`) holding the `KeyValue` `body` with its value field
/// replaced by a string `AnyValue`, in the value's place; the other fields are copied.
fn write_key_value(body: &[u8], new: &str, out: &mut Vec<u8>) -> Walk<()> {
    let value_len = field_len(ANY_STRING, new.len());
    // Find the value field (one, the span being canonical); the rest is copied around it.
    let mut buf = body;
    let mut value_range = None;
    while !buf.is_empty() {
        let field_start = body.len() - buf.len();
        let (tag, raw) = read_field(&mut buf)?;
        if let Raw::StartGroup = raw {
            let mut fields = Fields::new(buf);
            fields.skip_group().ok_or("unterminated group")?;
            buf = fields.buf;
        } else if tag == KV_VALUE {
            value_range = Some((field_start, body.len() - buf.len()));
        }
    }
    let (before, after) = match value_range {
        Some((start, end)) => (&body[..start], &body[end..]),
        // A string value was found, so there is a value field; kept total for safety.
        None => (body, &[][..]),
    };
    let kv_len = before.len() + field_len(KV_VALUE, value_len) + after.len();
    put_len_key(SPAN_ATTRIBUTES, kv_len, out);
    out.extend_from_slice(before);
    put_len_key(KV_VALUE, value_len, out);
    put_len_key(ANY_STRING, new.len(), out);
    out.extend_from_slice(new.as_bytes());
    out.extend_from_slice(after);
    Ok(())
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
