//! A scripted stand-in for `libnvidia-ml.so.1`.
//!
//! Built as a `cdylib` and loaded by `nvml-wrapper` through `Nvml::builder().lib_path(..)`, so
//! that tests and the demo exercise the same code as production. What it reports follows a
//! script (JSON) named by the environment variable `FAKE_NVML_SCRIPT`, read at every
//! `nvmlInit_v2` and re-read whenever the file changes (its mtime, size or inode; checked with
//! one `stat` at most every [`RELOAD_CHECK_MS`] ms by the query entry points), so that a
//! process that initialised NVML once follows a script that a test or the testbed keeps
//! updating. Writers should replace the file atomically (write a temporary file, rename it):
//! a script that does not parse is reported once and the previous one stays in force.
//!
//!
//! ```json
//! {
//!   "start_unix_ms": 1700000000000,
//!   "seed": 7,
//!   "gpus": [{
//!     "uuid": "GPU-00000000-0000-0000-0000-000000000001",
//!     "name": "Fake H100",
//!     "memory_total": 85899345920,
//!     "memory_base": 536870912,
//!     "sm_util": [[0, 10], [30, 90]],
//!     "processes": [{
//!       "pid": 4242, "start_s": 0, "end_s": 120,
//!       "memory": [[0, 0], [10, 40000000000]],
//!       "sm_util": [[0, 20]], "mem_util": [[0, 5]]
//!     }],
//!     "errors": [
//!       {"call": "utilization", "code": 3, "from_s": 0, "to_s": 1e9, "max_times": 1},
//!       {"call": "processes", "code": 999, "probability": 0.3}
//!     ]
//!   }]
//! }
//! ```
//!
//! Values are piecewise-linear functions of the wall time since `start_unix_ms` (default: the
//! time of `nvmlInit_v2`, kept across reloads), given as `[seconds, value]` points and held constant outside them.
//! A GPU's `sm_util` / `mem_util`, when absent, are the sum of its processes' (capped at 100);
//! its used memory is `memory_base` plus its processes' memory. `errors` make one call return
//! an NVML error code during a time window, at most `max_times` times (counts restart when the
//! script is reloaded). An error with a `probability` fires on that share of the calls in its
//! window, drawn at random but deterministically: the fate of the n-th call of a kind on a GPU
//! is a hash of (`seed`, GPU index, call, n, the error's index), so one seed and one sequence
//! of calls give the same failures in every run. The call counts behind `n` live as long as
//! the library is initialised (a reload does not restart them, or a script rewritten more
//! often than it is polled would replay its first draws forever). Several errors on one call
//! are tried in order, the first that fires wins: `[p1, p2]` fail a call with
//! `p1 + (1 - p1) p2`.
//!
//! The C ABI follows `nvml.h` as `nvml-wrapper-sys` 0.10 binds it: `nvmlProcessInfo_t` is the
//! v2 layout (pid, usedGpuMemory, gpuInstanceId, computeInstanceId), `nvmlMemory_v2_t` carries
//! a version word, and `nvmlProcessUtilizationSample_t` has µs timestamps.

#![allow(
    clippy::missing_safety_doc,
    reason = "the functions implement NVML's C ABI; their contracts are NVML's"
)]

use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_ulonglong};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// `nvmlReturn_t`.
type NvmlReturn = c_uint;

const SUCCESS: NvmlReturn = 0;
const UNINITIALIZED: NvmlReturn = 1;
const INVALID_ARGUMENT: NvmlReturn = 2;
const NOT_FOUND: NvmlReturn = 6;
const INSUFFICIENT_SIZE: NvmlReturn = 7;
const DRIVER_NOT_LOADED: NvmlReturn = 9;
const UNKNOWN: NvmlReturn = 999;

/// `NVML_VALUE_NOT_AVAILABLE` for the MIG instance ids of a process.
const NO_VALUE: c_uint = 0xFFFF_FFFF;

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct NvmlUtilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlProcessInfo_t` as nvml-wrapper-sys 0.10 defines it (the v2 layout).
#[repr(C)]
pub struct NvmlProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
pub struct NvmlProcessUtilizationSample {
    pid: c_uint,
    time_stamp: c_ulonglong,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

// The layouts nvml.h gives on x86_64 / aarch64.
const _: () = assert!(size_of::<NvmlUtilization>() == 8);
const _: () = assert!(size_of::<NvmlMemoryV2>() == 40);
const _: () = assert!(size_of::<NvmlProcessInfo>() == 24);
const _: () = assert!(size_of::<NvmlProcessUtilizationSample>() == 32);
const _: () = assert!(std::mem::offset_of!(NvmlProcessUtilizationSample, time_stamp) == 8);

/// A piecewise-linear function of seconds since the start: `[seconds, value]` points.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
struct Series(Vec<(f64, f64)>);

impl Series {
    fn at(&self, t: f64) -> f64 {
        let pts = &self.0;
        let Some(first) = pts.first() else {
            return 0.0;
        };
        if t <= first.0 {
            return first.1;
        }
        for w in pts.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if t <= t1 {
                if t1 <= t0 {
                    return v1;
                }
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0);
            }
        }
        pts.last().map_or(0.0, |p| p.1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Process {
    pid: u32,
    #[serde(default)]
    start_s: f64,
    #[serde(default = "forever")]
    end_s: f64,
    #[serde(default)]
    memory: Series,
    #[serde(default)]
    sm_util: Series,
    #[serde(default)]
    mem_util: Series,
}

fn forever() -> f64 {
    f64::INFINITY
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectedError {
    /// `count`, `handle`, `name`, `uuid`, `utilization`, `memory`, `processes`,
    /// `process_utilization`.
    call: String,
    code: u32,
    #[serde(default)]
    from_s: f64,
    #[serde(default = "forever")]
    to_s: f64,
    #[serde(default)]
    max_times: Option<u32>,
    /// Fire on this share (0 to 1) of the calls in the window, at random (seeded by the
    /// script's `seed`); absent: on every call.
    #[serde(default)]
    probability: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gpu {
    uuid: String,
    name: String,
    memory_total: u64,
    #[serde(default)]
    memory_base: u64,
    #[serde(default)]
    sm_util: Option<Series>,
    #[serde(default)]
    mem_util: Option<Series>,
    #[serde(default)]
    processes: Vec<Process>,
    #[serde(default)]
    errors: Vec<InjectedError>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    #[serde(default)]
    start_unix_ms: Option<u64>,
    /// Seeds the draws of the errors that have a `probability`.
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    gpus: Vec<Gpu>,
}

/// How often, at most, the query entry points `stat` the script to see whether it changed.
pub const RELOAD_CHECK_MS: u64 = 50;

/// What identifies one version of the script file: (mtime in ns, size, inode).
type Stamp = (i128, u64, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    Some((mtime, m.len(), m.ino()))
}

/// The script file followed, and what was last read of it.
struct Source {
    path: PathBuf,
    stamp: Option<Stamp>,
    checked: Instant,
    /// The last stamp that failed to parse, so a bad version is reported once.
    bad: Option<Stamp>,
}

struct State {
    script: Script,
    start_ms: u64,
    /// Per GPU, per injected error: how many times it fired.
    fired: Vec<Vec<u32>>,
    /// Per (GPU index, call): how many calls were made, kept across reloads (the `n` of a
    /// random draw).
    calls: HashMap<(usize, String), u64>,
    /// `None` without `FAKE_NVML_SCRIPT`.
    source: Option<Source>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn fired_for(script: &Script) -> Vec<Vec<u32>> {
    script
        .gpus
        .iter()
        .map(|g| vec![0; g.errors.len()])
        .collect()
}

impl State {
    /// Re-reads the script when its file changed, at most every [`RELOAD_CHECK_MS`] ms: the
    /// agent initialises NVML once, while the testbed adds processes as it starts them.
    fn maybe_reload(&mut self) {
        let Some(src) = self.source.as_mut() else {
            return;
        };
        if src.checked.elapsed().as_millis() < u128::from(RELOAD_CHECK_MS) {
            return;
        }
        src.checked = Instant::now();
        let now = stamp(&src.path);
        if now.is_none() || now == src.stamp || now == src.bad {
            // A file briefly missing (between unlink and rename) keeps the script in force.
            return;
        }
        match read_script(&src.path) {
            Ok(script) => {
                src.stamp = now;
                src.bad = None;
                if let Some(ms) = script.start_unix_ms {
                    self.start_ms = ms;
                }
                self.fired = fired_for(&script);
                self.script = script;
            }
            Err(_) => src.bad = now,
        }
    }

    fn t(&self) -> f64 {
        (now_ms() as f64 - self.start_ms as f64) / 1000.0
    }

    fn gpu(&self, device: *mut Device) -> Option<(usize, &Gpu)> {
        let index = (device as usize).checked_sub(1)?;
        self.script.gpus.get(index).map(|g| (index, g))
    }

    /// The error injected on `call` of GPU `index` now, if any (and counts it).
    fn injected(&mut self, index: usize, call: &str) -> Option<NvmlReturn> {
        let t = self.t();
        let n = {
            let calls = self.calls.entry((index, call.to_owned())).or_insert(0);
            *calls += 1;
            *calls
        };
        let seed = self.script.seed;
        let gpu = self.script.gpus.get(index)?;
        for (k, e) in gpu.errors.iter().enumerate() {
            if e.call != call || t < e.from_s || t >= e.to_s {
                continue;
            }
            if let Some(p) = e.probability
                && draw(seed, index, call, n, k) >= p
            {
                continue;
            }
            let fired = self.fired.get_mut(index)?.get_mut(k)?;
            if e.max_times.is_some_and(|m| *fired >= m) {
                continue;
            }
            *fired += 1;
            return Some(e.code);
        }
        None
    }

    fn running(&self, gpu: &Gpu) -> Vec<Process> {
        let t = self.t();
        gpu.processes
            .iter()
            .filter(|p| t >= p.start_s && t < p.end_s)
            .cloned()
            .collect()
    }
}

/// A uniform draw in [0, 1) for the `n`-th call `call` of GPU `gpu`, error entry `entry`: a
/// hash (FNV-1a of the call's name, then SplitMix64 rounds) of everything that names the draw,
/// so that it does not depend on other calls or on time.
fn draw(seed: u64, gpu: usize, call: &str, n: u64, entry: usize) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let name = call.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    let h = [gpu as u64, name, n, entry as u64]
        .into_iter()
        .fold(mix(seed), |h, v| mix(h ^ v));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Opaque `nvmlDevice_t` target: handles are `index + 1` cast to a pointer.
pub struct Device;

/// Runs `f` on the state of GPU `device` after its injected errors for `call`.
fn with_gpu(
    device: *mut Device,
    call: &str,
    f: impl FnOnce(&State, &Gpu) -> NvmlReturn,
) -> NvmlReturn {
    let Ok(mut guard) = STATE.lock() else {
        return UNKNOWN;
    };
    let Some(state) = guard.as_mut() else {
        return UNINITIALIZED;
    };
    state.maybe_reload();
    let Some((index, _)) = state.gpu(device) else {
        return INVALID_ARGUMENT;
    };
    if let Some(code) = state.injected(index, call) {
        return code;
    }
    match state.gpu(device) {
        Some((_, gpu)) => f(state, gpu),
        None => INVALID_ARGUMENT,
    }
}

/// Copies `s` into a C buffer of `len` bytes, NUL-terminated.
unsafe fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> NvmlReturn {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `len` bytes and we write at most `bytes.len() + 1`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

fn read_script(path: &std::path::Path) -> Result<Script, NvmlReturn> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("fake-nvml: reading {}: {e}", path.display());
        DRIVER_NOT_LOADED
    })?;
    serde_json::from_str(&text).map_err(|e| {
        eprintln!("fake-nvml: parsing {}: {e}", path.display());
        UNKNOWN
    })
}

/// Reads the script named by `FAKE_NVML_SCRIPT` and what identifies that version of it.
fn load_script() -> Result<(Script, Option<Source>), NvmlReturn> {
    let Some(path) = std::env::var_os("FAKE_NVML_SCRIPT") else {
        // No script: a machine with the library but no GPU.
        return Ok((Script::default(), None));
    };
    let path = PathBuf::from(path);
    // Stamp before reading: a change racing the read is then seen by the next check.
    let before = stamp(&path);
    let script = read_script(&path)?;
    let source = Source {
        path,
        stamp: before,
        checked: Instant::now(),
        bad: None,
    };
    Ok((script, Some(source)))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    let (script, source) = match load_script() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Ok(mut guard) = STATE.lock() else {
        return UNKNOWN;
    };
    let start_ms = script.start_unix_ms.unwrap_or_else(now_ms);
    let fired = fired_for(&script);
    *guard = Some(State {
        script,
        start_ms,
        fired,
        calls: HashMap::new(),
        source,
    });
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    if let Ok(mut guard) = STATE.lock() {
        *guard = None;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(code: NvmlReturn) -> *const c_char {
    let s: &'static [u8] = match code {
        SUCCESS => b"Success\0",
        UNINITIALIZED => b"Uninitialized\0",
        INVALID_ARGUMENT => b"Invalid Argument\0",
        3 => b"Not Supported\0",
        NOT_FOUND => b"Not Found\0",
        INSUFFICIENT_SIZE => b"Insufficient Size\0",
        DRIVER_NOT_LOADED => b"Driver Not Loaded\0",
        15 => b"GPU is lost\0",
        _ => b"Unknown Error\0",
    };
    s.as_ptr().cast()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    unsafe { write_str("550.00.fake", buf, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    let Ok(mut guard) = STATE.lock() else {
        return UNKNOWN;
    };
    let Some(state) = guard.as_mut() else {
        return UNINITIALIZED;
    };
    state.maybe_reload();
    // SAFETY: checked non-null; the caller passes a valid `unsigned int *`.
    unsafe { *count = state.script.gpus.len() as c_uint };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut *mut Device,
) -> NvmlReturn {
    if device.is_null() {
        return INVALID_ARGUMENT;
    }
    let handle = (index as usize + 1) as *mut Device;
    with_gpu(handle, "handle", |_, _| {
        // SAFETY: checked non-null.
        unsafe { *device = handle };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: *mut Device,
    buf: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, "name", |_, gpu| unsafe {
        write_str(&gpu.name, buf, len)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *mut Device,
    buf: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded caller contract.
    with_gpu(device, "uuid", |_, gpu| unsafe {
        write_str(&gpu.uuid, buf, len)
    })
}

fn clamp_pct(v: f64) -> c_uint {
    v.clamp(0.0, 100.0).round() as c_uint
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: *mut Device,
    out: *mut NvmlUtilization,
) -> NvmlReturn {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(device, "utilization", |state, gpu| {
        let t = state.t();
        let running = state.running(gpu);
        let sm = match &gpu.sm_util {
            Some(s) => s.at(t),
            None => running.iter().map(|p| p.sm_util.at(t)).sum(),
        };
        let mem = match &gpu.mem_util {
            Some(s) => s.at(t),
            None => running.iter().map(|p| p.mem_util.at(t)).sum(),
        };
        // SAFETY: checked non-null.
        unsafe {
            *out = NvmlUtilization {
                gpu: clamp_pct(sm),
                memory: clamp_pct(mem),
            };
        }
        SUCCESS
    })
}

fn process_memory(p: &Process, t: f64) -> u64 {
    p.memory.at(t).max(0.0) as u64
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *mut Device,
    out: *mut NvmlMemoryV2,
) -> NvmlReturn {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(device, "memory", |state, gpu| {
        let t = state.t();
        let used: u64 = state
            .running(gpu)
            .iter()
            .map(|p| process_memory(p, t))
            .sum::<u64>()
            .saturating_add(gpu.memory_base)
            .min(gpu.memory_total);
        // SAFETY: checked non-null; the caller set the version word, which we keep.
        unsafe {
            let version = (*out).version;
            *out = NvmlMemoryV2 {
                version,
                total: gpu.memory_total,
                reserved: 0,
                free: gpu.memory_total - used,
                used,
            };
        }
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *mut Device,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(device, "processes", |state, gpu| {
        let t = state.t();
        let running = state.running(gpu);
        // SAFETY: checked non-null; `infos`, when non-null, holds `*count` entries.
        unsafe {
            let room = *count as usize;
            *count = running.len() as c_uint;
            if infos.is_null() || room < running.len() {
                return if running.is_empty() {
                    SUCCESS
                } else {
                    INSUFFICIENT_SIZE
                };
            }
            for (i, p) in running.iter().enumerate() {
                *infos.add(i) = NvmlProcessInfo {
                    pid: p.pid,
                    used_gpu_memory: process_memory(p, t),
                    gpu_instance_id: NO_VALUE,
                    compute_instance_id: NO_VALUE,
                };
            }
        }
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: *mut Device,
    samples: *mut NvmlProcessUtilizationSample,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> NvmlReturn {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(device, "process_utilization", |state, gpu| {
        let t = state.t();
        let ts = now_us();
        // One sample per running process, stamped now; like the driver, nothing newer than
        // `last_seen` is NOT_FOUND.
        let running = if ts > last_seen {
            state.running(gpu)
        } else {
            Vec::new()
        };
        if running.is_empty() {
            return NOT_FOUND;
        }
        // SAFETY: checked non-null; `samples`, when non-null, holds `*count` entries.
        unsafe {
            let room = *count as usize;
            if samples.is_null() {
                *count = running.len() as c_uint;
                return INSUFFICIENT_SIZE;
            }
            // A process may have started between the size query and this call: report what
            // fits, as the driver does with its ring of samples.
            let n = room.min(running.len());
            for (i, p) in running.iter().take(n).enumerate() {
                *samples.add(i) = NvmlProcessUtilizationSample {
                    pid: p.pid,
                    time_stamp: ts,
                    sm_util: clamp_pct(p.sm_util.at(t)),
                    mem_util: clamp_pct(p.mem_util.at(t)),
                    enc_util: 0,
                    dec_util: 0,
                };
            }
            *count = n as c_uint;
        }
        SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_interpolates_and_holds() {
        let s = Series(vec![(0.0, 0.0), (10.0, 100.0), (20.0, 100.0)]);
        assert_eq!(s.at(-1.0), 0.0, "before the first point");
        assert_eq!(s.at(5.0), 50.0, "halfway up the ramp");
        assert_eq!(s.at(30.0), 100.0, "after the last point");
        assert_eq!(Series::default().at(3.0), 0.0, "empty series");
    }

    /// A state playing `script`, outside the library's global one (no file, no init).
    fn state(script: serde_json::Value) -> State {
        let script: Script = serde_json::from_value(script).expect("script parses");
        State {
            fired: fired_for(&script),
            start_ms: now_ms(),
            script,
            calls: HashMap::new(),
            source: None,
        }
    }

    /// What `calls` successive `call`s on GPU 0 get from the injected errors.
    fn outcomes(state: &mut State, call: &str, calls: usize) -> Vec<Option<NvmlReturn>> {
        (0..calls).map(|_| state.injected(0, call)).collect()
    }

    fn random_script(seed: u64) -> serde_json::Value {
        serde_json::json!({"seed": seed, "gpus": [{
            "uuid": "GPU-p", "name": "Fake", "memory_total": 1u64 << 30,
            "errors": [
                {"call": "utilization", "code": 999, "probability": 0.2},
                {"call": "utilization", "code": 15, "probability": 0.25},
                {"call": "processes", "code": 10, "probability": 1.0, "max_times": 3},
                {"call": "memory", "code": 3, "probability": 0.0},
                {"call": "name", "code": 3, "probability": 0.5, "from_s": 1e6},
            ]
        }]})
    }

    #[test]
    fn random_failures_follow_the_seed_and_the_probability() {
        const CALLS: usize = 4000;
        let run = |seed| outcomes(&mut state(random_script(seed)), "utilization", CALLS);
        let a = run(7);
        assert_eq!(a, run(7), "one seed, one sequence of failures");
        assert_ne!(a, run(8), "another seed, other failures");
        let share = |code| a.iter().filter(|o| **o == Some(code)).count() as f64 / CALLS as f64;
        // 999 first with 0.2; 15 on a call 999 spared with 0.25: 0.8 x 0.25 = 0.2.
        assert!((0.17..0.23).contains(&share(999)), "999: {}", share(999));
        assert!((0.17..0.23).contains(&share(15)), "15: {}", share(15));
        assert!(
            a.windows(8).any(|w| w.iter().all(Option::is_none)),
            "failures are scattered, not every call"
        );

        let mut s = state(random_script(7));
        assert_eq!(
            outcomes(&mut s, "processes", 5),
            [Some(10), Some(10), Some(10), None, None],
            "probability 1 always fires, within max_times"
        );
        assert!(
            outcomes(&mut s, "memory", 500).iter().all(Option::is_none),
            "probability 0 never fires"
        );
        assert!(
            outcomes(&mut s, "name", 500).iter().all(Option::is_none),
            "outside its window it never fires"
        );
    }

    #[test]
    fn random_draws_go_on_across_a_reload() {
        // The same script reloaded: the calls are counted on, so the failures after the
        // reload are the next ones of the sequence, not its start again.
        let whole = outcomes(&mut state(random_script(3)), "utilization", 200);
        let mut s = state(random_script(3));
        let mut split = outcomes(&mut s, "utilization", 100);
        let again: Script = serde_json::from_value(random_script(3)).expect("parses");
        s.fired = fired_for(&again);
        s.script = again;
        split.extend(outcomes(&mut s, "utilization", 100));
        assert_eq!(split, whole);
        assert_ne!(
            whole[..100],
            whole[100..],
            "the second half is not a replay"
        );
    }

    fn running_pids() -> Vec<u32> {
        let mut infos: [NvmlProcessInfo; 8] = std::array::from_fn(|_| NvmlProcessInfo {
            pid: 0,
            used_gpu_memory: 0,
            gpu_instance_id: 0,
            compute_instance_id: 0,
        });
        let mut count: c_uint = 8;
        // Handle of GPU index 0 (handles are index + 1).
        let handle = std::ptr::without_provenance_mut::<Device>(1);
        // SAFETY: `count` and `infos` are valid for 8 entries.
        let rc = unsafe {
            nvmlDeviceGetComputeRunningProcesses_v3(handle, &mut count, infos.as_mut_ptr())
        };
        assert_eq!(rc, SUCCESS);
        infos[..count as usize].iter().map(|p| p.pid).collect()
    }

    /// Replaces the script atomically, as the testbed does.
    fn write_script(path: &std::path::Path, script: &serde_json::Value) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, script.to_string()).expect("write script");
        std::fs::rename(&tmp, path).expect("rename script");
    }

    #[test]
    fn a_changed_script_is_followed_without_a_new_init() {
        let dir = std::env::temp_dir().join(format!("fake-nvml-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("script.json");
        let start = now_ms();
        let gpu = |procs: serde_json::Value| {
            serde_json::json!({"start_unix_ms": start, "gpus": [{
                "uuid": "GPU-r", "name": "Fake", "memory_total": 1u64 << 30, "processes": procs
            }]})
        };
        write_script(&path, &gpu(serde_json::json!([{"pid": 10}])));
        // SAFETY: the only test in this crate that loads a script (the other reads no env).
        unsafe { std::env::set_var("FAKE_NVML_SCRIPT", &path) };
        assert_eq!(nvmlInit_v2(), SUCCESS);
        assert_eq!(running_pids(), vec![10]);

        write_script(&path, &gpu(serde_json::json!([{"pid": 10}, {"pid": 20}])));
        std::thread::sleep(std::time::Duration::from_millis(RELOAD_CHECK_MS + 20));
        assert_eq!(running_pids(), vec![10, 20], "the new process is listed");

        // A broken version keeps the last good script in force.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, "{ not json").expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        std::thread::sleep(std::time::Duration::from_millis(RELOAD_CHECK_MS + 20));
        assert_eq!(running_pids(), vec![10, 20], "a bad script is ignored");

        // A process that ended (its end_s in the past) is gone; the start time is kept.
        write_script(
            &path,
            &gpu(serde_json::json!([{"pid": 20, "end_s": 0.001}])),
        );
        std::thread::sleep(std::time::Duration::from_millis(RELOAD_CHECK_MS + 20));
        assert_eq!(running_pids(), Vec::<u32>::new(), "ended and removed");
        assert_eq!(nvmlShutdown(), SUCCESS);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
