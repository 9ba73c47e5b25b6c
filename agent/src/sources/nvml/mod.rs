//! The NVML source (contract §1.3): per GPU uuid, name, SM and memory utilisation, memory used /
//! total; per process used memory and SM / memory utilisation samples.
//!
//! [`NvmlSource::build`] loads the library (`libnvidia-ml.so.1`, or `library_path`) and finds
//! the GPUs; it fails with a typed [`NvmlError`] when there is no library or no GPU, which the
//! pipeline logs once before running without the source. [`NvmlSource::spawn`] then polls on a
//! blocking thread (NVML calls block) and sends one [`GpuSample`] per period on a bounded
//! channel, dropping and counting samples the pipeline has no room for.
//!
//! Each NVML call of a poll is handled on its own: a process gone, a GPU lost or
//! `NotSupported` (e.g. per-process utilisation under MIG) leaves that field empty for this
//! poll, logs one line per (GPU, call, error) at most every `error_log_interval_s`, and the
//! rest of the poll goes on.

mod config;
#[cfg(test)]
mod tests;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError as WrapperError;
use nvml_wrapper::struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{MIN_PERIOD_MS, NvmlConfig};

use crate::model::{GpuProcessStat, GpuSample, GpuStat, UnixNanos};
use crate::sources::channel::SourceSender;

/// The library name the loader resolves when no `library_path` is configured.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// Why the NVML source cannot run.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    /// The source is turned off in the configuration.
    #[error("the NVML source is disabled")]
    Disabled,
    /// `period_ms` is below [`MIN_PERIOD_MS`].
    #[error("period_ms = {period_ms} is below the minimum of {MIN_PERIOD_MS} ms")]
    PeriodTooShort {
        /// The configured period.
        period_ms: u64,
    },
    /// `nvmlInit_v2` failed: no library, no driver, or no permission.
    #[error("loading and initialising NVML from {library} (nvmlInit_v2)")]
    Init {
        /// The library path or name tried.
        library: String,
        /// The cause.
        #[source]
        source: WrapperError,
    },
    /// `nvmlDeviceGetCount_v2` failed.
    #[error("counting GPUs (nvmlDeviceGetCount_v2)")]
    DeviceCount {
        /// The cause.
        #[source]
        source: WrapperError,
    },
    /// NVML works but reports no GPU.
    #[error("NVML from {library} reports no GPU")]
    NoGpu {
        /// The library path or name.
        library: String,
    },
}

/// The source's own counters, shared with the pipeline's metrics (read with
/// [`NvmlSource::counters`]); monotonic.
#[derive(Debug, Default)]
pub struct NvmlCounters {
    /// Polls made.
    pub polls: AtomicU64,
    /// Samples sent to the pipeline.
    pub samples_sent: AtomicU64,
    /// Samples dropped because the channel was full.
    pub samples_dropped: AtomicU64,
    /// NVML calls that failed (every failure, logged or not; `NotFound` from the process
    /// utilisation call, which only means "no new sample", is not counted).
    pub call_errors: AtomicU64,
}

/// What [`NvmlSource::check`] found, for `inferwatch check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlCheck {
    /// The library loaded.
    pub library: String,
    /// The driver version, when NVML reports it.
    pub driver_version: Option<String>,
    /// Index, uuid and name of every GPU (an entry's uuid or name says why when its call
    /// failed).
    pub gpus: Vec<(u32, String, String)>,
}

/// The NVML calls of a poll, as named in logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NvmlCall {
    /// `nvmlDeviceGetHandleByIndex_v2`.
    Handle,
    /// `nvmlDeviceGetUUID`.
    Uuid,
    /// `nvmlDeviceGetName`.
    Name,
    /// `nvmlDeviceGetUtilizationRates`.
    Utilization,
    /// `nvmlDeviceGetMemoryInfo_v2`.
    Memory,
    /// `nvmlDeviceGetComputeRunningProcesses_v3`.
    Processes,
    /// `nvmlDeviceGetProcessUtilization`.
    ProcessUtilization,
}

impl NvmlCall {
    /// The C function's name.
    pub fn symbol(self) -> &'static str {
        match self {
            NvmlCall::Handle => "nvmlDeviceGetHandleByIndex_v2",
            NvmlCall::Uuid => "nvmlDeviceGetUUID",
            NvmlCall::Name => "nvmlDeviceGetName",
            NvmlCall::Utilization => "nvmlDeviceGetUtilizationRates",
            NvmlCall::Memory => "nvmlDeviceGetMemoryInfo_v2",
            NvmlCall::Processes => "nvmlDeviceGetComputeRunningProcesses_v3",
            NvmlCall::ProcessUtilization => "nvmlDeviceGetProcessUtilization",
        }
    }
}

/// How a failed call is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing to report: `NotFound` from the process utilisation call means no sample newer
    /// than the last one (an idle GPU).
    NoData,
    /// The GPU does not support the call (MIG, an old board): expected, logged once.
    NotSupported,
    /// The GPU fell off the bus.
    GpuLost,
    /// Anything else.
    Other,
}

/// Classifies an error of `call`.
pub fn classify(call: NvmlCall, err: &WrapperError) -> ErrorClass {
    match err {
        WrapperError::NotFound if call == NvmlCall::ProcessUtilization => ErrorClass::NoData,
        WrapperError::NotSupported => ErrorClass::NotSupported,
        WrapperError::GpuLost => ErrorClass::GpuLost,
        _ => ErrorClass::Other,
    }
}

/// Rate-limits error logs: the first occurrence of a (GPU, call, error) is logged, then at most
/// one line per interval saying how many were suppressed. Bounded: at most `MAX_KEYS` keys.
#[derive(Debug)]
pub struct ErrorLog {
    interval: Duration,
    seen: HashMap<(u32, NvmlCall, String), (Instant, u64)>,
}

impl ErrorLog {
    const MAX_KEYS: usize = 1024;

    /// A log that repeats a line at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: HashMap::new(),
        }
    }

    /// Records an error; returns `Some(suppressed since the last line)` when a line is due.
    pub fn record(
        &mut self,
        gpu: u32,
        call: NvmlCall,
        err: &WrapperError,
        now: Instant,
    ) -> Option<u64> {
        let key = (gpu, call, err.to_string());
        if !self.seen.contains_key(&key) && self.seen.len() >= Self::MAX_KEYS {
            // A flood of distinct errors: forget the old ones rather than grow.
            self.seen.clear();
        }
        match self.seen.get_mut(&key) {
            None => {
                self.seen.insert(key, (now, 0));
                Some(0)
            }
            Some((last, suppressed)) if now.duration_since(*last) >= self.interval => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            Some((_, suppressed)) => {
                *suppressed += 1;
                None
            }
        }
    }
}

/// The NVML source, built and ready to poll.
pub struct NvmlSource {
    nvml: Nvml,
    library: String,
    config: NvmlConfig,
    counters: Arc<NvmlCounters>,
    errors: ErrorLog,
    /// Per GPU index: uuid and name, which do not change while the driver is loaded.
    names: BTreeMap<u32, (String, String)>,
    /// Per GPU index: the newest process-utilisation timestamp seen (NVML's µs clock).
    last_seen_us: BTreeMap<u32, u64>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("library", &self.library)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn open(config: &NvmlConfig) -> Result<(Nvml, String), NvmlError> {
    let library = config
        .library_path
        .as_ref()
        .map_or_else(|| DEFAULT_LIBRARY.to_owned(), |p| p.display().to_string());
    let mut builder = Nvml::builder();
    if let Some(path) = &config.library_path {
        builder.lib_path(path.as_os_str());
    } else {
        builder.lib_path(OsStr::new(DEFAULT_LIBRARY));
    }
    let nvml = builder.init().map_err(|source| NvmlError::Init {
        library: library.clone(),
        source,
    })?;
    Ok((nvml, library))
}

impl NvmlSource {
    /// Loads NVML and checks that it sees at least one GPU.
    ///
    /// # Errors
    /// [`NvmlError::Disabled`], [`NvmlError::PeriodTooShort`], [`NvmlError::Init`] (no library,
    /// no driver, no permission), [`NvmlError::DeviceCount`], [`NvmlError::NoGpu`].
    pub fn build(config: &NvmlConfig) -> Result<Self, NvmlError> {
        if !config.enabled {
            return Err(NvmlError::Disabled);
        }
        if config.period_ms < MIN_PERIOD_MS {
            return Err(NvmlError::PeriodTooShort {
                period_ms: config.period_ms,
            });
        }
        let (nvml, library) = open(config)?;
        let count = nvml
            .device_count()
            .map_err(|source| NvmlError::DeviceCount { source })?;
        if count == 0 {
            return Err(NvmlError::NoGpu { library });
        }
        Ok(Self {
            nvml,
            library,
            errors: ErrorLog::new(Duration::from_secs(config.error_log_interval_s)),
            config: config.clone(),
            counters: Arc::new(NvmlCounters::default()),
            names: BTreeMap::new(),
            last_seen_us: BTreeMap::new(),
        })
    }

    /// For `inferwatch check`: loads NVML and lists the GPUs.
    ///
    /// # Errors
    /// As [`NvmlSource::build`], except that a disabled source is still checked.
    pub fn check(config: &NvmlConfig) -> Result<NvmlCheck, NvmlError> {
        let (nvml, library) = open(config)?;
        let count = nvml
            .device_count()
            .map_err(|source| NvmlError::DeviceCount { source })?;
        if count == 0 {
            return Err(NvmlError::NoGpu { library });
        }
        let gpus = (0..count)
            .map(|i| match nvml.device_by_index(i) {
                Ok(d) => (
                    i,
                    d.uuid().unwrap_or_else(|e| format!("uuid failed: {e}")),
                    d.name().unwrap_or_else(|e| format!("name failed: {e}")),
                ),
                Err(e) => (i, format!("handle failed: {e}"), String::new()),
            })
            .collect();
        Ok(NvmlCheck {
            driver_version: nvml.sys_driver_version().ok(),
            library,
            gpus,
        })
    }

    /// The library it loaded.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// The counters the poller updates.
    pub fn counters(&self) -> Arc<NvmlCounters> {
        Arc::clone(&self.counters)
    }

    /// Polls every GPU once. Never fails: a failed call leaves its fields empty.
    pub fn poll(&mut self) -> GpuSample {
        self.counters.polls.fetch_add(1, Ordering::Relaxed);
        let ts = unix_nanos_now();
        let mut sample = GpuSample {
            ts,
            gpus: Vec::new(),
            processes: Vec::new(),
        };
        let count = match self.nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                self.report(u32::MAX, NvmlCall::Handle, &e);
                return sample;
            }
        };
        for index in 0..count {
            self.poll_gpu(index, &mut sample);
        }
        sample
    }

    fn poll_gpu(&mut self, index: u32, sample: &mut GpuSample) {
        let mut failures: Vec<(NvmlCall, WrapperError)> = Vec::new();
        let device = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                self.report(index, NvmlCall::Handle, &e);
                return;
            }
        };
        if let Entry::Vacant(slot) = self.names.entry(index) {
            match (device.uuid(), device.name()) {
                (Ok(uuid), Ok(name)) => {
                    slot.insert((uuid, name));
                }
                (Err(e), _) => failures.push((NvmlCall::Uuid, e)),
                (Ok(uuid), Err(e)) => {
                    // A name is nice to have; the uuid is the key.
                    failures.push((NvmlCall::Name, e));
                    slot.insert((uuid, String::new()));
                }
            }
        }
        let Some((uuid, name)) = self.names.get(&index).cloned() else {
            // Without a uuid nothing of this GPU can be keyed.
            for (call, e) in failures {
                self.report(index, call, &e);
            }
            return;
        };
        let mut stat = GpuStat {
            index,
            uuid: uuid.clone(),
            name,
            ..GpuStat::default()
        };
        match device.utilization_rates() {
            Ok(u) => {
                stat.sm_util = Some(u.gpu);
                stat.mem_util = Some(u.memory);
            }
            Err(e) => failures.push((NvmlCall::Utilization, e)),
        }
        match device.memory_info() {
            Ok(m) => {
                stat.memory_used = Some(m.used);
                stat.memory_total = Some(m.total);
            }
            Err(e) => failures.push((NvmlCall::Memory, e)),
        }
        let procs = device.running_compute_processes().unwrap_or_else(|e| {
            failures.push((NvmlCall::Processes, e));
            Vec::new()
        });
        let last = self.last_seen_us.get(&index).copied();
        let utils = device.process_utilization_stats(last).unwrap_or_else(|e| {
            failures.push((NvmlCall::ProcessUtilization, e));
            Vec::new()
        });
        if let Some(newest) = utils.iter().map(|s| s.timestamp).max() {
            self.last_seen_us
                .insert(index, newest.max(last.unwrap_or(0)));
        }
        sample
            .processes
            .extend(merge_processes(&uuid, &procs, &utils));
        sample.gpus.push(stat);
        for (call, e) in failures {
            self.report(index, call, &e);
        }
    }

    fn report(&mut self, gpu: u32, call: NvmlCall, err: &WrapperError) {
        let class = classify(call, err);
        if class == ErrorClass::NoData {
            return;
        }
        self.counters.call_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.errors.record(gpu, call, err, Instant::now()) {
            tracing::warn!(
                gpu,
                call = call.symbol(),
                class = ?class,
                suppressed,
                error = %err,
                "NVML call failed; this field is empty for this GPU until it works again"
            );
        }
    }

    /// Starts polling on a blocking thread every `period_ms` until `cancel` fires or the
    /// receiver is gone; returns the thread's handle (it ends within about 50 ms of `cancel`).
    pub fn spawn(
        mut self,
        tx: SourceSender<GpuSample>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::task::spawn_blocking(move || self.run(&tx, &cancel))
    }

    /// The poll loop of [`NvmlSource::spawn`], on the calling thread.
    pub fn run(&mut self, tx: &SourceSender<GpuSample>, cancel: &CancellationToken) {
        let period = Duration::from_millis(self.config.period_ms.max(MIN_PERIOD_MS));
        let mut next = Instant::now();
        while !cancel.is_cancelled() {
            let sample = self.poll();
            match tx.try_send(sample) {
                Ok(()) => {
                    self.counters.samples_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let dropped = self
                        .counters
                        .samples_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    if dropped == 0 {
                        tracing::warn!(
                            queue = "nvml_samples",
                            "NVML sample queue full: samples are dropped (counted)"
                        );
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
            next += period;
            let now = Instant::now();
            if next < now {
                // A slow poll: skip the missed ticks rather than burst.
                next = now;
            }
            // Sleep in short slices so that cancellation is seen quickly.
            while !cancel.is_cancelled() {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
            }
        }
    }
}

/// Merges NVML's compute-process list and its utilisation samples into one entry per pid:
/// the utilisation of a pid is the mean of its samples since the last poll.
pub fn merge_processes(
    gpu_uuid: &str,
    procs: &[ProcessInfo],
    utils: &[ProcessUtilizationSample],
) -> Vec<GpuProcessStat> {
    let mut by_pid: BTreeMap<u32, GpuProcessStat> = BTreeMap::new();
    for p in procs {
        let entry = by_pid.entry(p.pid).or_insert_with(|| GpuProcessStat {
            gpu_uuid: gpu_uuid.to_owned(),
            pid: p.pid,
            ..GpuProcessStat::default()
        });
        if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
            // MIG lists a process once per instance: add them up.
            entry.used_memory = Some(entry.used_memory.unwrap_or(0).saturating_add(bytes));
        }
    }
    let mut sums: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for s in utils {
        let e = sums.entry(s.pid).or_default();
        e.0 += u64::from(s.sm_util.min(100));
        e.1 += u64::from(s.mem_util.min(100));
        e.2 += 1;
    }
    for (pid, (sm, mem, n)) in sums {
        // The driver reports pid 0 for samples it could not attribute.
        if pid == 0 || n == 0 {
            continue;
        }
        let entry = by_pid.entry(pid).or_insert_with(|| GpuProcessStat {
            gpu_uuid: gpu_uuid.to_owned(),
            pid,
            ..GpuProcessStat::default()
        });
        entry.sm_util = Some(((sm + n / 2) / n) as u32);
        entry.mem_util = Some(((mem + n / 2) / n) as u32);
    }
    by_pid.into_values().collect()
}

fn unix_nanos_now() -> UnixNanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
