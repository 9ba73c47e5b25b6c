//! The demo's preflight through the real `xtask` binary, on a host view where nothing is
//! installed: a PATH without clang and an empty folder as the root of the marker paths. It runs
//! without root and installs nothing (`setup --check`), and checks what a new user would read.

use std::path::PathBuf;
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-preflight-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).expect("create scratch bin");
    std::fs::create_dir_all(dir.join("sysroot")).expect("create scratch sysroot");
    dir
}

#[test]
fn demo_preflight_without_clang_is_one_paragraph_with_the_install_command() {
    let dir = scratch("no-clang");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["setup", "--for", "demo", "--check", "--sysroot"])
        .arg(dir.join("sysroot"))
        .env("PATH", dir.join("bin"))
        .env_remove("CLANG")
        // The message must not change into a backtrace when one is asked for.
        .env("RUST_BACKTRACE", "full")
        .output()
        .expect("run the xtask binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit status {}: {stderr}",
        out.status
    );
    assert!(
        stderr.starts_with("error: `cargo xtask demo` needs packages this machine lacks: clang"),
        "{stderr}"
    );
    assert!(
        stderr.contains("apt-get install -y --no-install-recommends clang-19 libclang1-19 libbpf-dev linux-libc-dev"),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one paragraph: {stderr}"
    );
    for noise in ["backtrace", "panicked", "Caused by", "Error: "] {
        assert!(!stderr.contains(noise), "`{noise}` in: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn demo_preflight_passes_when_the_build_tools_are_there() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("equipped");
    let clang = dir.join("bin/clang-19");
    std::fs::write(&clang, b"#!/bin/sh\n").expect("write clang");
    std::fs::set_permissions(&clang, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for marker in [
        "usr/lib/llvm-19/lib/libclang.so.1",
        "usr/include/bpf/bpf_helpers.h",
        "usr/include/linux/types.h",
    ] {
        let path = dir.join("sysroot").join(marker);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&path, b"").expect("write marker");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["setup", "--for", "demo", "--check", "--sysroot"])
        .arg(dir.join("sysroot"))
        .env("PATH", dir.join("bin"))
        .env_remove("CLANG")
        .output()
        .expect("run the xtask binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing missing"));
    std::fs::remove_dir_all(&dir).ok();
}
