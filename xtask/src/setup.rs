//! `cargo xtask setup`: installs what the build, the demo and the tests need, on Debian / Ubuntu.
//!
//! What is needed is a list of [`Component`]s: `demo` ensures [`DEMO`] (only what building the
//! agent with its eBPF programs needs), `test` and `setup` ensure [`TEST`] (everything). Each
//! component says what is missing on this host ([`Host`]: the `PATH` and the file-system root
//! its marker paths are read under, so that the check runs in a test without touching the
//! machine) and how to install it: Debian packages, installed together by one `apt-get` as root,
//! then steps that need no root (a Python venv, `cargo install`).
//!
//! Without root, missing Debian packages stop the task with one paragraph that names what is
//! missing and the one command that installs it; nothing is half-done.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use crate::util::{cargo, have, is_root, root, run};

/// Something the tasks need, how to tell whether it is there, and how to install it.
pub struct Component {
    /// What it is, in the messages.
    pub name: &'static str,
    /// What is missing on `host` (one phrase each), and the Debian packages that bring it.
    pub check: fn(&Host) -> Missing,
    /// Installs what needs no root once the packages are there (a venv, `cargo install`);
    /// `None` when the packages are all of it. Runs when `check` found something missing, or
    /// always when `always_install` is set (an idempotent, quick step such as `pip install -r`).
    pub install: Option<fn(&Host) -> anyhow::Result<()>>,
    /// Run `install` even when nothing is missing.
    pub always_install: bool,
}

/// What a component lacks on a host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What is missing, one phrase each (`clang (none of clang, clang-19 … on PATH)`).
    pub what: Vec<String>,
    /// The Debian packages that bring it (empty when a user-level step does).
    pub apt: Vec<&'static str>,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.what.is_empty()
    }
}

/// The clang names `agent/build.rs` tries, in its order (after `$CLANG`).
pub const CLANG_NAMES: &[&str] = &["clang", "clang-19", "clang-22", "clang-20", "clang-18"];

/// Building the agent: clang compiles the eBPF programs, libclang serves bindgen, libbpf-dev
/// and linux-libc-dev bring the headers the programs include.
pub const EBPF_BUILD: Component = Component {
    name: "the eBPF build (clang, libclang, libbpf and kernel headers)",
    check: ebpf_build_missing,
    install: None,
    always_install: false,
};

/// promtool (the alert-rule tests of deploy-check), bpftool (debugging the programs by hand)
/// and nginx (the end-to-end tests' real gateway).
pub const DEPLOY_TOOLS: Component = Component {
    name: "promtool, bpftool and nginx",
    check: deploy_tools_missing,
    install: None,
    always_install: false,
};

/// The Python venv of real OTLP peers for the tests (`tests/python/requirements.txt`).
pub const PYTHON_PEERS: Component = Component {
    name: "the Python venv of the tests' OTLP peers (.venv)",
    check: python_peers_missing,
    install: Some(install_python_peers),
    always_install: true,
};

/// cargo-deny for `cargo deny check bans licenses sources`.
pub const CARGO_DENY: Component = Component {
    name: "cargo-deny",
    check: cargo_deny_missing,
    install: Some(install_cargo_deny),
    always_install: false,
};

/// The real vLLM of the `real_vllm` tier and `demo --runtime vllm` (`crate::real_vllm`): a
/// venv and a model under `target/real-vllm/`, no root needed.
pub const REAL_VLLM: Component = Component {
    name: "the real vLLM (target/real-vllm)",
    check: crate::real_vllm::missing,
    install: Some(crate::real_vllm::install),
    always_install: false,
};

/// What `cargo xtask demo` needs: the agent's build, nothing of the tests.
pub const DEMO: &[&Component] = &[&EBPF_BUILD];

/// What `cargo xtask demo --runtime vllm` needs.
pub const DEMO_VLLM: &[&Component] = &[&EBPF_BUILD, &REAL_VLLM];

/// What `cargo xtask test` and `cargo xtask setup` need: everything.
pub const TEST: &[&Component] = &[
    &EBPF_BUILD,
    &DEPLOY_TOOLS,
    &PYTHON_PEERS,
    &CARGO_DENY,
    &REAL_VLLM,
];

/// The host the components are checked on.
#[derive(Debug, Clone)]
pub struct Host {
    /// The `PATH` programs are looked up in.
    pub path: OsString,
    /// Where the absolute marker paths (`/usr/include/...`) are read: `/`, or a test's folder.
    pub sysroot: PathBuf,
    /// The repository (the venv lives in it).
    pub repo: PathBuf,
    /// `$CLANG`, which `agent/build.rs` tries first.
    pub clang: Option<String>,
}

impl Host {
    /// This machine.
    pub fn current() -> Self {
        Self {
            path: std::env::var_os("PATH").unwrap_or_default(),
            sysroot: PathBuf::from("/"),
            repo: root(),
            clang: std::env::var("CLANG").ok(),
        }
    }

    /// Whether `program` is an executable file in a `PATH` folder.
    pub fn on_path(&self, program: &str) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::env::split_paths(&self.path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    }

    /// `absolute` (a path such as `/usr/include/bpf/bpf_helpers.h`) under the sysroot.
    pub fn file(&self, absolute: &str) -> PathBuf {
        self.sysroot.join(absolute.trim_start_matches('/'))
    }

    fn exists(&self, absolute: &str) -> bool {
        self.file(absolute).exists()
    }

    /// Whether any file in `dir` (absolute, under the sysroot) has a name starting with
    /// `prefix`: libclang's file name carries its version.
    fn any_file_starting(&self, dir: &str, prefix: &str) -> bool {
        std::fs::read_dir(self.file(dir)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
    }
}

fn ebpf_build_missing(host: &Host) -> Missing {
    let mut missing = Missing::default();
    let clang_from_env = host
        .clang
        .as_deref()
        .is_some_and(|c| host.on_path(c) || host.exists(c));
    if !clang_from_env && !CLANG_NAMES.iter().any(|c| host.on_path(c)) {
        missing.what.push(format!(
            "clang (none of {} on PATH)",
            CLANG_NAMES.join(", ")
        ));
        missing.apt.push("clang-19");
    }
    // bindgen loads libclang from LLVM's folder or the multiarch library folder.
    let libclang = std::fs::read_dir(host.file("/usr/lib")).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with("llvm-")
                && host.any_file_starting(&format!("/usr/lib/{name}/lib"), "libclang"))
                || (name.ends_with("-linux-gnu")
                    && host.any_file_starting(&format!("/usr/lib/{name}"), "libclang"))
        })
    });
    if !libclang {
        missing
            .what
            .push("libclang (for bindgen; no /usr/lib/llvm-*/lib/libclang*)".into());
        missing.apt.push("libclang1-19");
    }
    for (header, package) in [
        ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
        ("/usr/include/linux/types.h", "linux-libc-dev"),
    ] {
        if !host.exists(header) {
            missing.what.push(format!("{header} (from {package})"));
            missing.apt.push(package);
        }
    }
    missing
}

fn deploy_tools_missing(host: &Host) -> Missing {
    let mut missing = Missing::default();
    for (program, package) in [("promtool", "prometheus"), ("bpftool", "bpftool")] {
        if !host.on_path(program) {
            missing.what.push(format!("{program} (from {package})"));
            missing.apt.push(package);
        }
    }
    // The end-to-end tests' real gateway; /usr/sbin is not on every user's PATH.
    if !host.exists("/usr/sbin/nginx") {
        missing.what.push("nginx (from nginx-light)".into());
        missing.apt.push("nginx-light");
    }
    missing
}

fn python_peers_missing(host: &Host) -> Missing {
    let mut missing = Missing::default();
    if !host.repo.join(".venv/bin/python").exists() {
        missing.what.push("the venv .venv".into());
        missing.apt.extend(venv_packages(host));
    }
    missing
}

/// The Debian packages that making a venv needs on `host`: Debian's python3 makes venvs only
/// with python3-venv; another python may not need it.
pub fn venv_packages(host: &Host) -> Option<&'static str> {
    let venv_works = Command::new(host_python(host))
        .args(["-c", "import ensurepip, venv"])
        .env("PATH", &host.path)
        .output()
        .is_ok_and(|o| o.status.success());
    (!venv_works).then_some("python3-venv")
}

fn host_python(host: &Host) -> &'static str {
    if host.on_path("python3") {
        "python3"
    } else {
        "python"
    }
}

fn install_python_peers(host: &Host) -> anyhow::Result<()> {
    let venv = host.repo.join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new(host_python(host))
            .arg("-m")
            .arg("venv")
            .arg(&venv))?;
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
        .arg(host.repo.join("tests/python/requirements.txt")))
}

fn cargo_deny_missing(_host: &Host) -> Missing {
    let installed = cargo()
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    Missing {
        what: if installed {
            Vec::new()
        } else {
            vec!["cargo-deny".into()]
        },
        apt: Vec::new(),
    }
}

fn install_cargo_deny(_host: &Host) -> anyhow::Result<()> {
    // Building it takes a few minutes (see docs/security.md); an installed one is kept.
    run(cargo().args(["install", "--locked", "cargo-deny"]))
}

/// What `components` lack on `host`.
#[derive(Debug, Default)]
pub struct Plan {
    /// Per component with something missing: its name and what.
    pub missing: Vec<(&'static str, Missing)>,
}

impl Plan {
    /// Checks `components` on `host`; installs nothing.
    pub fn check(components: &[&Component], host: &Host) -> Self {
        let missing = components
            .iter()
            .map(|c| (c.name, (c.check)(host)))
            .filter(|(_, m)| !m.is_empty())
            .collect();
        Self { missing }
    }

    /// The Debian packages to install, in order, without repeats.
    pub fn apt_packages(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for package in self.missing.iter().flat_map(|(_, m)| m.apt.iter().copied()) {
            if !out.contains(&package) {
                out.push(package);
            }
        }
        out
    }

    /// The one command that installs the Debian packages, for a user with sudo.
    pub fn apt_command(&self) -> String {
        format!(
            "sudo sh -c 'apt-get update && apt-get install -y --no-install-recommends {}'",
            self.apt_packages().join(" ")
        )
    }

    /// The message when packages are missing and this process cannot install them: one
    /// paragraph with what is missing and the command that installs it.
    pub fn cannot_install_message(&self, task: &str) -> String {
        let mut what = String::new();
        for (i, item) in self
            .missing
            .iter()
            .filter(|(_, m)| !m.apt.is_empty())
            .flat_map(|(_, m)| m.what.iter())
            .enumerate()
        {
            if i > 0 {
                what.push_str(", ");
            }
            let _ = write!(what, "{item}");
        }
        format!(
            "`cargo xtask {task}` needs packages this machine lacks: {what}. Install them with \
             `{}`, then run `cargo xtask {task}` again (as root it installs them itself).",
            self.apt_command()
        )
    }
}

/// Which task's needs `cargo xtask setup` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Needs {
    /// What `cargo xtask demo` needs ([`DEMO`]).
    Demo,
    /// What `cargo xtask test` needs: everything ([`TEST`]).
    Test,
}

impl Needs {
    fn components(self) -> &'static [&'static Component] {
        match self {
            Needs::Demo => DEMO,
            Needs::Test => TEST,
        }
    }

    fn task(self) -> &'static str {
        match self {
            Needs::Demo => "demo",
            Needs::Test => "test",
        }
    }
}

/// What `cargo xtask setup` was asked to do.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Whose needs: the demo's or the tests' (everything).
    #[arg(long = "for", value_enum, default_value_t = Needs::Test)]
    pub needs: Needs,
    /// Only report what is missing (non-zero exit when something is); install nothing.
    #[arg(long)]
    pub check: bool,
    /// Read the marker paths (`/usr/include/...`) under this folder instead of `/` (tests).
    #[arg(long, hide = true)]
    pub sysroot: Option<PathBuf>,
}

/// `cargo xtask setup [--for demo|test] [--check]`.
pub fn task(args: &SetupArgs) -> anyhow::Result<()> {
    let mut host = Host::current();
    if let Some(sysroot) = &args.sysroot {
        host.sysroot.clone_from(sysroot);
    }
    let components = args.needs.components();
    if !args.check {
        return ensure(components, "setup", &host);
    }
    let plan = Plan::check(components, &host);
    if plan.missing.is_empty() {
        println!(
            "setup: nothing missing for `cargo xtask {}`",
            args.needs.task()
        );
        return Ok(());
    }
    if !plan.apt_packages().is_empty() {
        anyhow::bail!(plan.cannot_install_message(args.needs.task()));
    }
    let items: Vec<String> = plan
        .missing
        .iter()
        .flat_map(|(_, m)| m.what.iter().cloned())
        .collect();
    anyhow::bail!(
        "missing: {}; `cargo xtask setup` installs it (no root needed)",
        items.join(", ")
    )
}

/// Installs what `components` lack on `host` (`task` names the xtask command in messages):
/// first every missing Debian package in one `apt-get` (root only; without root it fails with
/// the command to run), then each component's user-level step.
pub fn ensure(components: &[&Component], task: &str, host: &Host) -> anyhow::Result<()> {
    let plan = Plan::check(components, host);
    let packages = plan.apt_packages();
    if !packages.is_empty() {
        if !is_root() {
            anyhow::bail!(plan.cannot_install_message(task));
        }
        if !have("apt-get") {
            anyhow::bail!(
                "`cargo xtask {task}` needs {}, and this machine has no apt-get: install the \
                 equivalents of the Debian packages {} with its package manager",
                plan.missing
                    .iter()
                    .flat_map(|(_, m)| m.what.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(", "),
                packages.join(" ")
            );
        }
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for component in components {
        let Some(install) = component.install else {
            continue;
        };
        let missing = plan.missing.iter().any(|(name, _)| *name == component.name);
        if missing || component.always_install {
            install(host)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A host with an empty PATH folder and an empty sysroot: nothing installed.
    fn bare_host(dir: &Path) -> Host {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("create bin");
        Host {
            path: bin.into_os_string(),
            sysroot: dir.join("sysroot"),
            repo: dir.join("repo"),
            clang: None,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-setup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn touch(path: &Path, executable: bool) {
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(path, b"").expect("write marker");
        if executable {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }

    #[test]
    fn demo_preflight_without_clang_names_the_install_command() {
        let dir = scratch("no-clang");
        let host = bare_host(&dir);
        let plan = Plan::check(DEMO, &host);
        let message = plan.cannot_install_message("demo");
        assert!(
            message.contains("clang (none of clang, clang-19"),
            "{message}"
        );
        assert!(
            message.contains(
                "sudo sh -c 'apt-get update && apt-get install -y --no-install-recommends \
                 clang-19 libclang1-19 libbpf-dev linux-libc-dev'"
            ),
            "{message}"
        );
        assert!(
            message.contains("then run `cargo xtask demo` again"),
            "{message}"
        );
        // One paragraph, nothing of the tests' needs.
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("prometheus") && !message.contains("cargo-deny"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn demo_preflight_finds_nothing_missing_on_an_equipped_host() {
        let dir = scratch("equipped");
        let host = bare_host(&dir);
        touch(&dir.join("bin/clang-19"), true);
        for marker in [
            "usr/lib/llvm-19/lib/libclang-19.so.1",
            "usr/include/bpf/bpf_helpers.h",
            "usr/include/linux/types.h",
        ] {
            touch(&host.sysroot.join(marker), false);
        }
        let plan = Plan::check(DEMO, &host);
        assert!(plan.missing.is_empty(), "{:?}", plan.missing);
        assert!(plan.apt_packages().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_clang_that_is_not_executable_does_not_count() {
        let dir = scratch("clang-not-exec");
        let host = bare_host(&dir);
        touch(&dir.join("bin/clang"), false);
        let missing = ebpf_build_missing(&host);
        assert!(missing.apt.contains(&"clang-19"), "{missing:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn packages_are_listed_once_across_components() {
        let plan = Plan {
            missing: vec![
                (
                    "a",
                    Missing {
                        what: vec!["x".into()],
                        apt: vec!["clang-19", "libbpf-dev"],
                    },
                ),
                (
                    "b",
                    Missing {
                        what: vec!["y".into()],
                        apt: vec!["libbpf-dev", "prometheus"],
                    },
                ),
            ],
        };
        assert_eq!(
            plan.apt_packages(),
            vec!["clang-19", "libbpf-dev", "prometheus"]
        );
    }
}
