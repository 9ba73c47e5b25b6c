//! Fuzz target: The agent's TOML config plus INFERWATCH_* overrides (NUL, then NAME=value lines).
#![no_main]

use inferwatch::fuzzing::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| Target::Config.run(data));
