//! `cargo xtask gpu-check`: the NVML source on a real NVIDIA GPU (`tests/gpu-check/gpu_check.sh`:
//! a PyTorch "runtime" and, halfway, a PyTorch hog; checks that both pids, their memory and SM
//! shares are seen and that the hog has the larger share).
//!
//! Without `--bin` it builds the agent's `nvml_dump` example in release mode and runs the
//! script with it. With `--bin PATH` it runs the script with a prebuilt `nvml_dump` (built
//! elsewhere and carried to the GPU machine, which may have no toolchain).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::util::{cargo, root, run};

/// Runs the GPU check with `bin`, or with a freshly built `nvml_dump`.
pub fn task(bin: Option<&Path>) -> anyhow::Result<()> {
    let dump = match bin {
        Some(path) => {
            anyhow::ensure!(
                path.is_file(),
                "--bin {}: no such file (build it with `cargo build --release --example nvml_dump -p inferwatch`)",
                path.display()
            );
            path.to_path_buf()
        }
        None => build_dump()?,
    };
    let script = root().join("tests/gpu-check/gpu_check.sh");
    run(Command::new("bash").arg(&script).arg(&dump))
        .context("the GPU check failed (its report above says which check)")
}

/// Builds `nvml_dump` (release) and returns its path.
fn build_dump() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--example",
        "nvml_dump",
        "-p",
        "inferwatch",
    ]))?;
    // Where cargo put it: the configured target directory, else the workspace's.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let dump = target.join("release/examples/nvml_dump");
    anyhow::ensure!(
        dump.is_file(),
        "built nvml_dump not found at {}",
        dump.display()
    );
    Ok(dump)
}
