//! Fuzz target: OTLP/protobuf and OTLP/JSON trace requests through validate and the runtime adapters.
#![no_main]

use inferwatch::fuzzing::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| Target::Otlp.run(data));
