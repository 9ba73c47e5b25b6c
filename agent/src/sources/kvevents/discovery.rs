//! KV event publishers found without configuration (contract §3.3): a vLLM started with
//! `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
//! "tcp://*:5557"}'` says on its command line where it publishes.
//!
//! The API-server process keeps that command line (vLLM retitles only its children:
//! `VLLM::EngineCore_DP<rank>` through `setproctitle`); its EngineCore children publish, data
//! parallel rank `r` on the endpoint's port + `r` (vLLM's `offset_endpoint_port`). The spans
//! carry the API server's pid as `vllm.process_id`, so the endpoint is named `pid:<pid>`, the
//! pid as the runtime's own PID namespace numbers it (the last `NSpid` entry), which is one of
//! the names the correlator ties that runtime's spans by.
//!
//! A process whose parent has the same command line (a forked child before it retitles) is
//! not a separate runtime. Only the shape of the flags is read; nothing else on the command
//! line leaves this module.

use std::collections::BTreeSet;
use std::path::Path;

use super::KvEventsEndpoint;

/// vLLM's default publisher endpoint.
const DEFAULT_ENDPOINT: &str = "tcp://*:5557";

/// The publishers one command line names: `(endpoint to connect to, topic)` for each local
/// data-parallel rank, or nothing when KV events are off or not published over ZMQ.
pub fn endpoints_of_cmdline(args: &[String]) -> Vec<(String, String)> {
    let Some(config) = flag_value(args, "--kv-events-config") else {
        return Vec::new();
    };
    let Ok(config) = serde_json::from_str::<serde_json::Value>(&config) else {
        return Vec::new();
    };
    let enabled = config
        .get("enable_kv_cache_events")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let publisher = config
        .get("publisher")
        .and_then(serde_json::Value::as_str)
        .unwrap_or(if enabled { "zmq" } else { "null" });
    if !enabled || publisher != "zmq" {
        return Vec::new();
    }
    let endpoint = config
        .get("endpoint")
        .and_then(serde_json::Value::as_str)
        .unwrap_or(DEFAULT_ENDPOINT);
    let topic = config
        .get("topic")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_string();
    let number = |flag: &str| flag_value(args, flag).and_then(|v| v.parse::<u32>().ok());
    // Ranks this node runs: `--data-parallel-size-local` of them from `--data-parallel-start-rank`
    // (multi-node), else all of `--data-parallel-size`. At most 64: a bad flag must not make
    // thousands of subscribers.
    let size = number("--data-parallel-size-local")
        .or_else(|| number("--data-parallel-size"))
        .unwrap_or(1)
        .clamp(1, 64);
    let start = number("--data-parallel-start-rank").unwrap_or(0);
    (start..start.saturating_add(size))
        .filter_map(|rank| connectable(endpoint, rank))
        .map(|ep| (ep, topic.clone()))
        .collect()
}

/// The endpoint a subscriber on this host connects to for the publisher of `rank`: the bind
/// address's wildcard becomes loopback, the port is offset by the rank (as vLLM does); `None`
/// for a transport a subscriber cannot reach (`inproc`) or a port the OS picks (`0`).
fn connectable(bind: &str, rank: u32) -> Option<String> {
    if let Some(rest) = bind.strip_prefix("tcp://") {
        let (host, port) = rest.rsplit_once(':')?;
        let port: u32 = port.parse().ok()?;
        if port == 0 {
            return None;
        }
        let port = port
            .checked_add(rank)
            .filter(|p| *p <= u32::from(u16::MAX))?;
        let host = match host {
            "*" | "0.0.0.0" | "" => "127.0.0.1",
            "[::]" | "::" => "[::1]",
            h => h,
        };
        return Some(format!("tcp://{host}:{port}"));
    }
    if bind.starts_with("ipc://") {
        return Some(if rank == 0 {
            bind.to_string()
        } else {
            format!("{bind}_dp{rank}")
        });
    }
    None
}

/// `--flag value` or `--flag=value`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == flag {
            return it.next().cloned();
        }
        if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_string());
        }
    }
    None
}

/// The arguments of a `/proc/<pid>/cmdline`.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The pid a process has in its own PID namespace: the last `NSpid` entry of
/// `/proc/<pid>/status` (what the runtime itself reports as `vllm.process_id`).
pub fn parse_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|p| p.parse().ok())
}

/// One process as the scan reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedProcess {
    /// Its pid on the agent's side.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// Its pid in its own namespace.
    pub ns_pid: u32,
    /// Its command line.
    pub args: Vec<String>,
}

/// The publishers of the runtimes among `processes`, named `pid:<the API server's ns pid>`,
/// sorted by endpoint. A child whose parent names the same publishers is the same runtime.
pub fn runtimes_of(processes: &[ScannedProcess]) -> Vec<KvEventsEndpoint> {
    let mut out: BTreeSet<(String, String, String)> = BTreeSet::new();
    for p in processes {
        let eps = endpoints_of_cmdline(&p.args);
        if eps.is_empty() {
            continue;
        }
        let parent_same = processes
            .iter()
            .find(|q| q.pid == p.ppid)
            .is_some_and(|q| endpoints_of_cmdline(&q.args) == eps);
        if parent_same {
            continue;
        }
        for (endpoint, topic) in eps {
            out.insert((endpoint, format!("pid:{}", p.ns_pid), topic));
        }
    }
    out.into_iter()
        .map(|(endpoint, instance, topic)| KvEventsEndpoint {
            endpoint,
            instance,
            topic,
        })
        .collect()
}

/// Scans `proc_root` (`/proc`) for runtimes publishing KV events. Processes that vanish or
/// cannot be read mid-scan are skipped: the next scan sees what is left.
pub fn scan(proc_root: &Path) -> Vec<KvEventsEndpoint> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut processes = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let base = entry.path();
        let Ok(raw) = std::fs::read(base.join("cmdline")) else {
            continue;
        };
        // Cheap filter first: most processes name no KV publisher.
        if !raw
            .windows(b"--kv-events-config".len())
            .any(|w| w == b"--kv-events-config")
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(base.join("status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        processes.push(ScannedProcess {
            pid,
            ppid,
            ns_pid: parse_nspid(&status).unwrap_or(pid),
            args: parse_cmdline(&raw),
        });
    }
    runtimes_of(&processes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    const CONFIG: &str =
        r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}"#;

    #[test]
    fn reads_the_endpoint_and_the_data_parallel_ranks() {
        let one = args(&["vllm", "serve", "m", "--kv-events-config", CONFIG]);
        assert_eq!(
            endpoints_of_cmdline(&one),
            vec![("tcp://127.0.0.1:5557".to_string(), String::new())]
        );
        let eq = format!("--kv-events-config={CONFIG}");
        let dp = args(&["vllm", "serve", "m", &eq, "--data-parallel-size", "3"]);
        let eps: Vec<String> = endpoints_of_cmdline(&dp).into_iter().map(|e| e.0).collect();
        assert_eq!(
            eps,
            [
                "tcp://127.0.0.1:5557",
                "tcp://127.0.0.1:5558",
                "tcp://127.0.0.1:5559"
            ]
        );
        let node2 = args(&[
            "vllm",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "endpoint": "tcp://10.0.0.2:6000", "topic": "kv"}"#,
            "--data-parallel-size",
            "4",
            "--data-parallel-size-local",
            "2",
            "--data-parallel-start-rank",
            "2",
        ]);
        assert_eq!(
            endpoints_of_cmdline(&node2),
            vec![
                ("tcp://10.0.0.2:6002".to_string(), "kv".to_string()),
                ("tcp://10.0.0.2:6003".to_string(), "kv".to_string())
            ]
        );
    }

    #[test]
    fn ignores_disabled_or_unreachable_publishers_and_bad_json() {
        for config in [
            r#"{"enable_kv_cache_events": false, "endpoint": "tcp://*:5557"}"#,
            r#"{"enable_kv_cache_events": true, "publisher": "null"}"#,
            r#"{"enable_kv_cache_events": true, "endpoint": "inproc://cache"}"#,
            r#"{"enable_kv_cache_events": true, "endpoint": "tcp://*:0"}"#,
            r#"{"enable_kv_cache_events": tru"#,
        ] {
            let a = args(&["vllm", "serve", "--kv-events-config", config]);
            assert!(endpoints_of_cmdline(&a).is_empty(), "{config}");
        }
        assert!(endpoints_of_cmdline(&args(&["vllm", "--kv-events-config"])).is_empty());
        assert!(endpoints_of_cmdline(&args(&["python", "x.py"])).is_empty());
    }

    #[test]
    fn names_the_api_server_not_its_forked_children() {
        let cmd = args(&["vllm", "serve", "m", "--kv-events-config", CONFIG]);
        let processes = vec![
            ScannedProcess {
                pid: 900,
                ppid: 1,
                ns_pid: 7,
                args: cmd.clone(),
            },
            // A forked child before it retitles itself.
            ScannedProcess {
                pid: 901,
                ppid: 900,
                ns_pid: 8,
                args: cmd,
            },
            ScannedProcess {
                pid: 902,
                ppid: 900,
                ns_pid: 9,
                args: args(&["VLLM::EngineCore_DP0"]),
            },
        ];
        assert_eq!(
            runtimes_of(&processes),
            vec![KvEventsEndpoint {
                endpoint: "tcp://127.0.0.1:5557".into(),
                instance: "pid:7".into(),
                topic: String::new(),
            }]
        );
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_cmdline(b"vllm\0serve\0--kv-events-config\0{}\0"),
            args(&["vllm", "serve", "--kv-events-config", "{}"])
        );
        assert_eq!(parse_nspid("Name:\tx\nNSpid:\t4242\t17\n"), Some(17));
        assert_eq!(parse_nspid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(parse_nspid("Name:\tx\n"), None);
    }

    /// The real /proc: a process started here with the flag is found, named by its pid.
    #[test]
    fn finds_a_live_process_in_proc() {
        // Two commands, so that the shell does not exec into `sleep` and keep its arguments.
        let mut child = match std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", "vllm", "--kv-events-config", CONFIG])
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("spawn sleep: {e}"),
        };
        let pid = child.id();
        // The child may not have exec'd its command line yet: retry for a while.
        let mut found = Vec::new();
        for _ in 0..40 {
            found = scan(Path::new("/proc"));
            if found.iter().any(|e| e.instance == format!("pid:{pid}")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let mine: Vec<_> = found
            .iter()
            .filter(|e| e.instance == format!("pid:{pid}"))
            .collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!(mine[0].endpoint, "tcp://127.0.0.1:5557");
    }
}
