//! vLLM-compatible KV event publisher: a ZMQ PUB socket sending `[topic, seq, payload]`
//! messages whose payload is a msgpack `KVEventBatch` (`[ts, [events], dp_rank]`, each event a
//! tagged array: `BlockStored`, `BlockRemoved`, `AllBlocksCleared`, as SGLang and older vLLM
//! send them, or a map keyed by field name with a `type` entry, as vLLM 0.32 does, one
//! `BlockRemoved` per block; see `tests/real-vllm/fixtures`), as
//! `vllm/distributed/kv_events.py` does. Enabled by the scenario's
//! `runtime.kv_events_endpoint`; the vLLM flavor sends maps, the others arrays.

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

/// How events are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Tagged arrays (SGLang, vLLM before 0.32).
    Array,
    /// Maps with a `type` entry, one `BlockRemoved` per block (vLLM 0.32).
    Map,
}

/// Encode one `KVEventBatch` payload.
pub fn encode_batch(ts_ns: u64, events: &[KvCacheEvent], encoding: Encoding) -> Vec<u8> {
    let ints = |h: &[u64]| Value::Array(h.iter().map(|x| Value::from(*x)).collect());
    let map = |entries: Vec<(&str, Value)>| {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let events: Vec<Value> = if encoding == Encoding::Map {
        events
            .iter()
            .flat_map(|e| match e {
                KvCacheEvent::Stored { hashes, parent } => vec![map(vec![
                    ("type", "BlockStored".into()),
                    ("block_hashes", ints(hashes)),
                    ("parent_block_hash", parent.map_or(Value::Nil, Value::from)),
                    (
                        "token_ids",
                        Value::Array(vec![Value::from(0u32); hashes.len() * BLOCK_SIZE]),
                    ),
                    ("block_size", Value::from(BLOCK_SIZE as u64)),
                    ("lora_id", Value::Nil),
                    ("medium", "GPU".into()),
                    ("lora_name", Value::Nil),
                    ("extra_keys", Value::Nil),
                    ("group_idx", Value::from(0u32)),
                    ("kv_cache_spec_kind", "full_attention".into()),
                ])],
                KvCacheEvent::Removed { hashes } => hashes
                    .iter()
                    .map(|h| {
                        map(vec![
                            ("type", "BlockRemoved".into()),
                            ("block_hashes", ints(&[*h])),
                            ("medium", "GPU".into()),
                            ("group_idx", Value::from(0u32)),
                        ])
                    })
                    .collect(),
                KvCacheEvent::AllCleared => vec![map(vec![("type", "AllBlocksCleared".into())])],
            })
            .collect()
    } else {
        events
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
            .collect()
    };
    // vLLM 0.32 sends its data-parallel rank; older publishers nothing.
    let rank = if encoding == Encoding::Map {
        Value::from(0u32)
    } else {
        Value::Nil
    };
    let batch = Value::Array(vec![
        Value::F64(ts_ns as f64 / 1e9),
        Value::Array(events),
        rank,
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
    encoding: Encoding,
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
                Bytes::from(encode_batch(ts, &events, encoding)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(payload: &[u8]) -> Vec<Value> {
        let v = rmpv::decode::read_value(&mut &payload[..]).expect("msgpack");
        match v {
            Value::Array(mut parts) if parts.len() == 3 => match parts.swap_remove(1) {
                Value::Array(events) => events,
                other => panic!("events: {other:?}"),
            },
            other => panic!("batch: {other:?}"),
        }
    }

    /// The vLLM 0.32 form: maps with a `type`, one `BlockRemoved` per block, as recorded from
    /// the real vLLM (`tests/real-vllm/fixtures`); the array form keeps one event per call.
    #[test]
    fn map_form_is_vllm_0_32s() {
        let batch = [
            KvCacheEvent::Removed {
                hashes: vec![1, 2, 3],
            },
            KvCacheEvent::Stored {
                hashes: vec![4, 5],
                parent: Some(9),
            },
        ];
        let maps = events_of(&encode_batch(1, &batch, Encoding::Map));
        let types: Vec<String> = maps
            .iter()
            .map(|e| {
                let Value::Map(entries) = e else {
                    panic!("{e:?}")
                };
                let ty = entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("type"))
                    .and_then(|(_, v)| v.as_str())
                    .expect("type");
                ty.to_string()
            })
            .collect();
        assert_eq!(
            types,
            [
                "BlockRemoved",
                "BlockRemoved",
                "BlockRemoved",
                "BlockStored"
            ]
        );
        let arrays = events_of(&encode_batch(1, &batch, Encoding::Array));
        assert_eq!(arrays.len(), 2);
        assert!(arrays.iter().all(|e| matches!(e, Value::Array(_))));
    }
}
