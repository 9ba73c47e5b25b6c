//! Replays the fuzzers' inputs without libFuzzer: the seeds built from the tests' fixtures
//! (`inferwatch::fuzzing::seeds`) and every committed crash reproducer of
//! `fuzz/regressions/<target>/`, through the same target bodies (`inferwatch::fuzzing`) that
//! `cargo xtask fuzz` runs. A panic here is a fuzzing finding coming back.
//!
//! The fuzzers' working corpora stay out of git, under `target/fuzz/corpus/` (`cargo xtask
//! fuzz` writes the seeds there first).

use std::path::{Path, PathBuf};

use inferwatch::fuzzing::{Target, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files under `fuzz/<kind>/<target>/`, sorted; none when the folder does not exist.
fn inputs(kind: &str, target: Target) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target.name());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `kind` for `target`, naming the file that panics; returns the count.
fn replay(kind: &str, target: Target) -> usize {
    let files = inputs(kind, target);
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        if std::panic::catch_unwind(|| target.run(&data)).is_err() {
            panic!(
                "fuzz target {} panicked on {} (reproduce: cargo fuzz run {} {})",
                target.name(),
                file.display(),
                target.name(),
                file.display()
            );
        }
    }
    files.len()
}

fn replay_all(target: Target) {
    let seeds = seeds(target);
    assert!(
        !seeds.is_empty(),
        "no seeds for fuzz target {}",
        target.name()
    );
    for (name, data) in &seeds {
        if std::panic::catch_unwind(|| target.run(data)).is_err() {
            panic!("fuzz target {} panicked on seed {name}", target.name());
        }
    }
    let regressions = replay("regressions", target);
    eprintln!(
        "{}: {} seeds, {regressions} regressions replayed",
        target.name(),
        seeds.len()
    );
}

#[test]
fn otlp_seeds_and_regressions() {
    replay_all(Target::Otlp);
}

#[test]
fn kernel_head_seeds_and_regressions() {
    replay_all(Target::KernelHead);
}

#[test]
fn kv_events_seeds_and_regressions() {
    replay_all(Target::KvEvents);
}

#[test]
fn config_seeds_and_regressions() {
    replay_all(Target::Config);
}

/// The committed reproducers are the ones this test replays: a folder named after no target
/// would be skipped silently.
#[test]
fn regression_folders_are_named_after_targets() {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join("regressions")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            Target::ALL.iter().any(|t| t.name() == name),
            "fuzz/regressions/{name} is not a fuzz target's folder"
        );
    }
}

#[test]
fn seeds_are_accepted_by_the_decoders() {
    // The seeds are real inputs: each must decode, or the corpus starts from noise.
    use inferwatch::config::AgentConfig;
    use inferwatch::sources::kvevents::decode_payload;
    for (name, data) in seeds(Target::Config) {
        let text = data.split(|&b| b == 0).next().unwrap_or_default();
        let text = std::str::from_utf8(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        AgentConfig::from_toml_str(text, Path::new(&name), Vec::new())
            .unwrap_or_else(|e| panic!("config seed {name} does not load: {e:?}"));
    }
    for (name, data) in seeds(Target::KvEvents) {
        let payload = if name.starts_with("message-") {
            &data[8..]
        } else {
            &data[..]
        };
        let batch = decode_payload(payload, "seed")
            .unwrap_or_else(|e| panic!("KV seed {name} does not decode: {e}"));
        assert!(!batch.events.is_empty(), "{name}");
    }
    for (name, data) in seeds(Target::KernelHead) {
        if name.starts_with("record-") {
            inferwatch::sources::kernel::event::decode(&data)
                .unwrap_or_else(|e| panic!("kernel seed {name} does not decode: {e}"));
        }
    }
}

/// Deeply nested inputs, run on a thread with the 2 MiB stack of a tokio worker (where the
/// receivers decode): libFuzzer runs on the main thread's larger stack, so it would not see a
/// decoder whose recursion is bounded only by the main thread's stack.
#[test]
fn deepest_inputs_fit_a_worker_stack() {
    use inferwatch::fuzzing::CONFIG_ENV_SEPARATOR;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    // An AnyValue nested past prost's recursion limit (built and encoded iteratively here).
    let mut value = AnyValue {
        value: Some(any_value::Value::IntValue(1)),
    };
    for _ in 0..150 {
        value = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue {
                values: vec![value],
            })),
        };
    }
    let span = Span {
        name: "llm_request".into(),
        attributes: vec![KeyValue {
            key: "deep".into(),
            value: Some(value),
            ..Default::default()
        }],
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let deep_pb = request.encode_to_vec();
    // Encoding recursed on this thread; leak the value rather than drop it recursively here too.
    std::mem::forget(request);

    let nest = |open: &str, close: &str, n: usize, inner: &str| {
        let mut s = open.repeat(n);
        s.push_str(inner);
        s.push_str(&close.repeat(n));
        s
    };
    let mut deep_config = b"[kernel]\n".to_vec();
    deep_config.extend(nest("x = [", "]", 1, &"[".repeat(5000)).into_bytes());
    let mut deep_env = b"[kernel]\n".to_vec();
    deep_env.push(CONFIG_ENV_SEPARATOR);
    deep_env.extend(b"INFERWATCH_KERNEL__WATCH_PORTS=");
    deep_env.extend(nest("[", "]", 5000, "1").into_bytes());
    let cases: Vec<(Target, &str, Vec<u8>)> = vec![
        (Target::Otlp, "protobuf AnyValue x150", deep_pb),
        (
            Target::Otlp,
            "JSON arrays x100000",
            nest("[", "]", 100_000, "").into_bytes(),
        ),
        (
            Target::Otlp,
            "JSON AnyValue x2000",
            nest(
                r#"{"arrayValue":{"values":["#,
                "]}}",
                2000,
                r#"{"intValue":"1"}"#,
            )
            .into_bytes(),
        ),
        (
            Target::KvEvents,
            "msgpack arrays x100000",
            [vec![0x91u8; 100_000], vec![0xc0]].concat(),
        ),
        (
            Target::KvEvents,
            "msgpack maps x100000",
            [[0x81u8, 0xc0].repeat(50_000), vec![0xc0]].concat(),
        ),
        (Target::Config, "TOML arrays x5000", deep_config),
        (
            Target::Config,
            "TOML inline tables x5000",
            nest("a = {b = ", "}", 1, &nest("{c = ", "}", 5000, "1")).into_bytes(),
        ),
        (Target::Config, "env TOML arrays x5000", deep_env),
    ];
    for (target, name, data) in cases {
        let worker = std::thread::Builder::new()
            .name(format!("fuzz-{}", target.name()))
            .stack_size(2 << 20)
            .spawn(move || target.run(&data))
            .expect("spawn a 2 MiB-stack thread");
        assert!(
            worker.join().is_ok(),
            "{} on `{name}` panicked on a 2 MiB stack",
            target.name()
        );
    }
}
