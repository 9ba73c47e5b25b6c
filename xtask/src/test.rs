//! `cargo xtask test`: setup, format, lints, unit tests, kernel tests.

use crate::util::{cargo, is_root, run};

pub fn task() -> anyhow::Result<()> {
    crate::setup::task()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut tests = cargo();
    tests.args(["test", "--workspace"]);
    if is_root() {
        // As root the kernel tests must run: a skip would hide a broken kernel source.
        tests.env("INFERWATCH_REQUIRE_KERNEL_TESTS", "1");
    } else {
        eprintln!(
            "*** not root: the kernel tests will be SKIPPED (run `sudo cargo xtask test`) ***"
        );
    }
    run(&mut tests)
}
