//! The held-span buffer: each runtime request span waits here, encoded, until the correlator
//! has joined it, then waits in the outgoing list for the facts that follow its join (the GPU
//! side) and leaves with the next flush, regrouped by the resource and scope it came with.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::trace::v1::Span;

use crate::otlp_wire::batch::{EncodedGroup, EncodedSpan, SpanBatch, SpanGroup};

/// A request span waiting for its join: encoded, since it waits a few hundred ms or more (see
/// [`EncodedSpan`]), with the resource and scope it shares with the spans it came with.
#[derive(Debug)]
struct Held {
    group: Arc<SpanGroup>,
    span: EncodedSpan,
}

/// A span's (trace id, span id).
pub(super) type SpanKey = ([u8; 16], [u8; 8]);

/// The buffer's tables keyed by (trace id, span id), touched several times per span. SipHash
/// (std's default) was a visible share of the per-span cost; foldhash is several times cheaper
/// and still seeded per table, so span ids chosen by a client cannot be aimed at one bucket.
type SpanMap<V> = HashMap<SpanKey, V, foldhash::fast::RandomState>;

/// Spans waiting for their join, and joined spans waiting for the next flush.
#[derive(Debug)]
pub(super) struct HeldSpans {
    held: SpanMap<Held>,
    max_held: usize,
    outgoing: Vec<Held>,
    /// Position in `outgoing` by (trace id, span id): the GPU facts of a request follow its
    /// join and are added to the same span before it leaves.
    outgoing_index: SpanMap<usize>,
    /// Spans forwarded without enrichment because the table was full or a duplicate.
    pub(super) overflow: u64,
}

impl HeldSpans {
    /// A buffer holding at most `max_held` spans waiting for their join.
    pub(super) fn new(max_held: usize) -> Self {
        Self {
            held: SpanMap::default(),
            max_held,
            outgoing: Vec::new(),
            outgoing_index: SpanMap::default(),
            overflow: 0,
        }
    }

    /// Spans waiting for their join.
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds `span` until the join of `key`; gives it back (counted in `overflow`) when the
    /// table is full or already holds that span.
    pub(super) fn hold(
        &mut self,
        key: SpanKey,
        group: &Arc<SpanGroup>,
        span: EncodedSpan,
    ) -> Result<(), EncodedSpan> {
        if self.held.len() >= self.max_held || self.held.contains_key(&key) {
            self.overflow += 1;
            return Err(span);
        }
        self.held.insert(
            key,
            Held {
                group: Arc::clone(group),
                span,
            },
        );
        Ok(())
    }

    /// Moves the span of `key` to the outgoing list (it joined) and returns it for enrichment;
    /// `None` when it is not held (forwarded earlier as overflow).
    pub(super) fn release(&mut self, key: SpanKey) -> Option<&mut EncodedSpan> {
        let held = self.held.remove(&key)?;
        self.outgoing_index.insert(key, self.outgoing.len());
        self.outgoing.push(held);
        self.outgoing.last_mut().map(|h| &mut h.span)
    }

    /// The released span of `key`, until the next flush.
    pub(super) fn outgoing_mut(&mut self, key: SpanKey) -> Option<&mut EncodedSpan> {
        let &at = self.outgoing_index.get(&key)?;
        self.outgoing.get_mut(at).map(|h| &mut h.span)
    }

    /// Releases every held span as it is (unenriched): used at shutdown.
    pub(super) fn release_all(&mut self) {
        let held: Vec<Held> = self.held.drain().map(|(_, h)| h).collect();
        self.outgoing.extend(held);
    }

    /// The released spans, one group per received (resource, scope), and `findings`, as one
    /// batch; `None` when there is nothing to send.
    pub(super) fn take_batch(&mut self, findings: &mut Vec<Span>) -> Option<SpanBatch> {
        if self.outgoing.is_empty() && findings.is_empty() {
            return None;
        }
        self.outgoing_index.clear();
        let mut batch = SpanBatch::default();
        // One group per received (resource, scope).
        for held in self.outgoing.drain(..) {
            match batch
                .encoded
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g.group, &held.group))
            {
                Some(g) => g.spans.push(held.span),
                None => batch.encoded.push(EncodedGroup {
                    group: held.group,
                    spans: vec![held.span],
                }),
            }
        }
        for span in findings.drain(..) {
            batch.push_finding(span);
        }
        Some(batch)
    }
}
