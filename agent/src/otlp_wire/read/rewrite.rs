//! A copy of a span with some string attributes replaced, every other byte as it was.

use super::field::*;
use super::view::{AttributeView, ValueView};
use crate::otlp_wire::write::{field_len, put_len_key};

/// Writes `span` to `out` with the string value of every attribute (top-level span attributes
/// only) whose key is `key` replaced by `replace(old)`. Each replaced attribute is re-encoded
/// in place (same position among the span's fields): its `KeyValue` fields are copied as they
/// were except the value, which becomes an `AnyValue` holding only the new string; every other
/// byte of the span is copied as it was. Attributes with that key but a non-string value are
/// left alone. Returns false and leaves `out` unchanged when no attribute was replaced.
///
/// `span` has passed [`super::SpanView::parse`]; on bytes that did not, the result is false and `out`
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
