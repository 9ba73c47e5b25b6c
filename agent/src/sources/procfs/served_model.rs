//! The model a runtime serves, from its command line: the name of last resort for requests
//! whose span names no model (vLLM 0.32's does not) and whose captured request bytes ended
//! before the body's `"model"` (an HTTP client that writes the headers and the body apart).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest name kept.
const MAX_NAME_LEN: usize = 128;

/// The served model name on a runtime's command line (`/proc/<pid>/cmdline`, NUL-separated):
/// vLLM's and SGLang's `--served-model-name` (its first name), else the model they load
/// (vLLM `serve <model>` or `--model`, SGLang `--model-path`, TGI `--model-id`), which is the
/// name their API answers to when no served name is given.
pub fn served_model_name(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&str> = cmdline
        .split(|&b| b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .filter(|a| !a.is_empty())
        .collect();
    let value_of = |flag: &str| -> Option<&str> {
        args.iter().enumerate().find_map(|(i, a)| {
            if *a == flag {
                args.get(i + 1).copied().filter(|v| !v.starts_with('-'))
            } else {
                a.strip_prefix(flag)?.strip_prefix('=')
            }
        })
    };
    let positional_after_serve = || {
        let at = args.iter().position(|a| *a == "serve")?;
        args.get(at + 1).copied().filter(|v| !v.starts_with('-'))
    };
    let name = value_of("--served-model-name")
        .or_else(|| value_of("--model"))
        .or_else(positional_after_serve)
        .or_else(|| value_of("--model-path"))
        .or_else(|| value_of("--model-id"))?;
    (!name.is_empty() && name.len() <= MAX_NAME_LEN).then(|| name.to_owned())
}

/// Served model names by pid, read from `/proc/<pid>/cmdline` and kept for a while (a pid's
/// command line does not change, but a pid can be reused: entries are read again after
/// `recheck`). Bounded: when full, the table starts afresh.
#[derive(Debug)]
pub struct ServedModels {
    root: PathBuf,
    capacity: usize,
    recheck: Duration,
    names: HashMap<u32, (Instant, Option<Arc<str>>)>,
}

impl ServedModels {
    /// Reads under `root` (`/proc`), at most `capacity` pids remembered.
    pub fn new(root: impl Into<PathBuf>, capacity: usize) -> Self {
        Self {
            root: root.into(),
            capacity: capacity.max(1),
            recheck: Duration::from_secs(10),
            names: HashMap::new(),
        }
    }

    /// The model `pid` serves, if its command line names one.
    pub fn model_of(&mut self, pid: u32) -> Option<Arc<str>> {
        let now = Instant::now();
        if let Some((at, name)) = self.names.get(&pid)
            && now.duration_since(*at) < self.recheck
        {
            return name.clone();
        }
        let name = std::fs::read(self.root.join(pid.to_string()).join("cmdline"))
            .ok()
            .and_then(|c| served_model_name(&c))
            .map(Arc::from);
        if self.names.len() >= self.capacity {
            self.names.clear();
        }
        self.names.insert(pid, (now, name.clone()));
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        args.iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect()
    }

    #[test]
    fn names_from_runtime_command_lines() {
        let vllm = cmd(&[
            "/venv/bin/python3",
            "/venv/bin/vllm",
            "serve",
            "/models/llama",
            "--served-model-name",
            "m",
            "other",
            "--port",
            "8000",
        ]);
        assert_eq!(served_model_name(&vllm).as_deref(), Some("m"));
        let unnamed = cmd(&["vllm", "serve", "meta-llama/Llama-3.1-8B", "--port", "8000"]);
        assert_eq!(
            served_model_name(&unnamed).as_deref(),
            Some("meta-llama/Llama-3.1-8B")
        );
        let sglang = cmd(&[
            "python",
            "-m",
            "sglang.launch_server",
            "--model-path=qwen/Qwen2-7B",
        ]);
        assert_eq!(served_model_name(&sglang).as_deref(), Some("qwen/Qwen2-7B"));
        let tgi = cmd(&[
            "text-generation-launcher",
            "--model-id",
            "bigscience/bloom-560m",
        ]);
        assert_eq!(
            served_model_name(&tgi).as_deref(),
            Some("bigscience/bloom-560m")
        );
        assert_eq!(
            served_model_name(&cmd(&["nginx", "-g", "daemon off;"])),
            None
        );
        assert_eq!(served_model_name(&cmd(&["vllm", "serve", "--help"])), None);
        assert_eq!(served_model_name(b""), None);
    }

    #[test]
    fn reads_and_remembers_a_pid_s_command_line() {
        let root = std::env::temp_dir().join(format!("iw-served-{}", std::process::id()));
        let dir = root.join("42");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("cmdline"),
            cmd(&["vllm", "serve", "x", "--served-model-name", "m"]),
        )
        .expect("write");
        let mut models = ServedModels::new(&root, 4);
        assert_eq!(models.model_of(42).as_deref(), Some("m"));
        std::fs::remove_dir_all(&root).expect("clean");
        // Remembered within the recheck period, even though the process is gone.
        assert_eq!(models.model_of(42).as_deref(), Some("m"));
        assert_eq!(models.model_of(43), None);
    }
}
