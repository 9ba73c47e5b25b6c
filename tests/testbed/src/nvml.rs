//! The script of the fake `libnvidia-ml` (`tests/fake-nvml`), written as the simulated runtime
//! plays a scenario, and the neighbour processes that the script says use the GPU.
//!
//! The fake re-reads its script when the file changes, so an agent that initialised NVML once
//! sees what the testbed does later: the runtime process appears on the GPU when its CUDA
//! initialisation starts, its memory ramps up while it loads weights and then stays on a
//! plateau, its SM utilisation follows its decode activity; every `[[runtime.contention]]`
//! interval is played by a real process (so that the agent's `/proc` identity of it is real)
//! listed with the interval's SM share and some memory.
//!
//! One writer: the process that serves (the `serve` child when the runtime is a separate
//! process). It keeps what it found in an existing script (the GPU a test created before
//! starting the agent, the start time, processes of others) and replaces the file atomically
//! (temporary file, rename) so that the fake never reads half a script. Times in the script are
//! seconds since its `start_unix_ms`, on the wall clock the truth files use.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::truth::now_ns;

/// The GPU created when the script does not exist yet.
pub const DEFAULT_GPU_UUID: &str = "GPU-7e57bed0-0000-4000-8000-000000000001";
/// GPU memory a process holds for its CUDA context before it loads anything, bytes.
pub const CONTEXT_BYTES: u64 = 512 << 20;
/// GPU memory the simulated weights take, bytes.
pub const WEIGHTS_BYTES: u64 = 16 << 30;
/// GPU memory a neighbour process holds, bytes.
pub const NEIGHBOUR_BYTES: u64 = 4 << 30;
/// Most SM points kept per process: the fake only ever evaluates "now", so old points are
/// dead weight in a file it re-reads.
const MAX_POINTS: usize = 32;

/// A fake-NVML script being played.
#[derive(Debug)]
pub struct NvmlScript {
    path: PathBuf,
    doc: Mutex<Value>,
    start_ms: u64,
}

/// A GPU entry for a new script.
pub fn default_gpu() -> Value {
    json!({
        "uuid": DEFAULT_GPU_UUID,
        "name": "Fake H100 80GB HBM3",
        "memory_total": 80u64 << 30,
        "memory_base": 256u64 << 20,
        "processes": [],
    })
}

impl NvmlScript {
    /// Opens `path`: keeps an existing script's GPUs, start time and processes (adding a GPU
    /// when it has none), or creates one with one GPU starting now; writes it back.
    ///
    /// # Errors
    /// An existing file that is not a JSON object, or a failed write.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut doc = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str::<Value>(&text)
                .with_context(|| format!("parsing the NVML script {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", path.display()));
            }
        };
        let obj = doc
            .as_object_mut()
            .with_context(|| format!("the NVML script {} is not an object", path.display()))?;
        let start_ms = match obj.get("start_unix_ms").and_then(Value::as_u64) {
            Some(ms) => ms,
            None => {
                let ms = now_ns() / 1_000_000;
                obj.insert("start_unix_ms".into(), json!(ms));
                ms
            }
        };
        let gpus = obj.entry("gpus").or_insert_with(|| json!([]));
        if !gpus.is_array() {
            *gpus = json!([]);
        }
        if let Some(list) = gpus.as_array_mut()
            && list.is_empty()
        {
            list.push(default_gpu());
        }
        let script = Self {
            path: path.to_path_buf(),
            doc: Mutex::new(doc),
            start_ms,
        };
        script.write()?;
        Ok(script)
    }

    /// The file played.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uuid of the GPU the runtime uses (the first).
    pub fn gpu_uuid(&self) -> String {
        self.lock()["gpus"][0]["uuid"]
            .as_str()
            .unwrap_or(DEFAULT_GPU_UUID)
            .to_owned()
    }

    /// Script time (seconds since `start_unix_ms`) of a unix-nanosecond time.
    pub fn t(&self, ns: u64) -> f64 {
        let t = (ns as f64 / 1e6 - self.start_ms as f64) / 1e3;
        // Millisecond resolution keeps the file short; the fake reads wall time in ms.
        (t * 1e3).round() / 1e3
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Value> {
        // A panic while holding the lock leaves a script that is still valid JSON.
        self.doc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes (creating it when absent) the entry of `pid` on the first GPU, then writes.
    ///
    /// # Errors
    /// A failed write (the change stays in memory and goes out with the next write).
    pub fn update_process(
        &self,
        pid: u32,
        f: impl FnOnce(&mut Map<String, Value>),
    ) -> anyhow::Result<()> {
        {
            let mut doc = self.lock();
            let Some(procs) = doc["gpus"][0]
                .as_object_mut()
                .map(|g| g.entry("processes").or_insert_with(|| json!([])))
            else {
                anyhow::bail!("the NVML script has no GPU");
            };
            if !procs.is_array() {
                *procs = json!([]);
            }
            let Some(list) = procs.as_array_mut() else {
                anyhow::bail!("processes is not a list");
            };
            let index = match list
                .iter()
                .position(|p| p["pid"].as_u64() == Some(u64::from(pid)))
            {
                Some(i) => i,
                None => {
                    list.push(json!({"pid": pid}));
                    list.len() - 1
                }
            };
            if let Some(entry) = list.get_mut(index).and_then(Value::as_object_mut) {
                f(entry);
            }
        }
        self.write()
    }

    /// Appends `[t, value]` to the series `key` of `pid` (keeping the last points only).
    ///
    /// # Errors
    /// As [`NvmlScript::update_process`].
    pub fn push_point(&self, pid: u32, key: &str, t: f64, value: f64) -> anyhow::Result<()> {
        self.update_process(pid, |p| {
            let series = p.entry(key).or_insert_with(|| json!([]));
            if !series.is_array() {
                *series = json!([]);
            }
            if let Some(points) = series.as_array_mut() {
                points.push(json!([t, value]));
                let extra = points.len().saturating_sub(MAX_POINTS);
                points.drain(..extra);
            }
        })
    }

    /// Replaces the file atomically.
    fn write(&self) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&*self.lock())?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "script.json".into());
        let tmp = self
            .path
            .with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        Ok(())
    }
}

/// The command name (`comm`, at most 15 bytes) a neighbour process shows for a scenario's
/// `neighbour` string: the base name of its first word (`python3 finetune.py` -> `python3`).
pub fn neighbour_comm(neighbour: &str) -> String {
    let first = neighbour.split_whitespace().next().unwrap_or("neighbour");
    let base = first.rsplit('/').next().unwrap_or(first);
    let mut comm = String::new();
    for c in base.chars() {
        if comm.len() + c.len_utf8() > 15 {
            break;
        }
        comm.push(c);
    }
    if comm.is_empty() {
        "neighbour".into()
    } else {
        comm
    }
}

/// Starts a neighbour process: `iw-testbed hog`, re-executed with `argv[0]` = `neighbour` and
/// its command name set from it, detached (its parent exits at once, so it is nobody's child:
/// the agent counts a runtime's children as its own GPU workers, and a neighbour must not be
/// one). It sleeps until killed, until this process is gone, or after `max_s`. Returns its
/// pid.
///
/// # Errors
/// The binary cannot be started or does not report a pid.
pub async fn spawn_neighbour(neighbour: &str, max_s: f64) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the testbed binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0(neighbour)
        .arg("hog")
        .arg("--comm")
        .arg(neighbour_comm(neighbour))
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .arg("--max-s")
        .arg(max_s.to_string())
        .stdin(std::process::Stdio::null());
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("starting the neighbour process")?;
    anyhow::ensure!(
        out.status.success(),
        "iw-testbed hog failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse::<u32>()
        .with_context(|| format!("iw-testbed hog printed {text:?}, not a pid"))
}

/// Ends a neighbour process.
pub fn kill_neighbour(pid: u32) {
    // SAFETY: kill(2) has no memory effects; the pid is one we started (a stale pid after the
    // hog's own exit could only be reused within the ms between its exit and this call).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The command name of the engine child of `flavor` (at most 15 bytes, as `comm` keeps it):
/// vLLM's `VLLM::EngineCore` (truncated as the kernel does), SGLang's scheduler, TGI's shard.
pub fn engine_comm(flavor: crate::flavor::Flavor) -> &'static str {
    match flavor {
        crate::flavor::Flavor::Vllm => "VLLM::EngineCor",
        crate::flavor::Flavor::Sglang => "sglang::schedul",
        crate::flavor::Flavor::Tgi => "text-generation",
    }
}

/// The engine process of a runtime: a child of the serving process (not detached: the agent
/// finds the instance's GPU processes by the process tree, contract §1.4) that the fake NVML
/// lists as holding the GPU, as vLLM's EngineCore holds the CUDA context while its API server
/// reads the requests. Ended by [`EngineChild`]'s drop, or when the server is gone.
#[derive(Debug)]
pub struct EngineChild {
    child: std::process::Child,
}

impl EngineChild {
    /// Starts `iw-testbed engine-core` with the command name `comm`.
    ///
    /// # Errors
    /// The binary cannot be started.
    pub fn spawn(comm: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the testbed binary")?;
        let child = std::process::Command::new(exe)
            .arg("engine-core")
            .arg("--comm")
            .arg(comm)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the engine child")?;
        Ok(Self { child })
    }

    /// Its pid (what the fake NVML lists).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EngineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `iw-testbed engine-core`: sets the command name, then sleeps until `watch_pid` is gone or
/// after `max_s` (it stays the server's child).
pub fn engine_main(comm: &str, watch_pid: u32, max_s: f64) -> anyhow::Result<()> {
    set_comm(comm);
    sleep_while_alive(watch_pid, max_s);
    Ok(())
}

fn set_comm(comm: &str) {
    if let Ok(name) = std::ffi::CString::new(comm) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes (the kernel
        // truncates longer ones).
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
        }
    }
}

fn sleep_while_alive(watch_pid: u32, max_s: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(max_s.max(0.0));
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(watch_pid as libc::pid_t, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if !alive {
            break;
        }
    }
}

/// `iw-testbed hog`: sets the command name, detaches (prints the detached pid, the caller's
/// child exits), then sleeps until killed, until `watch_pid` is gone, or after `max_s`.
/// Call before any thread is started (it forks).
///
/// # Errors
/// `fork` fails.
pub fn hog_main(comm: &str, watch_pid: u32, max_s: f64) -> anyhow::Result<()> {
    // Before the fork, so the detached process has the name from its first moment.
    set_comm(comm);
    // SAFETY: the process is single-threaded here (no runtime started yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        anyhow::bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid > 0 {
        println!("{pid}");
        return Ok(());
    }
    // The detached process: let go of the caller's pipes (the caller reads stdout, and may
    // capture stderr, to their end) so its read ends.
    // SAFETY: plain fd calls on descriptors this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
    sleep_while_alive(watch_pid, max_s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_reads_like_the_neighbour() {
        assert_eq!(neighbour_comm("python3 finetune.py"), "python3");
        assert_eq!(neighbour_comm("/usr/bin/torchrun --nproc 8"), "torchrun");
        assert_eq!(
            neighbour_comm("a-very-long-executable-name"),
            "a-very-long-exe"
        );
        assert_eq!(neighbour_comm(""), "neighbour");
    }

    #[test]
    fn script_keeps_an_existing_gpu_and_start_and_replaces_processes() {
        let dir = std::env::temp_dir().join(format!("iw-nvml-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("script.json");
        std::fs::write(
            &path,
            r#"{"start_unix_ms": 1000, "gpus": [{"uuid": "GPU-x", "name": "n", "memory_total": 1}]}"#,
        )
        .expect("write");
        let s = NvmlScript::open(&path).expect("open");
        assert_eq!(s.gpu_uuid(), "GPU-x");
        assert_eq!(s.t(3_500_000_000), 2.5, "seconds since start_unix_ms");
        s.update_process(7, |p| {
            p.insert("start_s".into(), json!(1.0));
        })
        .expect("update");
        for i in 0..40 {
            s.push_point(7, "sm_util", f64::from(i), 10.0)
                .expect("point");
        }
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let p = &back["gpus"][0]["processes"][0];
        assert_eq!(p["pid"], 7);
        assert_eq!(p["start_s"], 1.0);
        assert_eq!(p["sm_util"].as_array().map(Vec::len), Some(MAX_POINTS));
        assert_eq!(back["start_unix_ms"], 1000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
