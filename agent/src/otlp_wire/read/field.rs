//! The raw field reader: one key and value at a time, prost's checks, the field numbers the
//! walks match on, and [`Fields`], the iterator the views read validated bytes with.

use prost::encoding::{WireType, decode_key, decode_varint};

// Field numbers: opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
// Field numbers: opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
pub(super) const SPAN_TRACE_ID: u32 = 1;
pub(super) const SPAN_SPAN_ID: u32 = 2;
pub(super) const SPAN_TRACE_STATE: u32 = 3;
pub(super) const SPAN_PARENT_SPAN_ID: u32 = 4;
pub(super) const SPAN_NAME: u32 = 5;
pub(super) const SPAN_KIND: u32 = 6;
pub(super) const SPAN_START: u32 = 7;
pub(super) const SPAN_END: u32 = 8;
pub(super) const SPAN_ATTRIBUTES: u32 = 9;
pub(super) const SPAN_DROPPED_ATTRIBUTES: u32 = 10;
pub(super) const SPAN_EVENTS: u32 = 11;
pub(super) const SPAN_DROPPED_EVENTS: u32 = 12;
pub(super) const SPAN_LINKS: u32 = 13;
pub(super) const SPAN_DROPPED_LINKS: u32 = 14;
pub(super) const SPAN_STATUS: u32 = 15;
pub(super) const SPAN_FLAGS: u32 = 16;

pub(super) const EVENT_TIME: u32 = 1;
pub(super) const EVENT_NAME: u32 = 2;
pub(super) const EVENT_ATTRIBUTES: u32 = 3;
pub(super) const EVENT_DROPPED_ATTRIBUTES: u32 = 4;

pub(super) const LINK_TRACE_ID: u32 = 1;
pub(super) const LINK_SPAN_ID: u32 = 2;
pub(super) const LINK_TRACE_STATE: u32 = 3;
pub(super) const LINK_ATTRIBUTES: u32 = 4;
pub(super) const LINK_DROPPED_ATTRIBUTES: u32 = 5;
pub(super) const LINK_FLAGS: u32 = 6;

pub(super) const STATUS_MESSAGE: u32 = 2;
pub(super) const STATUS_CODE: u32 = 3;

pub(super) const KV_KEY: u32 = 1;
pub(super) const KV_VALUE: u32 = 2;
pub(super) const KV_KEY_STRINDEX: u32 = 3;

pub(super) const ANY_STRING: u32 = 1;
pub(super) const ANY_BOOL: u32 = 2;
pub(super) const ANY_INT: u32 = 3;
pub(super) const ANY_DOUBLE: u32 = 4;
pub(super) const ANY_ARRAY: u32 = 5;
pub(super) const ANY_KVLIST: u32 = 6;
pub(super) const ANY_BYTES: u32 = 7;
pub(super) const ANY_STRINDEX: u32 = 8;

/// `ArrayValue.values` and `KeyValueList.values`.
pub(super) const LIST_VALUES: u32 = 1;

/// One field's value as it sits on the wire.
#[derive(Debug, Clone, Copy)]
pub(super) enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
    /// The group's fields follow in the buffer; the caller skips them.
    StartGroup,
    EndGroup,
}

pub(super) type Walk<T> = Result<T, &'static str>;

pub(super) const RECURSION: &str = "recursion limit reached";
pub(super) const WRONG_WIRE_TYPE: &str = "unexpected wire type";

/// prost's `decode_varint`, with the one-byte case (keys of fields 1-15, short lengths, small
/// numbers: most of a span) handled inline; prost's function is not inlined here and was a
/// seventh of the walk.
#[inline(always)]
pub(super) fn read_varint(buf: &mut &[u8]) -> Walk<u64> {
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
pub(super) fn read_key(buf: &mut &[u8]) -> Walk<(u32, WireType)> {
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
pub(super) fn read_field<'a>(buf: &mut &'a [u8]) -> Walk<(u32, Raw<'a>)> {
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
pub(super) fn len(raw: Raw<'_>) -> Walk<&[u8]> {
    match raw {
        Raw::Len(body) => Ok(body),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

pub(super) const NOT_UTF8: &str = "string field is not UTF-8";

#[inline]
pub(super) fn string(raw: Raw<'_>) -> Walk<&str> {
    std::str::from_utf8(len(raw)?).map_err(|_| NOT_UTF8)
}

/// [`string`] where only validity matters: keys and values are mostly ASCII, which an inlined
/// check settles faster than the call into `from_utf8`.
#[inline]
pub(super) fn check_string(raw: Raw<'_>) -> Walk<()> {
    let bytes = len(raw)?;
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(NOT_UTF8)
    }
}

#[inline]
pub(super) fn varint(raw: Raw<'_>) -> Walk<u64> {
    match raw {
        Raw::Varint(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

#[inline]
pub(super) fn fixed64(raw: Raw<'_>) -> Walk<u64> {
    match raw {
        Raw::Fixed64(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

#[inline]
pub(super) fn fixed32(raw: Raw<'_>) -> Walk<u32> {
    match raw {
        Raw::Fixed32(v) => Ok(v),
        _ => Err(WRONG_WIRE_TYPE),
    }
}

/// prost's `message::merge` entry check: a nested message needs budget left, and its fields
/// are read with one level less.
#[inline]
pub(super) fn enter(budget: u32) -> Walk<u32> {
    budget.checked_sub(1).ok_or(RECURSION)
}

/// prost's `skip_field` for an unknown field already read by [`read_field`]: needs budget
/// left (for every wire type, as prost checks before looking at it); a group's fields are
/// skipped one level down and it must close with its own tag. Recursion is bounded by
/// `budget`.
pub(super) fn skip(tag: u32, raw: Raw<'_>, buf: &mut &[u8], budget: u32) -> Walk<()> {
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

/// The fields of one message in wire order, unknown groups skipped. Meant for bytes that
/// already passed [`SpanView::parse`]; on anything else it ends at the first error. Groups are
/// skipped with a nesting counter, so hostile input cannot make it recurse.
pub(super) struct Fields<'a> {
    pub(super) buf: &'a [u8],
    /// The walk ended at an error rather than at the end.
    pub(super) failed: bool,
}

impl<'a> Fields<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, failed: false }
    }

    fn fail(&mut self) -> Option<(u32, Raw<'a>)> {
        self.buf = &[];
        self.failed = true;
        None
    }

    pub(super) fn skip_group(&mut self) -> Option<()> {
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
