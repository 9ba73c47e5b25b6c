//! Fuzz target: Kernel ring-buffer records, HTTP request heads and traceparent values.
#![no_main]

use inferwatch::fuzzing::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| Target::KernelHead.run(data));
