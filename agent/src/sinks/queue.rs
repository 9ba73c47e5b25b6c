//! A named, bounded queue of [`SpanBatch`]es in front of a sink.
//!
//! Bounded twice: by batches (the channel) and by spans (a counter), so that a few huge
//! batches cannot hold unbounded memory while the backend is down. [`SinkSender::send`] never
//! waits: when either bound is reached the batch is dropped and counted, so that a slow or dead
//! backend can never stall the receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::internal_events::SpansDropped;
use crate::internal_events::{AgentMetrics, DropStage, QueueLabels};
use crate::otlp_wire::batch::SpanBatch;

/// The sending side, cloned into the pipeline.
#[derive(Debug, Clone)]
pub struct SinkSender {
    name: &'static str,
    tx: mpsc::Sender<SpanBatch>,
    state: Arc<QueueState>,
    metrics: Arc<AgentMetrics>,
}

/// The receiving side, owned by the sink's `run`.
#[derive(Debug)]
pub struct SinkReceiver {
    name: &'static str,
    rx: mpsc::Receiver<SpanBatch>,
    state: Arc<QueueState>,
    metrics: Arc<AgentMetrics>,
}

#[derive(Debug)]
struct QueueState {
    spans: AtomicUsize,
    max_spans: usize,
}

/// Creates the queue `name` holding at most `max_batches` batches and `max_spans` spans.
pub fn sink_queue(
    name: &'static str,
    max_batches: usize,
    max_spans: usize,
    metrics: Arc<AgentMetrics>,
) -> (SinkSender, SinkReceiver) {
    let (tx, rx) = mpsc::channel(max_batches.max(1));
    let state = Arc::new(QueueState {
        spans: AtomicUsize::new(0),
        max_spans: max_spans.max(1),
    });
    metrics
        .queue_capacity
        .get_or_create(&QueueLabels { queue: name })
        .set(max_spans as i64);
    (
        SinkSender {
            name,
            tx,
            state: state.clone(),
            metrics: metrics.clone(),
        },
        SinkReceiver {
            name,
            rx,
            state,
            metrics,
        },
    )
}

impl SinkSender {
    /// Queues `batch` without waiting. Returns false (and counts the drop) when the queue is
    /// full or the sink has stopped.
    pub fn send(&self, batch: SpanBatch) -> bool {
        let n = batch.span_count();
        let reserved = self
            .state
            .spans
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= self.state.max_spans).then_some(cur + n)
            })
            .is_ok();
        if !reserved {
            self.dropped(n);
            return false;
        }
        match self.tx.try_send(batch) {
            Ok(()) => {
                self.update_gauge();
                true
            }
            Err(_) => {
                self.state.spans.fetch_sub(n, Ordering::AcqRel);
                self.dropped(n);
                false
            }
        }
    }

    /// Spans waiting in the queue.
    pub fn depth(&self) -> usize {
        self.state.spans.load(Ordering::Acquire)
    }

    fn dropped(&self, count: usize) {
        SpansDropped {
            sink: self.name,
            stage: DropStage::SinkQueue,
            count,
        }
        .emit(&self.metrics);
    }

    fn update_gauge(&self) {
        set_depth(&self.metrics, self.name, &self.state);
    }
}

fn set_depth(metrics: &AgentMetrics, name: &'static str, state: &QueueState) {
    metrics
        .queue_depth
        .get_or_create(&QueueLabels { queue: name })
        .set(state.spans.load(Ordering::Acquire) as i64);
}

impl SinkReceiver {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<SpanBatch> {
        let batch = self.rx.recv().await?;
        self.release(&batch);
        Some(batch)
    }

    /// The next batch if one is waiting.
    pub fn try_recv(&mut self) -> Option<SpanBatch> {
        let batch = self.rx.try_recv().ok()?;
        self.release(&batch);
        Some(batch)
    }

    /// The queue's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn release(&self, batch: &SpanBatch) {
        self.state
            .spans
            .fetch_sub(batch.span_count(), Ordering::AcqRel);
        set_depth(&self.metrics, self.name, &self.state);
    }
}
