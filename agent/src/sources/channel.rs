//! A named, bounded channel from a source to the pipeline, with fill gauges.
//!
//! Each source (`kernel`, `nvml`, `kv_events`, `otlp`) sends on its own [`SourceSender`]; the
//! pipeline reads the matching [`SourceReceiver`]. Sources never wait on it: they use
//! [`SourceSender::try_send`] and count what a full channel drops in their own counters
//! (`inferwatch_events_dropped_total{reason="channel_full"}`, or the receiver's
//! `queue_full` rejections). The gauges `inferwatch_source_queue_depth{source}` (messages
//! waiting) and `inferwatch_source_queue_capacity{source}` (the bound) show how full each
//! channel is, as `inferwatch_queue_depth` does for the sink queues. A message is what the
//! source sends: a batch of kernel events, one GPU sample, a batch of KV events, one OTLP
//! export request.

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use crate::internal_events::{AgentMetrics, SourceQueueLabels};

/// The sending side, owned (or cloned) by the source.
#[derive(Debug)]
pub struct SourceSender<T> {
    tx: mpsc::Sender<T>,
    depth: Gauge,
}

/// The receiving side, owned by the pipeline.
#[derive(Debug)]
pub struct SourceReceiver<T> {
    source: &'static str,
    rx: mpsc::Receiver<T>,
    depth: Gauge,
}

/// Creates the channel of `source` holding at most `capacity` messages (at least one), and
/// registers its gauges' label values in `metrics`.
pub fn source_channel<T>(
    source: &'static str,
    capacity: usize,
    metrics: &AgentMetrics,
) -> (SourceSender<T>, SourceReceiver<T>) {
    let capacity = capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let labels = SourceQueueLabels { source };
    metrics
        .source_queue_capacity
        .get_or_create(&labels)
        .set(capacity as i64);
    // A gauge is a shared atomic: the clone is the family's value, resolved once here so that
    // a send costs one atomic add, not a family lookup.
    let depth = metrics.source_queue_depth.get_or_create(&labels).clone();
    depth.set(0);
    (
        SourceSender {
            tx,
            depth: depth.clone(),
        },
        SourceReceiver { source, rx, depth },
    )
}

impl<T> Clone for SourceSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            depth: self.depth.clone(),
        }
    }
}

impl<T> SourceSender<T> {
    /// Sends `value` without waiting, as [`mpsc::Sender::try_send`] (the value comes back in
    /// the error when the channel is full or the pipeline is gone).
    ///
    /// # Errors
    /// [`TrySendError::Full`] when `capacity` messages are waiting; [`TrySendError::Closed`]
    /// when the receiver was dropped.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        // Counted before the send, so that the receiver's decrement never runs first.
        self.depth.inc();
        let sent = self.tx.try_send(value);
        if sent.is_err() {
            self.depth.dec();
        }
        sent
    }

    /// Reserves a slot without waiting, for a source that must know there is room before it
    /// does the work that makes the value.
    ///
    /// # Errors
    /// As [`SourceSender::try_send`], with no value to give back.
    pub fn try_reserve(&self) -> Result<SourcePermit<'_, T>, TrySendError<()>> {
        let permit = self.tx.try_reserve()?;
        Ok(SourcePermit {
            permit,
            depth: &self.depth,
        })
    }

    /// Whether the receiver was dropped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A slot reserved by [`SourceSender::try_reserve`].
#[derive(Debug)]
pub struct SourcePermit<'a, T> {
    permit: mpsc::Permit<'a, T>,
    depth: &'a Gauge,
}

impl<T> SourcePermit<'_, T> {
    /// Fills the slot (it cannot fail).
    pub fn send(self, value: T) {
        // Counted before the send, so that the receiver's decrement never runs first.
        self.depth.inc();
        self.permit.send(value);
    }
}

impl<T> SourceReceiver<T> {
    /// The next message; `None` once every sender is gone and the channel is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let value = self.rx.recv().await?;
        self.depth.dec();
        Some(value)
    }

    /// The next message if one is waiting.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] when none is; [`TryRecvError::Disconnected`] when every sender
    /// is gone and the channel is empty.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let value = self.rx.try_recv()?;
        self.depth.dec();
        Ok(value)
    }

    /// The source's name (the `source` label).
    pub fn source(&self) -> &'static str {
        self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_depth_gauge_follows_sends_receives_and_drops() {
        let metrics = AgentMetrics::default();
        let (tx, mut rx) = source_channel::<u32>("kernel", 2, &metrics);
        assert_eq!(rx.source(), "kernel");
        assert_eq!(metrics.source_capacity("kernel"), 2);
        assert_eq!(metrics.source_depth("kernel"), 0);

        tx.try_send(1).expect("room");
        tx.clone().try_send(2).expect("room");
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(
            metrics.source_depth("kernel"),
            2,
            "a refused send is not counted"
        );

        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(metrics.source_depth("kernel"), 1);
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(metrics.source_depth("kernel"), 0);

        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(4), Err(TrySendError::Closed(4))));
        assert_eq!(metrics.source_depth("kernel"), 0);
    }

    #[test]
    fn a_zero_capacity_is_one() {
        let metrics = AgentMetrics::default();
        let (tx, _rx) = source_channel::<u32>("nvml", 0, &metrics);
        assert_eq!(metrics.source_capacity("nvml"), 1);
        tx.try_send(1).expect("room for one");
    }
}
