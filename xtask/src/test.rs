//! `cargo xtask test`: setup, format, lints, unit tests, kernel tests.

use crate::util::{cargo, is_root, run, run_tests};

pub fn task() -> anyhow::Result<()> {
    let setup = crate::setup::Host::current();
    crate::setup::ensure(crate::setup::TEST, "test", &setup)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    crate::deploy_check::run()?;
    // Licenses, banned crates and registries of every dependency (deny.toml); setup installs
    // cargo-deny, a machine without it says so instead of failing here.
    if cargo()
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(cargo().args(["deny", "check", "bans", "licenses", "sources"]))?;
    } else {
        eprintln!(
            "*** cargo-deny not installed: `cargo deny check` skipped (run `cargo xtask setup`) ***"
        );
    }
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--no-fail-fast"]);
    if is_root() {
        // As root the kernel tests must run: a skip would hide a broken kernel source.
        tests.env("INFERWATCH_REQUIRE_KERNEL_TESTS", "1");
        // And so must the real-vLLM tier, unless a developer skipped it (never under CI).
        if !crate::real_vllm::skipped()? {
            tests.env("INFERWATCH_REQUIRE_REAL_RUNTIME", "1");
        }
    } else {
        eprintln!(
            "*** not root: the kernel tests will be SKIPPED (run `cargo xtask test` as root) ***"
        );
    }
    let totals = run_tests(&mut tests)?;
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.ok {
        anyhow::bail!("{} test(s) failed", totals.failed.max(1));
    }
    Ok(())
}
