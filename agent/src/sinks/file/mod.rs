//! The file sink: appends each batch as one OTLP JSON line (the OTLP/JSON encoding of an
//! `ExportTraceServiceRequest`, hex trace and span ids), readable by `jq` or replayable with
//! any OTLP/HTTP JSON client.

pub mod config;

use std::path::PathBuf;
use std::sync::Arc;

use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

pub use self::config::FileSinkConfig;
use super::{SinkReceiver, SinkSender, sink_queue};
use crate::internal_events::AgentMetrics;
use crate::internal_events::{ExportFailed, SpansExported};
use crate::otlp_wire::batch::{SpanBatch, agent_resource};

/// The sink's name in metrics and logs.
pub const SINK_NAME: &str = "file";

/// Errors of the file sink.
#[derive(Debug, thiserror::Error)]
pub enum FileSinkError {
    /// `open(2)` failed.
    #[error("opening span file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `write(2)` failed.
    #[error("writing span file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A batch did not serialise.
    #[error("serialising spans as OTLP JSON")]
    Json(#[source] serde_json::Error),
}

/// The file sink, with its file open.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    resource: Resource,
    metrics: Arc<AgentMetrics>,
}

impl FileSinkConfig {
    /// Creates the sink's bounded queue (named `file`).
    pub fn queue(&self, metrics: Arc<AgentMetrics>) -> (SinkSender, SinkReceiver) {
        sink_queue(
            SINK_NAME,
            self.queue_max_batches,
            self.queue_max_spans,
            metrics,
        )
    }
}

impl FileSink {
    /// Opens (appends to) the configured file.
    ///
    /// # Errors
    /// [`FileSinkError::Open`].
    pub async fn build(
        config: &FileSinkConfig,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, FileSinkError> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .await
            .map_err(|source| FileSinkError::Open {
                path: config.path.clone(),
                source,
            })?;
        Ok(Self {
            path: config.path.clone(),
            file: tokio::io::BufWriter::new(file),
            resource: agent_resource(None),
            metrics,
        })
    }

    /// Writes one batch as one line and flushes it.
    ///
    /// # Errors
    /// [`FileSinkError::Json`] or [`FileSinkError::Write`].
    pub async fn write(&mut self, batch: SpanBatch) -> Result<(), FileSinkError> {
        let count = batch.span_count();
        let mut line =
            serde_json::to_vec(&batch.into_request(&self.resource)).map_err(FileSinkError::Json)?;
        line.push(b'\n');
        let path = &self.path;
        let io = |source| FileSinkError::Write {
            path: path.clone(),
            source,
        };
        self.file.write_all(&line).await.map_err(io)?;
        self.file.flush().await.map_err(io)?;
        SpansExported {
            sink: SINK_NAME,
            count,
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Writes batches from `queue` until `shutdown` (then drains what is queued) or until every
    /// sender is gone. A failed write is logged and counted; the sink carries on.
    pub async fn run(mut self, mut queue: SinkReceiver, shutdown: CancellationToken) {
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                b = queue.recv() => match b {
                    Some(b) => b,
                    None => return,
                },
            };
            self.write_logged(batch).await;
        }
        while let Some(batch) = queue.try_recv() {
            self.write_logged(batch).await;
        }
    }

    async fn write_logged(&mut self, batch: SpanBatch) {
        if let Err(e) = self.write(batch).await {
            ExportFailed {
                sink: SINK_NAME,
                error: &e,
                retryable: false,
            }
            .emit(&self.metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    use super::*;
    use crate::sources::otlp::sample::vllm_request;

    #[tokio::test(flavor = "multi_thread")]
    async fn writes_one_otlp_json_line_per_batch() {
        let dir = std::env::temp_dir().join(format!("iw-file-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = FileSinkConfig {
            enabled: true,
            path: dir.join("spans.jsonl"),
            ..Default::default()
        };
        let _ = std::fs::remove_file(&config.path);
        let metrics = Arc::new(AgentMetrics::default());
        let sink = FileSink::build(&config, metrics.clone())
            .await
            .expect("opens");
        let (tx, rx) = config.queue(metrics.clone());
        let shutdown = CancellationToken::new();
        assert!(tx.send(SpanBatch::from(vllm_request(0, 2))));
        assert!(tx.send(SpanBatch::from(vllm_request(2, 3))));
        shutdown.cancel();
        sink.run(rx, shutdown).await;
        let text = std::fs::read_to_string(&config.path).expect("read");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: ExportTraceServiceRequest = serde_json::from_str(lines[0]).expect("OTLP JSON");
        assert_eq!(first, vllm_request(0, 2));
        assert!(lines[1].contains(&hex::encode(
            &vllm_request(2, 1).resource_spans[0].scope_spans[0].spans[0].span_id
        )));
        assert_eq!(metrics.exported(SINK_NAME), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
