//! Views of a span read in place: [`SpanView`] and, on demand, its attributes, values and
//! events.

use super::check::Checker;
use super::field::*;
use super::{SPAN_FIELD_BUDGET, WireError, WireLimits};

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
    pub(super) fn empty(bytes: &'a [u8]) -> Self {
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
    /// of a span inside an export request), the receiver's [`crate::sources::otlp::validate`]
    /// would accept the span's attribute lists (the span's, every event's and every link's:
    /// at most `limits.max_attributes` each, nested key-value lists included; `AnyValue` depth
    /// at most `limits.max_value_depth`, a top-level attribute value being depth 1), and the
    /// span is canonical (see [`WireError::NotCanonical`]).
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

/// One attribute (`KeyValue`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttributeView<'a> {
    /// The key (empty when absent).
    pub key: &'a str,
    /// The value ([`ValueView::Empty`] when absent).
    pub value: ValueView<'a>,
}

impl<'a> AttributeView<'a> {
    pub(super) fn read(body: &'a [u8]) -> Self {
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
    pub(super) fn read(body: &'a [u8]) -> Self {
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
    pub(super) fn read(body: &'a [u8]) -> Self {
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
