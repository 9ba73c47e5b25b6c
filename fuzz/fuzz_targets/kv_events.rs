//! Fuzz target: KV event messages (vLLM's msgpack KVEventBatch).
#![no_main]

use inferwatch::fuzzing::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| Target::KvEvents.run(data));
