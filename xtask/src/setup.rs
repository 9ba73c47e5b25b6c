//! `cargo xtask setup`: installs the build and test dependencies on Debian / Ubuntu when run as
//! root, and prints the commands otherwise.

use std::path::Path;
use std::process::Command;

use crate::util::{have, is_root, root, run};

/// Debian packages: clang and libbpf headers build the eBPF programs (and libclang serves
/// bindgen), bpftool helps debugging, prometheus brings promtool for the alert-rule tests.
const APT_PACKAGES: &[&str] = &[
    "clang-19",
    "libclang1-19",
    "libbpf-dev",
    "linux-libc-dev",
    "bpftool",
    "prometheus",
    "python3-venv",
    "nginx-light",
];

/// The packages' marker files: skip apt when all are present.
const MARKERS: &[&str] = &[
    "/usr/bin/clang-19",
    "/usr/include/bpf/bpf_helpers.h",
    "/usr/include/linux/types.h",
    "/usr/bin/promtool",
    "/usr/sbin/nginx",
];

pub fn task() -> anyhow::Result<()> {
    let missing_apt = MARKERS.iter().any(|m| !Path::new(m).exists());
    let venv = root().join(".venv");
    let python = venv.join("bin/python");
    let requirements = root().join("tests/python/requirements.txt");
    if missing_apt {
        if is_root() && have("apt-get") {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(APT_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        } else {
            eprintln!(
                "missing build packages; run as root:\n  apt-get update && apt-get install -y --no-install-recommends {}",
                APT_PACKAGES.join(" ")
            );
        }
    }
    if !python.exists() {
        let host_python = if have("python3") { "python3" } else { "python" };
        run(Command::new(host_python).arg("-m").arg("venv").arg(&venv))?;
    }
    // pip is quick when everything is already there.
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))?;
    // cargo-deny checks licenses, bans and sources in `cargo xtask test`. Building it takes a
    // few minutes (see docs/security.md), so an installed one is kept.
    let deny_installed = crate::util::cargo()
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !deny_installed {
        run(crate::util::cargo().args(["install", "--locked", "cargo-deny"]))?;
    }
    Ok(())
}
