//! Compiles the eBPF programs (ebpf/*.bpf.c) with clang and generates the Rust bindings of the
//! event header (ebpf/include/inferwatch_events.h) with bindgen.
//!
//! Without clang the build fails with the command that installs it, unless
//! `INFERWATCH_EBPF_STUB=1` asks for empty objects (for `cargo check` on machines without
//! clang; the agent then reports the kernel source unavailable at run time).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["tcp_lifecycle"];
const CLANG_CANDIDATES: &[&str] = &["clang", "clang-19", "clang-22", "clang-20", "clang-18"];
const INSTALL_HINT: &str =
    "apt-get install -y --no-install-recommends clang-19 libbpf-dev (or run `cargo xtask setup`)";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest.join("../ebpf");
    let include = ebpf_dir.join("include");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo:rerun-if-env-changed=INFERWATCH_EBPF_STUB");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=INFERWATCH_EBPF_CFLAGS");
    println!(
        "cargo:rerun-if-changed={}",
        include.join("inferwatch_events.h").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        include.join("vmlinux.h").display()
    );

    let stub = env::var("INFERWATCH_EBPF_STUB").is_ok_and(|v| v == "1");
    let clang = find_clang();
    for name in PROGRAMS {
        let src = ebpf_dir.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{name}.bpf.o"));
        match (&clang, stub) {
            (Some(clang), _) => compile(clang, &src, &include, &obj),
            (None, true) => {
                std::fs::write(&obj, b"").expect("write stub object");
                println!(
                    "cargo:warning=INFERWATCH_EBPF_STUB=1: {name}.bpf.o is empty; the kernel source will not load"
                );
            }
            (None, false) => panic!(
                "clang not found (tried $CLANG and {CLANG_CANDIDATES:?}); install it: {INSTALL_HINT}"
            ),
        }
    }

    let bindings = bindgen::Builder::default()
        .header_contents(
            "wrapper.h",
            "#include <linux/types.h>\n#include \"inferwatch_events.h\"\n",
        )
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_type("iw_.*")
        .allowlist_var("IW_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!("bindgen over inferwatch_events.h failed: {e} (needs libclang: {INSTALL_HINT})")
        });
    bindings
        .write_to_file(out.join("events_bindings.rs"))
        .expect("write events_bindings.rs");
}

fn find_clang() -> Option<String> {
    let from_env = env::var("CLANG").ok();
    from_env
        .into_iter()
        .chain(CLANG_CANDIDATES.iter().map(|s| s.to_string()))
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

fn compile(clang: &str, src: &Path, include: &Path, obj: &Path) {
    let status = Command::new(clang)
        .args([
            "-g",
            "-O2",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg(format!("-I{}", include.display()))
        // Extra flags for the diagnostic builds of `cargo xtask bench kernel --floor`
        // (`-DIW_DIAG_EMPTY`, `-DIW_DIAG_NO_RING`); unset in every normal build.
        .args(
            env::var("INFERWATCH_EBPF_CFLAGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj)
        .status()
        .unwrap_or_else(|e| panic!("running {clang}: {e}"));
    if !status.success() {
        panic!(
            "{clang} failed to compile {} ({status}); headers come from: {INSTALL_HINT}",
            src.display()
        );
    }
}
