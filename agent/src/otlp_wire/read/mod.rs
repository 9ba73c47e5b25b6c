//! A borrowing, allocation-free reader of one `Span`'s protobuf encoding.
//!
//! - `field`: the raw field reader (keys, varints, lengths, skipping) and the field numbers;
//! - `check`: the checking walk [`SpanView::parse`] runs over nested messages (limits,
//!   canonical form);
//! - `view`: [`SpanView`] and the views of attributes, values and events read on demand;
//! - `rewrite`: [`rewrite_str_attributes`], a copy of a span with string attributes replaced.
//!
//! Decoding a span into prost's owned `Span` allocates every id, name, key and string value
//! (~33 allocations for a vLLM span) although the agent reads only a handful of them. Here a
//! span stays the bytes it arrived as, and [`SpanView::parse`] walks those bytes once,
//! checking everything the prost decode plus the receiver's [`crate::sources::otlp::validate`]
//! would have checked, and keeps slices into them. [`SpanView::attributes`] and
//! [`SpanView::events`] walk the top-level fields again on demand (attributes may be
//! interleaved with other fields, so there is no single range to keep), and
//! [`rewrite_str_attributes`] copies a span with some string attributes replaced.
//!
//! # Matching prost
//!
//! [`SpanView::parse`] accepts exactly the spans for which, when the span is one of the `spans`
//! of an `ExportTraceServiceRequest`, `ExportTraceServiceRequest::decode` succeeds,
//! [`crate::sources::otlp::validate`] accepts the span's attribute lists, and the span is
//! canonical (below):
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

mod check;
mod field;
mod rewrite;
mod view;

pub use self::rewrite::rewrite_str_attributes;
pub use self::view::{ArrayView, AttributeView, EventView, KvListView, SpanView, ValueView};

/// The recursion budget prost has left when it reads a span's fields inside an
/// `ExportTraceServiceRequest`: 100 at the request, minus one per message entered (the
/// `ResourceSpans`, the `ScopeSpans`, the `Span`). Checked against prost in the tests.
pub(crate) const SPAN_FIELD_BUDGET: u32 = 97;

/// Limits applied while walking (same meaning as the OTLP receiver's
/// [`crate::sources::otlp::validate`]: attribute count per list, `AnyValue` depth).
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

/// An attribute limit of [`WireLimits`] broken (also the OTLP receiver's
/// [`crate::sources::otlp::validate`] error on a decoded request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many attributes in one list.
    #[error("{count} attributes on one {owner}, the limit is {limit}")]
    TooManyAttributes {
        /// span, resource, scope, event or link.
        owner: &'static str,
        /// The count found.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// An `AnyValue` nested too deeply.
    #[error("attribute value nested deeper than {limit}")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
}

#[cfg(test)]
mod tests;
