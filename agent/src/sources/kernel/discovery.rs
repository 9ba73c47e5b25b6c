//! Finding the servers that already listen when the agent starts: the kernel programs only see
//! `listen()` calls made after they attach, so existing listeners (and the runtimes behind
//! them) are read once from procfs.
//!
//! Cost: one read of /proc/net/tcp{,6} plus a readlink per open fd of every process, once at
//! start-up (tens of milliseconds on a busy node); never on a hot path.

use std::collections::HashMap;
use std::path::Path;

/// A socket listening on a local TCP port, with the process that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The local port.
    pub port: u16,
    /// The process holding the socket (the first found when several share it).
    pub pid: u32,
    /// The runtime the process looks like, from its command line.
    pub runtime: Option<&'static str>,
    /// The gateway the process looks like (`nginx`, `envoy`, `litellm`), from its command line.
    pub gateway: Option<&'static str>,
}

/// Command-line markers of the known runtimes.
const RUNTIME_MARKERS: &[(&str, &str)] = &[
    ("vllm", "vllm"),
    ("sglang", "sglang"),
    ("text-generation-router", "tgi"),
    ("text-generation-launcher", "tgi"),
    ("text_generation_server", "tgi"),
];

/// Which runtime a command line belongs to, if any.
pub fn runtime_of(cmdline: &str) -> Option<&'static str> {
    RUNTIME_MARKERS
        .iter()
        .find(|(marker, _)| cmdline.contains(marker))
        .map(|(_, name)| *name)
}

/// Which gateway (a reverse proxy in front of runtimes, SPEC 2.1) a command line belongs to,
/// if any: the program's own name, not a word anywhere in its arguments (nginx rewrites its
/// argv to `nginx: master process ...` / `nginx: worker process`; LiteLLM's proxy runs as
/// `python .../bin/litellm --config ...`).
pub fn gateway_of(cmdline: &str) -> Option<&'static str> {
    let program = |arg: &str| arg.rsplit('/').next().unwrap_or(arg).to_owned();
    let mut args = cmdline.split_whitespace();
    let first = program(args.next()?);
    if first == "nginx" || first == "nginx:" {
        return Some("nginx");
    }
    if first == "envoy" {
        return Some("envoy");
    }
    if first == "litellm" {
        return Some("litellm");
    }
    // Interpreters: the script is the program.
    if first.starts_with("python") {
        let script = args.find(|a| !a.starts_with('-'))?;
        if program(script) == "litellm" {
            return Some("litellm");
        }
    }
    None
}

/// Parses /proc/net/tcp or tcp6: inode -> local port of every socket in LISTEN (state 0A).
pub fn parse_listening(table: &str) -> HashMap<u64, u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            if *state != "0A" || inode == 0 {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            Some((inode, port))
        })
        .collect()
}

/// Every listening TCP socket of the node (as seen from this network namespace) with its
/// process. Unreadable entries (processes gone, permissions) are skipped.
pub fn listeners(proc_root: &Path) -> Vec<Listener> {
    let mut by_inode = HashMap::new();
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(proc_root.join(table)) {
            by_inode.extend(parse_listening(&text));
        }
    }
    if by_inode.is_empty() {
        return Vec::new();
    }
    let mut found: HashMap<u16, Listener> = HashMap::new();
    let Ok(procs) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(port) = by_inode.get(&inode) {
                found.entry(*port).or_insert_with(|| {
                    let cmdline = std::fs::read(entry.path().join("cmdline"))
                        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                        .unwrap_or_default();
                    Listener {
                        port: *port,
                        pid,
                        runtime: runtime_of(&cmdline),
                        gateway: gateway_of(&cmdline),
                    }
                });
            }
        }
    }
    let mut out: Vec<Listener> = found.into_values().collect();
    out.sort_by_key(|l| l.port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F40 01 00000000:00000000 00:00000000 00000000     0        0 654321 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_only_listening_sockets() {
        let map = parse_listening(TCP);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&123456), Some(&8000));
    }

    #[test]
    fn runtime_markers() {
        assert_eq!(
            runtime_of("/usr/bin/python3 -m vllm.entrypoints.openai.api_server --port 8000"),
            Some("vllm")
        );
        assert_eq!(runtime_of("python -m sglang.launch_server"), Some("sglang"));
        assert_eq!(
            runtime_of("text-generation-router --port 3000"),
            Some("tgi")
        );
        assert_eq!(runtime_of("nginx: master process"), None);
    }

    #[test]
    fn gateway_markers() {
        assert_eq!(
            gateway_of("nginx: master process /usr/sbin/nginx -c /tmp/n.conf"),
            Some("nginx")
        );
        assert_eq!(gateway_of("nginx: worker process"), Some("nginx"));
        assert_eq!(gateway_of("/usr/sbin/nginx -g daemon off;"), Some("nginx"));
        assert_eq!(
            gateway_of("/usr/local/bin/envoy -c /etc/envoy/envoy.yaml"),
            Some("envoy")
        );
        assert_eq!(
            gateway_of("/opt/venv/bin/python3 /opt/venv/bin/litellm --config c.yaml --port 4000"),
            Some("litellm")
        );
        assert_eq!(gateway_of("litellm --config c.yaml"), Some("litellm"));
        // A word in the arguments is not the program.
        assert_eq!(gateway_of("python3 tools/check.py --nginx"), None);
        assert_eq!(gateway_of("/usr/bin/vim nginx.conf"), None);
        assert_eq!(gateway_of(""), None);
    }

    #[test]
    fn finds_this_process_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let found = listeners(Path::new("/proc"));
        let me = found
            .iter()
            .find(|l| l.port == port)
            .expect("own listener found");
        assert_eq!(me.pid, std::process::id());
    }
}
