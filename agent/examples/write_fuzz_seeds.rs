//! Writes the fuzz targets' seed inputs (`inferwatch::fuzzing::seeds`) into
//! `fuzz/corpus/<target>/seed-*`, before a `cargo fuzz cmin` minimises the corpus:
//! `cargo run -p inferwatch --example write_fuzz_seeds`.

use std::path::Path;

use anyhow::Context;
use inferwatch::fuzzing::{Target, seeds};

fn main() -> anyhow::Result<()> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for target in Target::ALL {
        let dir = fuzz.join("corpus").join(target.name());
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
