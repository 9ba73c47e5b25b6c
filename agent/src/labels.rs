//! Bounded metric label values: one type for every label whose values come from the traffic
//! (models, tenants), shared by the metrics sink and the correlator. At most `max` values get
//! their own label; the others are reported as [`OTHER`], so that a series count never grows
//! with what clients send.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// The label value of everything beyond the bound.
pub const OTHER: &str = "other";

/// The label value of a missing value (no model, no tenant).
pub const UNKNOWN: &str = "unknown";

/// Which values keep a label of their own once the bound is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// The first `max` distinct values, for good.
    FirstCome,
    /// Sticky top `max`: the first `max` values counted get a label; afterwards a value
    /// counted more than twice as often as the least counted labelled one takes that one's
    /// place (whose later counts go to [`OTHER`]). Counts are kept for at most `16 * max`
    /// candidates.
    StickyTop,
}

#[derive(Debug, Default)]
struct State {
    /// Occurrences per candidate (only under [`Policy::StickyTop`]).
    counts: HashMap<String, u64>,
    /// The values that have a label of their own.
    labelled: HashSet<String>,
}

/// Keeps a label's cardinality bounded (see the module). Thread-safe: the metrics share it
/// between tasks; the correlator owns its own.
#[derive(Debug)]
pub struct BoundedLabel {
    max: usize,
    policy: Policy,
    /// Values reported as themselves without counting against the bound (the correlator's
    /// `self` and `other` tenants).
    reserved: &'static [&'static str],
    state: Mutex<State>,
}

impl BoundedLabel {
    /// A label that keeps the first `max` distinct values; every later one is [`OTHER`].
    pub fn new(max: usize) -> Self {
        Self::with_policy(max, Policy::FirstCome)
    }

    /// A label that keeps the `max` most counted values, sticky so that a labelled value's
    /// counter stays monotonic: the first `max` values counted get a label; afterwards a value
    /// counted more than twice as often as the least counted labelled one takes its place
    /// (whose later counts go to [`OTHER`]). Counts are kept for at most `16 * max` candidates.
    pub fn sticky_top(max: usize) -> Self {
        Self::with_policy(max, Policy::StickyTop)
    }

    fn with_policy(max: usize, policy: Policy) -> Self {
        Self {
            max,
            policy,
            reserved: &[],
            state: Mutex::new(State::default()),
        }
    }

    /// The same label, reporting `reserved` values as themselves, uncounted.
    pub fn passing(mut self, reserved: &'static [&'static str]) -> Self {
        self.reserved = reserved;
        self
    }

    /// The label value to use for `value` ([`UNKNOWN`] when `None`).
    pub fn get(&self, value: Option<&str>) -> String {
        self.label(value.unwrap_or(UNKNOWN))
    }

    /// Counts one occurrence of `value` and returns its label value (`value` or [`OTHER`]).
    pub fn label(&self, value: &str) -> String {
        if self.reserved.contains(&value) {
            return value.to_owned();
        }
        let Ok(mut state) = self.state.lock() else {
            return OTHER.to_owned();
        };
        let kept = match self.policy {
            Policy::FirstCome => state.first_come(value, self.max),
            Policy::StickyTop => state.sticky_top(value, self.max),
        };
        if kept {
            value.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

impl State {
    fn first_come(&mut self, value: &str, max: usize) -> bool {
        if self.labelled.contains(value) {
            return true;
        }
        if self.labelled.len() < max {
            self.labelled.insert(value.to_owned());
            return true;
        }
        false
    }

    fn sticky_top(&mut self, value: &str, k: usize) -> bool {
        let room = self.counts.len() < k.saturating_mul(16).max(1);
        let count = match self.counts.get_mut(value) {
            Some(c) => {
                *c += 1;
                *c
            }
            None if room => {
                self.counts.insert(value.to_owned(), 1);
                1
            }
            None => return false,
        };
        if self.labelled.contains(value) {
            return true;
        }
        if self.labelled.len() < k {
            self.labelled.insert(value.to_owned());
            return true;
        }
        let weakest = self
            .labelled
            .iter()
            .map(|t| (self.counts.get(t).copied().unwrap_or(0), t.clone()))
            .min();
        match weakest {
            Some((least, name)) if count > least.saturating_mul(2) => {
                self.labelled.remove(&name);
                self.labelled.insert(value.to_owned());
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_caps_cardinality() {
        let label = BoundedLabel::new(2);
        assert_eq!(label.get(Some("a")), "a");
        assert_eq!(label.get(Some("b")), "b");
        assert_eq!(label.get(Some("c")), OTHER);
        assert_eq!(label.get(Some("a")), "a");
        assert_eq!(label.get(None), OTHER);
    }

    #[test]
    fn sticky_top_is_bounded_and_sticky() {
        let l = BoundedLabel::sticky_top(2).passing(&["self", OTHER]);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OTHER);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("self"), "self");
        // c grows to more than twice b's count and takes its label.
        for _ in 0..3 {
            l.label("c");
        }
        assert_eq!(l.label("c"), "c");
        assert_eq!(l.label("b"), OTHER);
    }
}
