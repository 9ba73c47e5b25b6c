//! `cargo xtask fuzz [--seconds N] [--sanitizer S] [--cmin] [TARGET]`: runs the libFuzzer targets
//! of `fuzz/` through cargo-fuzz (installed when missing), one after the other.
//!
//! Only the stable toolchain is assumed: cargo-fuzz passes nightly `-Z` flags to rustc, so the
//! runs set `RUSTC_BOOTSTRAP=1`. Each run works in `target/fuzz/corpus/<target>/`, outside git
//! (new inputs are added there and kept between runs), into which the seeds built from the
//! tests' fixtures (`inferwatch::fuzzing::seeds`) are written first, and also reads
//! `fuzz/regressions/<target>/`; libFuzzer is bounded per input
//! (`-timeout`, `-max_len`) and in memory (`-rss_limit_mb`, `-malloc_limit_mb`), so a hang or
//! an unbounded allocation fails the run like a crash. A failing input lands in
//! `fuzz/artifacts/<target>/`: move it to `fuzz/regressions/<target>/` with the fix, where
//! `agent/tests/fuzz_regressions.rs` replays it on every `cargo test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::util::{cargo, have_cargo_subcommand, root, run, target_dir};

/// The fuzz targets, declared once, in the agent's `fuzzing` module (a file without
/// dependencies, so that xtask builds without building the agent).
#[path = "../../agent/src/fuzzing/target.rs"]
mod target;

use self::target::Target;

/// On the command line a target is named as cargo-fuzz names it (`kernel_head`).
impl ValueEnum for Target {
    fn value_variants<'a>() -> &'a [Self] {
        &Target::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.about()))
    }
}

/// The sanitizer the targets are built with (cargo-fuzz's `--sanitizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sanitizer {
    /// AddressSanitizer (with LeakSanitizer).
    Address,
    /// No sanitizer: coverage only, about twice as fast (the agent's code is safe Rust).
    None,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Sanitizer::Address => "address",
            Sanitizer::None => "none",
        }
    }
}

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Sanitizer to build with.
    #[arg(long, value_enum, default_value_t = Sanitizer::Address)]
    pub sanitizer: Sanitizer,
    /// After the runs, minimise each working corpus in place (`cargo fuzz cmin`).
    #[arg(long)]
    pub cmin: bool,
    /// One target; all of them when left out.
    #[arg(value_enum)]
    pub target: Option<Target>,
}

pub fn task(args: FuzzArgs) -> anyhow::Result<()> {
    if !have_cargo_subcommand("fuzz") {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let targets = args.target.map_or(Target::ALL.to_vec(), |t| vec![t]);
    // The seeds of every target, from the agent's own fixtures, into the working corpora.
    let corpora = corpus_root();
    std::fs::create_dir_all(&corpora).with_context(|| format!("creating {}", corpora.display()))?;
    run(cargo()
        .args([
            "run",
            "-q",
            "-p",
            "inferwatch",
            "--example",
            "write_fuzz_seeds",
            "--",
        ])
        .arg(&corpora))?;
    let mut failed = Vec::new();
    for target in targets {
        if let Err(e) = fuzz(target, &args) {
            eprintln!(
                "fuzz target {} failed: {e:#}\n  the input is under fuzz/artifacts/{}/; fix the bug \
                 and move it to fuzz/regressions/{}/",
                target.name(),
                target.name(),
                target.name()
            );
            failed.push(target.name());
            continue;
        }
        if args.cmin {
            run(fuzz_cmd("cmin", target, args.sanitizer)
                .arg(corpora.join(target.name()))
                .args(["--", &format!("-max_len={}", target.max_len())]))?;
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo fuzz <verb> --sanitizer S -O <target>` in `fuzz/`, on stable.
fn fuzz_cmd(verb: &str, target: Target, sanitizer: Sanitizer) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "fuzz",
            verb,
            "--sanitizer",
            sanitizer.name(),
            "-O",
            target.name(),
        ]);
    cmd
}

/// `target/fuzz/corpus/`: the working corpora, one folder per target.
fn corpus_root() -> PathBuf {
    target_dir().join("fuzz/corpus")
}

fn fuzz(target: Target, args: &FuzzArgs) -> anyhow::Result<()> {
    let corpus = corpus_root().join(target.name());
    let regressions = Path::new("regressions").join(target.name());
    let mut cmd = fuzz_cmd("run", target, args.sanitizer);
    cmd.arg(&corpus);
    if root().join("fuzz").join(&regressions).is_dir() {
        cmd.arg(&regressions);
    }
    cmd.args([
        "--".to_owned(),
        format!("-max_total_time={}", args.seconds),
        format!("-max_len={}", target.max_len()),
        "-timeout=10".to_owned(),
        "-rss_limit_mb=2048".to_owned(),
        "-malloc_limit_mb=2048".to_owned(),
        "-print_final_stats=1".to_owned(),
    ]);
    run(&mut cmd)
}
