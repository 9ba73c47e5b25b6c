//! The KV event source: subscribes to vLLM's / SGLang's ZMQ PUB stream of KV-cache events and
//! hands [`KvEventBatch`]es to the correlator (contract §1.2, optional block-level evidence for
//! §3.3).
//!
//! # Wire format (vLLM `vllm/distributed/kv_events.py`)
//! Each message has three frames: the topic, an 8-byte big-endian sequence number, and a
//! msgpack payload. The payload is a `KVEventBatch`, a msgspec `array_like` struct:
//! `[ts (float seconds), [event, ...], data_parallel_rank (optional)]`. Events come in two
//! encodings, both read:
//! - vLLM 0.32 (seen from a running 0.32, `tests/real-vllm/fixtures`): each event is a map
//!   keyed by field name with a `"type"` entry: `{"type": "BlockStored", "block_hashes",
//!   "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
//!   "extra_keys", "group_idx", "kv_cache_spec_kind"}`, `{"type": "BlockRemoved",
//!   "block_hashes", "medium", "group_idx"}`;
//! - older vLLM and SGLang: each event is an array tagged by its class name, fields in order:
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
//!   `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`; trailing fields left at
//!   their defaults may be omitted.
//!
//! Unknown fields are ignored and events of unknown types are skipped and counted. Block
//! hashes are integers (older vLLM) or bytes (newer vLLM,
//! SHA-256): bytes are folded to 64 bits. Token ids are counted and dropped here: they are
//! prompt content and never leave the source.
//!
//! Sequence numbers are checked per endpoint; gaps are counted here and passed on (`seq`), so
//! that the correlator does not trust block evidence across a gap.

mod config;
pub mod discovery;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SubSocket};

pub use config::{KvEventsConfig, KvEventsEndpoint};

use crate::model::{KvEvent, KvEventBatch, UnixNanos};
use crate::sources::channel::SourceSender;

/// Errors of the KV event source.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    /// An endpoint is not a ZMQ endpoint this source can connect to.
    #[error("KV event endpoint {endpoint:?} is not tcp://host:port or ipc://path")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
    },
    /// Connecting or subscribing failed.
    #[error("ZMQ {op} on {endpoint}")]
    Zmq {
        /// `connect`, `subscribe` or `recv`.
        op: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: zeromq::ZmqError,
    },
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not the three frames `[topic, seq, payload]`.
    #[error("expected 3 frames (topic, seq, payload), got {0}")]
    Frames(usize),
    /// The sequence frame is not 8 bytes.
    #[error("sequence frame of {0} bytes, expected 8")]
    Sequence(usize),
    /// The payload is not msgpack.
    #[error("payload is not msgpack")]
    Msgpack(#[source] rmpv::decode::Error),
    /// The payload is msgpack but not a `KVEventBatch`.
    #[error("not a KVEventBatch: {0}")]
    Shape(&'static str),
}

/// Counters of the source, shared with the metrics sink.
#[derive(Debug, Default)]
pub struct KvEventsCounters {
    /// Messages received.
    pub messages: AtomicU64,
    /// Messages that did not decode (skipped).
    pub decode_errors: AtomicU64,
    /// Messages missing, from gaps in the sequence numbers.
    pub missing: AtomicU64,
    /// Batches dropped because the channel to the correlator was full.
    pub dropped: AtomicU64,
    /// Events of unknown types, skipped inside otherwise decoded batches.
    pub unknown_events: AtomicU64,
}

/// Decodes one ZMQ message (`[topic, seq, payload]` frames) from `instance`.
pub fn decode_message(frames: &[&[u8]], instance: &str) -> Result<KvEventBatch, DecodeError> {
    let [_topic, seq, payload] = frames else {
        return Err(DecodeError::Frames(frames.len()));
    };
    let seq: [u8; 8] = (*seq)
        .try_into()
        .map_err(|_| DecodeError::Sequence(seq.len()))?;
    let mut batch = decode_payload(payload, instance)?;
    batch.seq = Some(u64::from_be_bytes(seq));
    Ok(batch)
}

/// Nesting budget of the msgpack reader (rmpv counts about two per container). A `KVEventBatch`
/// nests four containers deep; rmpv's own default (1024) recurses deep enough to overflow the
/// 2 MiB stack of a tokio worker on a payload of nested one-element arrays (found by fuzzing).
const MAX_MSGPACK_DEPTH: usize = 32;

/// Decodes a msgpack `KVEventBatch` payload.
pub fn decode_payload(payload: &[u8], instance: &str) -> Result<KvEventBatch, DecodeError> {
    use rmpv::Value;
    let mut cursor = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_MSGPACK_DEPTH)
        .map_err(DecodeError::Msgpack)?;
    let Value::Array(fields) = value else {
        return Err(DecodeError::Shape("batch is not an array"));
    };
    let ts = match fields.first() {
        Some(Value::F64(f)) => *f,
        Some(Value::F32(f)) => f64::from(*f),
        Some(v) if v.as_u64().is_some() => v.as_u64().unwrap_or(0) as f64,
        _ => return Err(DecodeError::Shape("batch ts is not a number")),
    };
    let Some(Value::Array(events)) = fields.get(1) else {
        return Err(DecodeError::Shape("batch events is not an array"));
    };
    let data_parallel_rank = fields.get(2).and_then(Value::as_i64);
    let mut out = Vec::with_capacity(events.len());
    let mut unknown_events = 0u32;
    for event in events {
        match decode_event(event)? {
            Some(e) => out.push(e),
            None => unknown_events = unknown_events.saturating_add(1),
        }
    }
    Ok(KvEventBatch {
        ts: secs_to_nanos(ts),
        instance: instance.to_string(),
        seq: None,
        data_parallel_rank,
        unknown_events,
        events: out,
    })
}

/// The fields of one event, whichever of the two encodings carried it: vLLM 0.32 sends each
/// event as a map keyed by field name with a `"type"` entry; older vLLM and SGLang send an
/// array tagged by its first element, the fields in declaration order.
enum EventFields<'a> {
    Map(&'a [(rmpv::Value, rmpv::Value)]),
    Array(&'a [rmpv::Value]),
}

impl<'a> EventFields<'a> {
    /// The field called `name`, declared at `position` (counted after the array form's tag).
    fn get(&self, name: &str, position: usize) -> Option<&'a rmpv::Value> {
        match self {
            Self::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
                .filter(|v| !v.is_nil()),
            Self::Array(items) => items.get(position + 1).filter(|v| !v.is_nil()),
        }
    }
}

/// Decodes one event; `None` for an event type this agent does not know (skipped and counted,
/// so that a runtime adding a type does not cost the batch's other events). Unknown fields are
/// ignored.
fn decode_event(event: &rmpv::Value) -> Result<Option<KvEvent>, DecodeError> {
    use rmpv::Value;
    let (tag, fields) = match event {
        Value::Map(entries) => (
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str()),
            EventFields::Map(entries),
        ),
        Value::Array(items) => (
            items.first().and_then(Value::as_str),
            EventFields::Array(items),
        ),
        _ => return Err(DecodeError::Shape("event is neither a map nor an array")),
    };
    let Some(tag) = tag else {
        return Err(DecodeError::Shape("event has no type"));
    };
    let hashes = |v: Option<&Value>| -> Result<Vec<u64>, DecodeError> {
        match v {
            Some(Value::Array(items)) => items
                .iter()
                .map(|h| block_hash(h).ok_or(DecodeError::Shape("block hash")))
                .collect(),
            _ => Err(DecodeError::Shape("block_hashes is not an array")),
        }
    };
    let opt_str = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(Some(match tag {
        "BlockStored" => KvEvent::BlockStored {
            block_hashes: hashes(fields.get("block_hashes", 0))?,
            parent_block_hash: fields.get("parent_block_hash", 1).and_then(block_hash),
            num_tokens: match fields.get("token_ids", 2) {
                Some(Value::Array(t)) => u32::try_from(t.len()).unwrap_or(u32::MAX),
                _ => 0,
            },
            block_size: fields
                .get("block_size", 3)
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .unwrap_or(0),
            lora_id: fields.get("lora_id", 4).and_then(Value::as_i64),
            medium: opt_str(fields.get("medium", 5)),
        },
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: hashes(fields.get("block_hashes", 0))?,
            medium: opt_str(fields.get("medium", 1)),
        },
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        _ => return Ok(None),
    }))
}

fn secs_to_nanos(ts: f64) -> UnixNanos {
    if ts.is_finite() && ts > 0.0 {
        (ts * 1e9) as UnixNanos
    } else {
        0
    }
}

/// A block hash: an integer as is (two's complement for negatives), bytes folded to 64 bits by
/// XOR of 8-byte words (SHA-256 hashes are uniform, so any 64 bits are as good).
fn block_hash(v: &rmpv::Value) -> Option<u64> {
    match v {
        rmpv::Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)),
        rmpv::Value::Binary(b) => Some(b.chunks(8).fold(0u64, |acc, chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            acc ^ u64::from_be_bytes(word)
        })),
        _ => None,
    }
}

/// The running source: one subscriber task per endpoint.
#[derive(Debug)]
pub struct KvEventsSource {
    config: KvEventsConfig,
    counters: Arc<KvEventsCounters>,
}

impl KvEventsSource {
    /// Validates the endpoints.
    ///
    /// # Errors
    /// [`KvEventsError::Endpoint`] for an endpoint that is not `tcp://` or `ipc://`.
    pub fn build(config: KvEventsConfig) -> Result<Self, KvEventsError> {
        for ep in &config.endpoints {
            if !(ep.endpoint.starts_with("tcp://") || ep.endpoint.starts_with("ipc://")) {
                return Err(KvEventsError::Endpoint {
                    endpoint: ep.endpoint.clone(),
                });
            }
        }
        Ok(Self {
            config,
            counters: Arc::default(),
        })
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<KvEventsCounters> {
        self.counters.clone()
    }

    /// Whether the source has nothing configured and only looks for runtimes.
    pub fn discovery_only(&self) -> bool {
        self.config.endpoints.is_empty()
    }

    /// Subscribes to every endpoint, and to those discovered on runtimes' command lines, and
    /// sends decoded batches on `tx` until `cancel` fires. Socket errors are logged and retried
    /// after `reconnect_ms`; they never end the source.
    pub async fn run(self, tx: SourceSender<KvEventBatch>, cancel: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        // Subscribers by endpoint: the instance they name, and their own stop.
        let mut running: HashMap<String, (String, CancellationToken)> = HashMap::new();
        let explicit: HashSet<String> = self
            .config
            .endpoints
            .iter()
            .map(|e| e.endpoint.clone())
            .collect();
        let reconnect = Duration::from_millis(self.config.reconnect_ms.max(1));
        let start =
            |ep: KvEventsEndpoint,
             tasks: &mut tokio::task::JoinSet<()>,
             running: &mut HashMap<String, (String, CancellationToken)>| {
                let stop = cancel.child_token();
                running.insert(ep.endpoint.clone(), (ep.instance.clone(), stop.clone()));
                let tx = tx.clone();
                let counters = self.counters.clone();
                tasks.spawn(async move {
                loop {
                    let result = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = subscribe(&ep, &tx, &counters) => r,
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, endpoint = %ep.endpoint, "KV event subscriber failed; reconnecting");
                    }
                    if tx.is_closed() {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(reconnect) => {}
                    }
                }
            });
            };
        for ep in self.config.endpoints.clone() {
            start(ep, &mut tasks, &mut running);
        }
        if !self.config.discover {
            while tasks.join_next().await.is_some() {}
            return;
        }
        let interval = Duration::from_millis(self.config.discovery_interval_ms.max(100));
        while !tx.is_closed() {
            // A cheap scan (only command lines naming the flag are parsed), off the runtime's
            // worker threads.
            let found = tokio::task::spawn_blocking(|| discovery::scan(Path::new("/proc")))
                .await
                .unwrap_or_default();
            for ep in found {
                if explicit.contains(&ep.endpoint) {
                    continue;
                }
                match running.get(&ep.endpoint) {
                    Some((instance, _)) if *instance == ep.instance => continue,
                    Some((_, stop)) => {
                        // Another runtime now publishes there (a restart): its events belong
                        // to the new process.
                        stop.cancel();
                    }
                    None => {}
                }
                tracing::info!(endpoint = %ep.endpoint, instance = %ep.instance, "KV event publisher discovered on a runtime's command line");
                start(ep, &mut tasks, &mut running);
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
                // Reap finished subscribers so the set does not grow with restarts.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn subscribe(
    ep: &KvEventsEndpoint,
    tx: &SourceSender<KvEventBatch>,
    counters: &KvEventsCounters,
) -> Result<(), KvEventsError> {
    let zmq = |op| {
        move |source| KvEventsError::Zmq {
            op,
            endpoint: ep.endpoint.clone(),
            source,
        }
    };
    let mut socket = SubSocket::new();
    socket.connect(&ep.endpoint).await.map_err(zmq("connect"))?;
    socket
        .subscribe(&ep.topic)
        .await
        .map_err(zmq("subscribe"))?;
    tracing::info!(endpoint = %ep.endpoint, instance = %ep.instance, "subscribed to KV events");
    let mut last_seq: Option<u64> = None;
    // A publisher whose encoding this agent does not read sends nothing but undecodable
    // messages: one warning per connection says so, the rest are counted.
    let mut warned = false;
    loop {
        let msg = socket.recv().await.map_err(zmq("recv"))?;
        counters.messages.fetch_add(1, Ordering::Relaxed);
        let frames: Vec<&[u8]> = msg.iter().map(|b| b.as_ref()).collect();
        let batch = match decode_message(&frames, &ep.instance) {
            Ok(b) => b,
            Err(e) => {
                counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                if warned {
                    tracing::debug!(error = %e, endpoint = %ep.endpoint, "KV event message skipped");
                } else {
                    warned = true;
                    tracing::warn!(
                        error = %e,
                        endpoint = %ep.endpoint,
                        "KV event message not decoded: skipped, and counted with the further ones in \
                         inferwatch_events_dropped_total (source kv_events, reason decode_error)"
                    );
                }
                continue;
            }
        };
        if let (Some(last), Some(seq)) = (last_seq, batch.seq)
            && seq > last.saturating_add(1)
        {
            counters
                .missing
                .fetch_add(seq - last - 1, Ordering::Relaxed);
        }
        last_seq = batch.seq.or(last_seq);
        counters
            .unknown_events
            .fetch_add(u64::from(batch.unknown_events), Ordering::Relaxed);
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    #[test]
    fn deep_nesting_is_refused_on_a_worker_stack() {
        // 100k nested one-element arrays: refused by the depth budget instead of recursing
        // through a tokio worker's 2 MiB stack (a fuzzing find).
        let mut payload = vec![0x91u8; 100_000];
        payload.push(0xc0);
        let worker = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || decode_payload(&payload, "w").map(|_| ()))
            .expect("spawn");
        let result = worker.join().expect("no stack overflow");
        assert!(matches!(result, Err(DecodeError::Msgpack(_))), "{result:?}");
    }

    #[test]
    fn decodes_vllm_batches() {
        let batch = Value::Array(vec![
            Value::F64(1_700_000_000.5),
            Value::Array(vec![
                Value::Array(vec![
                    "BlockStored".into(),
                    Value::Array(vec![Value::from(7u64), Value::from(-2i64)]),
                    Value::Nil,
                    Value::Array((0..32).map(Value::from).collect()),
                    Value::from(16u64),
                    Value::Nil,
                    "GPU".into(),
                ]),
                Value::Array(vec![
                    "BlockRemoved".into(),
                    Value::Array(vec![Value::Binary(vec![0, 0, 0, 0, 0, 0, 0, 9])]),
                ]),
                Value::Array(vec!["AllBlocksCleared".into()]),
            ]),
        ]);
        let payload = encode(&batch);
        let seq = 5u64.to_be_bytes();
        let b = decode_message(&[b"", &seq, &payload], "pid:1").expect("decodes");
        assert_eq!(b.seq, Some(5));
        assert_eq!(b.ts, 1_700_000_000_500_000_000);
        assert_eq!(b.data_parallel_rank, None);
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![7, (-2i64) as u64],
                    parent_block_hash: None,
                    num_tokens: 32,
                    block_size: 16,
                    lora_id: None,
                    medium: Some("GPU".into()),
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![9],
                    medium: None,
                },
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    /// The ZMQ messages a real vLLM 0.32 published (`tests/real-vllm/fixtures`, recorded from
    /// the real-vLLM tier): 9 prompts of 1000 tokens through a 150-block cache, then a
    /// two-turn conversation.
    fn recorded_vllm_0_32() -> Vec<Vec<Vec<u8>>> {
        let text = include_str!("../../../../tests/real-vllm/fixtures/kv_events_vllm_0.32.jsonl");
        text.lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
                v["frames"]
                    .as_array()
                    .expect("frames")
                    .iter()
                    .map(|f| hex::decode(f.as_str().expect("hex")).expect("hex frame"))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn decodes_the_map_encoded_events_of_a_real_vllm_0_32() {
        let messages = recorded_vllm_0_32();
        assert_eq!(messages.len(), 12);
        let batches: Vec<KvEventBatch> = messages
            .iter()
            .map(|m| {
                let frames: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
                decode_message(&frames, "vllm").expect("a real vLLM message decodes")
            })
            .collect();
        let seqs: Vec<u64> = batches.iter().filter_map(|b| b.seq).collect();
        assert_eq!(seqs, (0..12).collect::<Vec<_>>());
        // The first prompt fills 22 whole blocks of 32 (704 tokens), with no parent.
        let KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            num_tokens,
            block_size,
            lora_id,
            medium,
        } = &batches[0].events[0]
        else {
            panic!("first event: {:?}", batches[0].events[0]);
        };
        assert_eq!(
            (
                block_hashes.len(),
                *parent_block_hash,
                *num_tokens,
                *block_size
            ),
            (22, None, 704, 32)
        );
        assert_eq!((lora_id, medium.as_deref()), (&None, Some("GPU")));
        assert_eq!(batches[0].data_parallel_rank, Some(0));
        assert!(batches.iter().all(|b| b.unknown_events == 0));
        // From the sixth prompt on the cache is full: each batch removes blocks one event per
        // block, then stores the new prompt's, in the same batch.
        let removed: usize = batches[5]
            .events
            .iter()
            .map(|e| match e {
                KvEvent::BlockRemoved { block_hashes, .. } => block_hashes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(removed, 29);
        assert!(matches!(
            batches[5].events.last(),
            Some(KvEvent::BlockStored { .. })
        ));
        // The conversation's second turn chains onto its first turn's last block.
        let last_hash = |b: &KvEventBatch| match b.events.last() {
            Some(KvEvent::BlockStored { block_hashes, .. }) => block_hashes.last().copied(),
            _ => None,
        };
        let parent = match batches[11].events.last() {
            Some(KvEvent::BlockStored {
                parent_block_hash, ..
            }) => *parent_block_hash,
            other => panic!("{other:?}"),
        };
        assert!(parent.is_some());
        assert_eq!(parent, last_hash(&batches[10]));
    }

    #[test]
    fn map_events_ignore_unknown_fields_and_skip_unknown_types() {
        let map = |entries: Vec<(&str, Value)>| {
            Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
        };
        let batch = Value::Array(vec![
            Value::F64(2.0),
            Value::Array(vec![
                map(vec![
                    ("type", "BlockStored".into()),
                    ("a_field_from_the_future", Value::from(1u64)),
                    ("block_hashes", Value::Array(vec![Value::from(3u64)])),
                    ("parent_block_hash", Value::from(2u64)),
                    (
                        "token_ids",
                        Value::Array((0..16).map(Value::from).collect()),
                    ),
                    ("block_size", Value::from(16u64)),
                ]),
                map(vec![("type", "BlockUpdated".into())]),
                map(vec![
                    ("block_hashes", Value::Array(vec![Value::from(3u64)])),
                    ("type", "BlockRemoved".into()),
                ]),
            ]),
            Value::from(1i64),
        ]);
        let b = decode_payload(&encode(&batch), "i").expect("decodes");
        assert_eq!(b.unknown_events, 1);
        assert_eq!(b.data_parallel_rank, Some(1));
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![3],
                    parent_block_hash: Some(2),
                    num_tokens: 16,
                    block_size: 16,
                    lora_id: None,
                    medium: None,
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![3],
                    medium: None,
                },
            ]
        );
        let untyped = encode(&Value::Array(vec![
            Value::F64(2.0),
            Value::Array(vec![map(vec![("block_hashes", Value::Array(vec![]))])]),
        ]));
        assert!(matches!(
            decode_payload(&untyped, "i"),
            Err(DecodeError::Shape("event has no type"))
        ));
    }

    #[test]
    fn rejects_bad_messages_without_panicking() {
        assert!(matches!(
            decode_message(&[b"", b"x"], "i"),
            Err(DecodeError::Frames(2))
        ));
        assert!(matches!(
            decode_message(&[b"", b"123", b""], "i"),
            Err(DecodeError::Sequence(3))
        ));
        let seq = 1u64.to_be_bytes();
        assert!(decode_message(&[b"", &seq, &[0xc1]], "i").is_err());
        let odd = encode(&Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec!["BlockRemoved".into(), 7.into()])]),
        ]));
        assert!(matches!(
            decode_message(&[b"", &seq, &odd], "i"),
            Err(DecodeError::Shape(_))
        ));
    }
}
