//! Replay tests of the correlator: every `*.json` file in this folder is a recorded stream of
//! inputs and ticks with the outputs, counters and table sizes expected after it.
//!
//! A case file holds `description`, an optional partial `config` (a `CorrelatorConfig`),
//! `shuffle` (whether the order-independence test applies; default true), `steps` (each an
//! `Input` in its serde form, `{"kernel": KernelEvent}`, `{"runtime": RuntimeRequest}` or
//! `{"kv_events": KvEventBatch}`, `{"process": ProcessIdentity}`, `{"startup": StartupSpan}`, or
//! `{"tick": unix_nanos}`), and `expect`: `outputs` (the outputs in order, each compared as a
//! subset of the output's JSON; `client_abort` measurements left out), `client_aborts` (the
//! `client_abort` outputs in order, compared the same way), `counts` (outputs per kind), `stats` (a subset of
//! `CorrelatorStats`) and `max_state` (upper bounds on `StateSizes` at the end). Adding a
//! recording is adding a file; `REPLAY_DUMP=1` prints what the correlator made of each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use inferwatch::correlator::{Correlator, CorrelatorConfig, Input, Output};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    #[serde(default)]
    config: Option<CorrelatorConfig>,
    #[serde(default = "default_shuffle")]
    shuffle: bool,
    steps: Vec<Value>,
    expect: Expect,
}

fn default_shuffle() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    outputs: Option<Vec<Value>>,
    client_aborts: Option<Vec<Value>>,
    counts: Option<BTreeMap<String, usize>>,
    stats: Option<Value>,
    max_state: Option<BTreeMap<String, usize>>,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "a test's steps are built once")]
enum Step {
    Tick(u64),
    Input(Input),
}

struct Loaded {
    name: String,
    case: Case,
    steps: Vec<Step>,
}

fn replay_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/replay")
}

fn load_all() -> Vec<Loaded> {
    let dir = replay_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no recordings in {}", dir.display());
    paths.iter().map(|p| load(p)).collect()
}

fn load(path: &Path) -> Loaded {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let case: Case =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not a replay case: {e}"));
    let steps = case
        .steps
        .iter()
        .enumerate()
        .map(|(i, v)| match v.get("tick") {
            Some(t) => Step::Tick(
                t.as_u64()
                    .unwrap_or_else(|| panic!("{name}: step {i}: tick is not a u64")),
            ),
            None => Step::Input(
                serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("{name}: step {i}: not an Input: {e}: {v}")),
            ),
        })
        .collect();
    Loaded { name, case, steps }
}

fn config_of(case: &Case) -> CorrelatorConfig {
    case.config.clone().unwrap_or_default()
}

fn run(config: CorrelatorConfig, steps: &[Step]) -> (Correlator, Vec<Output>) {
    let mut correlator = Correlator::new(config);
    let mut outputs = Vec::new();
    for step in steps {
        match step {
            Step::Tick(now) => outputs.extend(correlator.on_tick(*now)),
            Step::Input(input) => outputs.extend(correlator.on_event(input.clone())),
        }
    }
    (correlator, outputs)
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("serializing: {e}"))
}

/// Checks that `expected` is contained in `actual`: objects key by key (extra keys in
/// `actual` are fine), everything else equal.
fn check_subset(actual: &Value, expected: &Value, at: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(exp), Value::Object(act)) => {
            for (key, e) in exp {
                let a = act
                    .get(key)
                    .ok_or_else(|| format!("{at}.{key}: missing in {actual}"))?;
                check_subset(a, e, &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{at}: expected {expected}, got {actual}")),
    }
}

fn kind_of(output: &Output) -> &'static str {
    match output {
        Output::Joined(_) => "joined",
        Output::Abort(_) => "abort",
        Output::KvEviction(_) => "kv_eviction",
        Output::ColdStart(_) => "cold_start",
        Output::RequestGpu(_) => "request_gpu",
        Output::LostInFlight(_) => "lost_in_flight",
        Output::ClientAbort(_) => "client_abort",
        _ => "other",
    }
}

fn check_case(loaded: &Loaded) -> Result<(), String> {
    let Loaded { name, case, steps } = loaded;
    let (correlator, outputs) = run(config_of(case), steps);
    let all: Vec<Value> = outputs.iter().map(to_json).collect();
    // Every abort is measured (a `client_abort` output), with a finding or not: a case lists
    // them apart, so that the findings read the same as before.
    let (measured, actual): (Vec<Value>, Vec<Value>) = all
        .iter()
        .cloned()
        .partition(|v| v.get("output").and_then(Value::as_str) == Some("client_abort"));
    if std::env::var_os("REPLAY_DUMP").is_some() {
        // For writing a new recording: what the correlator made of it.
        eprintln!(
            "== {name}\noutputs: {}\nstats: {}\nstate: {}",
            Value::Array(all.clone()),
            to_json(correlator.stats()),
            to_json(&correlator.state_sizes())
        );
    }
    let shown = || {
        all.iter()
            .map(|v| format!("  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Some(expected) = &case.expect.outputs {
        if expected.len() != actual.len() {
            return Err(format!(
                "{name}: expected {} outputs, got {}:\n{}",
                expected.len(),
                actual.len(),
                shown()
            ));
        }
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            check_subset(a, e, &format!("outputs[{i}]"))
                .map_err(|msg| format!("{name}: {msg}\nall outputs:\n{}", shown()))?;
        }
    }
    if let Some(expected) = &case.expect.client_aborts {
        if expected.len() != measured.len() {
            return Err(format!(
                "{name}: expected {} client aborts, got {}:\n{}",
                expected.len(),
                measured.len(),
                shown()
            ));
        }
        for (i, (a, e)) in measured.iter().zip(expected).enumerate() {
            check_subset(a, e, &format!("client_aborts[{i}]"))
                .map_err(|msg| format!("{name}: {msg}\nall outputs:\n{}", shown()))?;
        }
    }
    if let Some(counts) = &case.expect.counts {
        for (kind, want) in counts {
            let got = outputs.iter().filter(|o| kind_of(o) == kind).count();
            if got != *want {
                return Err(format!(
                    "{name}: expected {want} `{kind}` outputs, got {got}"
                ));
            }
        }
    }
    if let Some(stats) = &case.expect.stats {
        check_subset(&to_json(correlator.stats()), stats, "stats")
            .map_err(|msg| format!("{name}: {msg}"))?;
    }
    if let Some(bounds) = &case.expect.max_state {
        let sizes = to_json(&correlator.state_sizes());
        for (table, bound) in bounds {
            let size = sizes
                .get(table)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("{name}: no table `{table}` in {sizes}"))?;
            if size > *bound as u64 {
                return Err(format!("{name}: table {table} holds {size} > {bound}"));
            }
        }
    }
    Ok(())
}

#[test]
fn replay_recordings() {
    let cases = load_all();
    let failures: Vec<String> = cases.iter().filter_map(|c| check_case(c).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} recordings failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    for c in &cases {
        assert!(!c.case.description.is_empty(), "{}: no description", c.name);
    }
}

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The inputs of a case interleaved at random: each connection's kernel events keep their
/// order (the kernel source delivers them so), spans go anywhere.
fn interleave(inputs: &[Input], seed: u64) -> Vec<Input> {
    let mut queues: BTreeMap<(u8, u64), Vec<Input>> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let key = match input {
            Input::Kernel(event) => (0, event.kind.conn().0),
            _ => (1, i as u64),
        };
        queues.entry(key).or_default().push(input.clone());
    }
    let mut queues: Vec<std::collections::VecDeque<Input>> =
        queues.into_values().map(Into::into).collect();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Vec::with_capacity(inputs.len());
    while !queues.is_empty() {
        let pick = rng.below(queues.len());
        if let Some(input) = queues[pick].pop_front() {
            out.push(input);
        }
        if queues[pick].is_empty() {
            queues.swap_remove(pick);
        }
    }
    out
}

fn findings(outputs: &[Output]) -> Vec<Value> {
    outputs
        .iter()
        .filter(|o| {
            matches!(
                kind_of(o),
                "abort" | "kv_eviction" | "cold_start" | "lost_in_flight"
            )
        })
        .map(to_json)
        .collect()
}

#[test]
fn interleavings_give_the_same_outputs() {
    const SEEDS: u64 = 64;
    let mut checked = 0;
    for loaded in load_all().iter().filter(|c| c.case.shuffle) {
        let inputs: Vec<Input> = loaded
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Input(i) => Some(i.clone()),
                Step::Tick(_) => None,
            })
            .collect();
        let ticks: Vec<Step> = loaded
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Tick(_)))
            .cloned()
            .collect();
        let with_ticks_last = |inputs: Vec<Input>| -> Vec<Step> {
            inputs
                .into_iter()
                .map(Step::Input)
                .chain(ticks.iter().cloned())
                .collect()
        };
        let config = config_of(&loaded.case);
        let (_, scripted) = run(config.clone(), &loaded.steps);
        let (_, baseline) = run(config.clone(), &with_ticks_last(inputs.clone()));
        assert_eq!(
            findings(&baseline),
            findings(&scripted),
            "{}: findings differ when all ticks come after the inputs",
            loaded.name
        );
        let baseline: Vec<Value> = baseline.iter().map(to_json).collect();
        for seed in 0..SEEDS {
            let (_, shuffled) = run(config.clone(), &with_ticks_last(interleave(&inputs, seed)));
            let shuffled: Vec<Value> = shuffled.iter().map(to_json).collect();
            assert!(
                shuffled == baseline,
                "{}: seed {seed} gives other outputs:\n{shuffled:#?}\nthan in order:\n{baseline:#?}",
                loaded.name
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no recording is marked shuffle-able");
}
