//! Compiles the eBPF programs (ebpf/*.bpf.c) with clang and generates the Rust bindings of the
//! event header (ebpf/include/inferwatch_events.h) with bindgen.
//!
//! Without clang, the libbpf headers or libclang the build fails with one paragraph naming what
//! is missing and the command that installs it (never a panic: with `RUST_BACKTRACE=1` a panic
//! buries the message under a backtrace), unless `INFERWATCH_EBPF_STUB=1` asks for empty objects
//! (for `cargo check` on machines without clang; the agent then reports the kernel source
//! unavailable at run time).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["tcp_lifecycle", "process_exit"];
const CLANG_CANDIDATES: &[&str] = &["clang", "clang-19", "clang-22", "clang-20", "clang-18"];
const INSTALL_HINT: &str = "install them with `sudo apt-get install -y --no-install-recommends \
     clang-19 libclang1-19 libbpf-dev linux-libc-dev`, or run `cargo xtask setup --for demo` as \
     root, which installs them";
/// Where the programs' `#include <bpf/bpf_helpers.h>` is looked for before clang runs, so that
/// a missing libbpf-dev is named instead of surfacing as a compile error.
const LIBBPF_INCLUDE_DIRS: &[&str] = &["/usr/include", "/usr/local/include"];

/// Ends the build with `message` (one paragraph): as `cargo:warning` lines, which cargo shows
/// even on success paths, and on stderr, which cargo shows when the script fails.
fn fail(message: &str) -> ! {
    for line in message.lines() {
        println!("cargo:warning={line}");
    }
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn env_path(name: &str) -> PathBuf {
    match env::var_os(name) {
        Some(v) => PathBuf::from(v),
        None => fail(&format!("{name} is not set: run this build through cargo")),
    }
}

fn main() {
    let manifest = env_path("CARGO_MANIFEST_DIR");
    let ebpf_dir = manifest.join("../ebpf");
    let include = ebpf_dir.join("include");
    let out = env_path("OUT_DIR");

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
    if clang.is_some() && !has_libbpf_headers() {
        fail(&format!(
            "the libbpf headers are missing (no bpf/bpf_helpers.h under {}), which the eBPF \
             programs include; {INSTALL_HINT}.",
            LIBBPF_INCLUDE_DIRS.join(" or ")
        ));
    }
    for name in PROGRAMS {
        let src = ebpf_dir.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{name}.bpf.o"));
        match (&clang, stub) {
            (Some(clang), _) => compile(clang, &src, &include, &obj),
            (None, true) => {
                if let Err(e) = std::fs::write(&obj, b"") {
                    fail(&format!("writing the stub object {}: {e}", obj.display()));
                }
                println!(
                    "cargo:warning=INFERWATCH_EBPF_STUB=1: {name}.bpf.o is empty; the kernel source will not load"
                );
            }
            (None, false) => fail(&format!(
                "clang is missing (tried $CLANG and {}), which compiles the eBPF programs; \
                 {INSTALL_HINT}. (`INFERWATCH_EBPF_STUB=1 cargo check` type-checks without it.)",
                CLANG_CANDIDATES.join(", ")
            )),
        }
    }

    // bindgen panics when it cannot load libclang: keep that panic's message and backtrace off
    // the screen and report it as the missing package it is.
    let quiet_panics = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let generated = std::panic::catch_unwind(|| {
        bindgen::Builder::default()
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
    });
    std::panic::set_hook(quiet_panics);
    let bindings = match generated {
        Ok(Ok(bindings)) => bindings,
        Ok(Err(e)) => fail(&format!(
            "bindgen could not read ebpf/include/inferwatch_events.h: {e}. If the message is \
             about missing headers or libclang, {INSTALL_HINT}."
        )),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            fail(&format!(
                "bindgen could not run libclang ({reason}), which generates the Rust side of \
                 the event header; {INSTALL_HINT}."
            ))
        }
    };
    let target = out.join("events_bindings.rs");
    if let Err(e) = bindings.write_to_file(&target) {
        fail(&format!("writing {}: {e}", target.display()));
    }
}

fn has_libbpf_headers() -> bool {
    LIBBPF_INCLUDE_DIRS
        .iter()
        .any(|dir| Path::new(dir).join("bpf/bpf_helpers.h").exists())
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
        .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
    if !status.success() {
        fail(&format!(
            "{clang} failed to compile {} ({status}): its messages are above. A missing \
             header means a missing package: {INSTALL_HINT}.",
            src.display()
        ));
    }
}
