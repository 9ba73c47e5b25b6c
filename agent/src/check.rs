//! `inferwatch check`: what works on this node, per source, and why not.

use std::path::Path;

use crate::config::AgentConfig;
use crate::internal_events::ErrorChain;
use crate::sources::kernel::KernelProbes;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// The source the item belongs to.
    pub source: &'static str,
    /// What was checked.
    pub what: String,
    /// Whether it works.
    pub ok: bool,
    /// Why (or why not).
    pub detail: String,
}

/// Linux capabilities the kernel source may need, by number (linux/capability.h).
const CAPS: &[(u32, &str)] = &[
    (21, "CAP_SYS_ADMIN"),
    (24, "CAP_SYS_RESOURCE"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// The effective capability set of this process, from /proc/self/status.
pub fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Runs every check of the kernel source, including a real load and attach of the programs.
pub fn kernel_checks(config: &AgentConfig) -> Vec<CheckItem> {
    let item = |what: &str, ok: bool, detail: String| CheckItem {
        source: "kernel",
        what: what.to_owned(),
        ok,
        detail,
    };
    let mut items = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let version_ok = kernel_at_least(&release, 6, 3);
    items.push(item(
        "kernel version",
        version_ok,
        format!("{release} (needs >= 6.3: the sock_send_length / sock_recv_length tracepoints)"),
    ));
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    items.push(item(
        "BTF",
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present (CO-RE relocations)".into()
        } else {
            "/sys/kernel/btf/vmlinux missing: the kernel lacks CONFIG_DEBUG_INFO_BTF".into()
        },
    ));
    match effective_caps() {
        Some(caps) => {
            let have_bpf = has_cap(caps, 39) || has_cap(caps, 21);
            let have_perfmon = has_cap(caps, 38) || has_cap(caps, 21);
            let names: Vec<&str> = CAPS
                .iter()
                .filter(|(n, _)| has_cap(caps, *n))
                .map(|(_, name)| *name)
                .collect();
            // Name what is missing first: that is what the operator has to add.
            let missing: Vec<&str> = [("CAP_BPF", have_bpf), ("CAP_PERFMON", have_perfmon)]
                .iter()
                .filter(|(_, have)| !have)
                .map(|(name, _)| *name)
                .collect();
            items.push(item(
                "capabilities",
                have_bpf && have_perfmon,
                format!(
                    "{}effective: {} (needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)",
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("missing {}; ", missing.join(" and "))
                    },
                    if names.is_empty() {
                        "none of them".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        None => items.push(item(
            "capabilities",
            false,
            "cannot read /proc/self/status".into(),
        )),
    }
    let ports = config.kernel.ports();
    match KernelProbes::load(&ports, config.kernel.ring_buffer_bytes) {
        Ok(probes) => {
            drop(probes);
            items.push(item(
                "load and attach",
                true,
                format!(
                    "{} programs (BTF tracepoints) loaded and attached, then detached; watched ports {ports:?}",
                    crate::sources::kernel::PROGRAM_COUNT
                ),
            ));
        }
        Err(err) => items.push(item("load and attach", false, ErrorChain(&err).to_string())),
    }
    items
}

/// Checks the NVML source: loads the library and lists the GPUs it sees. Takes the source's
/// own config (`library_path`, `period_ms`) so that the check loads what `run` would.
pub fn nvml_checks(config: &crate::sources::nvml::NvmlConfig) -> Vec<CheckItem> {
    use crate::sources::nvml::{MIN_PERIOD_MS, NvmlSource};
    let item = |what: &str, ok: bool, detail: String| CheckItem {
        source: "nvml",
        what: what.to_owned(),
        ok,
        detail,
    };
    let mut items = Vec::new();
    items.push(item(
        "period",
        config.period_ms >= MIN_PERIOD_MS,
        format!("{} ms (minimum {MIN_PERIOD_MS} ms)", config.period_ms),
    ));
    match NvmlSource::check(config) {
        Ok(check) => {
            items.push(item(
                "library",
                true,
                format!(
                    "{} loaded, driver {}",
                    check.library,
                    check.driver_version.as_deref().unwrap_or("unknown")
                ),
            ));
            for (index, uuid, name) in &check.gpus {
                items.push(item(
                    &format!("gpu {index}"),
                    true,
                    format!("{uuid} {name}"),
                ));
            }
        }
        Err(err) => items.push(item("library", false, ErrorChain(&err).to_string())),
    }
    items
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let maj = parts.next().and_then(|p| p.parse::<u32>().ok());
    let min = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (maj, min) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// Formats the report as aligned lines.
pub fn render(items: &[CheckItem]) -> String {
    let mut out = String::new();
    for i in items {
        out.push_str(&format!(
            "{:<8} {:<18} {:<4} {}\n",
            i.source,
            i.what,
            if i.ok { "ok" } else { "FAIL" },
            i.detail
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose message is `text` and whose cause is `cause`.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let err = Layer(
            "loading NVML",
            Some(Box::new(Layer(
                "libnvidia-ml.so.1: cannot open shared object file",
                Some(Box::new(Layer(
                    "libnvidia-ml.so.1: cannot open shared object file",
                    Some(Box::new(Layer("No such file or directory", None))),
                ))),
            ))),
        );
        assert_eq!(
            ErrorChain(&err).to_string(),
            "loading NVML: libnvidia-ml.so.1: cannot open shared object file: No such file or directory"
        );
        // A message that already ends with its cause's text.
        let err = Layer(
            "binding 0.0.0.0:9464: Address already in use",
            Some(Box::new(Layer("Address already in use", None))),
        );
        assert_eq!(
            ErrorChain(&err).to_string(),
            "binding 0.0.0.0:9464: Address already in use"
        );
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.18.44-fc-v595", 5, 8));
        assert!(kernel_at_least("5.8.0", 5, 8));
        assert!(!kernel_at_least("5.4.0-100-generic", 5, 8));
        assert!(!kernel_at_least("garbage", 5, 8));
    }
}
