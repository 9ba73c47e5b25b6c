//! The checking walk of [`super::SpanView::parse`] below the span's own fields: key-values,
//! values, events, links and the status, with their limits and canonical form.

use super::field::*;
use super::{LimitError, WireLimits};

/// State of one [`SpanView::parse`] walk: the first limit broken, and whether a singular
/// message repeated. Both are reported only after the whole span proved decodable.
pub(super) struct Checker {
    pub(super) limits: WireLimits,
    pub(super) limit: Option<LimitError>,
    pub(super) not_canonical: bool,
}

impl Checker {
    fn broke(&mut self, error: LimitError) {
        if self.limit.is_none() {
            self.limit = Some(error);
        }
    }

    pub(super) fn count(&mut self, owner: &'static str, count: usize) {
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
    pub(super) fn key_value(&mut self, mut buf: &[u8], budget: u32, depth: usize) -> Walk<()> {
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
    pub(super) fn event(&mut self, mut buf: &[u8], budget: u32) -> Walk<()> {
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
    pub(super) fn link(&mut self, mut buf: &[u8], budget: u32) -> Walk<()> {
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
    pub(super) fn status(mut buf: &[u8], budget: u32) -> Walk<()> {
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
