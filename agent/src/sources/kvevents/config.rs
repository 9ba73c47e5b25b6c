//! Configuration of the KV event source (`[kv_events]`).

use serde::{Deserialize, Serialize};

/// The KV event subscriber's settings: which runtime publishers to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    /// The publishers (vLLM `--kv-events-config '{"enable_kv_cache_events": true,
    /// "publisher": "zmq", "endpoint": "tcp://*:5557"}'`, SGLang `--kv-events-config`). Empty:
    /// the source is off.
    pub endpoints: Vec<KvEventsEndpoint>,
    /// Capacity of the channel to the correlator, in batches; a full channel drops the batch
    /// and counts it (the correlator then sees a gap and falls back to spans).
    pub channel_capacity: usize,
    /// Delay before reconnecting after a socket error, in milliseconds.
    pub reconnect_ms: u64,
    /// Find publishers on runtimes' command lines (`--kv-events-config`) and subscribe to
    /// them, named by the API server's pid; explicit `endpoints` override what is found at
    /// the same address.
    pub discover: bool,
    /// How often `/proc` is scanned for runtimes started or restarted since, in milliseconds.
    pub discovery_interval_ms: u64,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            channel_capacity: 4096,
            reconnect_ms: 1000,
            discover: true,
            discovery_interval_ms: 2000,
        }
    }
}

/// One runtime's KV event publisher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvEventsEndpoint {
    /// The ZMQ endpoint the runtime's PUB socket binds (`tcp://127.0.0.1:5557`).
    pub endpoint: String,
    /// The runtime instance these events belong to, by the key its spans get
    /// (`inferwatch::correlator::instance_key`: the span resource's `service.instance.id`, else
    /// `pid:<process.pid>`, else `svc:<service.name>@<host.name>`).
    pub instance: String,
    /// The topic to subscribe to (vLLM's default is the empty topic: everything).
    #[serde(default)]
    pub topic: String,
}
