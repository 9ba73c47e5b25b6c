//! Writes the fuzz targets' seed inputs (`inferwatch::fuzzing::seeds`, built from the tests'
//! fixtures) as `<dir>/<target>/seed-*`: `cargo xtask fuzz` runs it into its working corpora
//! under `target/fuzz/corpus/` before each run.
//! `cargo run -p inferwatch --example write_fuzz_seeds -- [DIR]` (default `target/fuzz/corpus`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use inferwatch::fuzzing::{Target, seeds};

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz/corpus"));
    for target in Target::ALL {
        let dir = out.join(target.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut n = 0;
        for (name, data) in seeds(target) {
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            n += 1;
        }
        println!("{}: {n} seeds in {}", target.name(), dir.display());
    }
    Ok(())
}
