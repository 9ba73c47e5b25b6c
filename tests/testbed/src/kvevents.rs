//! vLLM-compatible KV event publisher: a ZMQ PUB socket sending `[topic, seq, payload]`
//! messages whose payload is a msgpack `KVEventBatch` (`[ts, [events], dp_rank]`, each event a
//! tagged array: `BlockStored`, `BlockRemoved`, `AllBlocksCleared`), as
//! `vllm/distributed/kv_events.py` does. Enabled by the scenario's
//! `runtime.kv_events_endpoint`.

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

use crate::kv::BLOCK_SIZE;

/// One KV cache event, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Full blocks entered the prefix cache.
    Stored {
        /// Their hashes, in sequence order.
        hashes: Vec<u64>,
        /// The hash of the block before the first, if any.
        parent: Option<u64>,
    },
    /// Blocks were evicted.
    Removed {
        /// Their hashes.
        hashes: Vec<u64>,
    },
    /// Everything was cleared.
    AllCleared,
}

/// Handle the engine publishes through; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct KvEventPublisher {
    tx: mpsc::UnboundedSender<(u64, Vec<KvCacheEvent>)>,
}

impl KvEventPublisher {
    /// Publish one batch stamped `ts_ns` (dropped silently once the socket task ended).
    pub fn publish(&self, ts_ns: u64, events: Vec<KvCacheEvent>) {
        if !events.is_empty() {
            let _ = self.tx.send((ts_ns, events));
        }
    }
}

/// Encode one `KVEventBatch` payload.
pub fn encode_batch(ts_ns: u64, events: &[KvCacheEvent]) -> Vec<u8> {
    let ints = |h: &[u64]| Value::Array(h.iter().map(|x| Value::from(*x)).collect());
    let events = events
        .iter()
        .map(|e| match e {
            KvCacheEvent::Stored { hashes, parent } => Value::Array(vec![
                "BlockStored".into(),
                ints(hashes),
                parent.map_or(Value::Nil, Value::from),
                // Token ids: the simulator does not keep them per block; zeros of the right count.
                Value::Array(vec![Value::from(0u32); hashes.len() * BLOCK_SIZE]),
                Value::from(BLOCK_SIZE as u64),
                Value::Nil,
                "GPU".into(),
            ]),
            KvCacheEvent::Removed { hashes } => {
                Value::Array(vec!["BlockRemoved".into(), ints(hashes), "GPU".into()])
            }
            KvCacheEvent::AllCleared => Value::Array(vec!["AllBlocksCleared".into()]),
        })
        .collect();
    let batch = Value::Array(vec![
        Value::F64(ts_ns as f64 / 1e9),
        Value::Array(events),
        Value::Nil,
    ]);
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &batch);
    out
}

/// Bind a PUB socket at `endpoint` (`tcp://127.0.0.1:0` for any port) and start the sending
/// task; returns the handle and the bound endpoint.
pub async fn start(
    endpoint: &str,
) -> anyhow::Result<(KvEventPublisher, String, tokio::task::JoinHandle<()>)> {
    let mut socket = PubSocket::new();
    let bound = socket.bind(endpoint).await?.to_string();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Vec<KvCacheEvent>)>();
    let task = tokio::spawn(async move {
        let mut seq: u64 = 0;
        while let Some((ts, events)) = rx.recv().await {
            let frames = vec![
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                Bytes::from(encode_batch(ts, &events)),
            ];
            seq += 1;
            let Ok(msg) = ZmqMessage::try_from(frames) else {
                continue;
            };
            if let Err(e) = socket.send(msg).await {
                tracing::warn!(error = %e, "KV event publish failed");
            }
        }
    });
    Ok((KvEventPublisher { tx }, bound, task))
}
