//! Tests of the NVML source: sample conversion and error handling, then the real nvml-wrapper
//! path against the scripted fake `libnvidia-ml` (`tests/fake-nvml`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nvml_wrapper::enums::device::UsedGpuMemory;

use super::*;
use crate::internal_events::AgentMetrics;
use crate::sources::channel::source_channel;

fn proc_info(pid: u32, bytes: Option<u64>) -> ProcessInfo {
    ProcessInfo {
        pid,
        used_gpu_memory: bytes.map_or(UsedGpuMemory::Unavailable, UsedGpuMemory::Used),
        gpu_instance_id: None,
        compute_instance_id: None,
    }
}

fn util(pid: u32, ts: u64, sm: u32, mem: u32) -> ProcessUtilizationSample {
    ProcessUtilizationSample {
        pid,
        timestamp: ts,
        sm_util: sm,
        mem_util: mem,
        enc_util: 0,
        dec_util: 0,
    }
}

#[test]
fn merge_joins_memory_and_mean_utilisation_per_pid() {
    let procs = [
        proc_info(10, Some(1000)),
        proc_info(20, None),
        proc_info(10, Some(24)),
    ];
    let utils = [
        util(10, 1, 20, 4),
        util(10, 2, 41, 6),
        util(30, 2, 250, 1),
        util(0, 2, 50, 50),
    ];
    let merged = merge_processes("GPU-a", &procs, &utils);
    let pids: Vec<u32> = merged.iter().map(|p| p.pid).collect();
    assert_eq!(
        pids,
        vec![10, 20, 30],
        "one entry per pid, sorted, pid 0 ignored"
    );
    assert_eq!(
        merged[0].used_memory,
        Some(1024),
        "MIG entries of a pid add up"
    );
    assert_eq!(merged[0].sm_util, Some(31), "mean of 20 and 41, rounded");
    assert_eq!(merged[0].mem_util, Some(5));
    assert_eq!(
        merged[1].used_memory, None,
        "unavailable memory stays unknown"
    );
    assert_eq!(merged[1].sm_util, None, "no utilisation sample");
    assert_eq!(merged[2].used_memory, None, "utilisation-only process");
    assert_eq!(merged[2].sm_util, Some(100), "shares are capped at 100");
    assert!(merged.iter().all(|p| p.gpu_uuid == "GPU-a"));
}

#[test]
fn errors_are_classified() {
    assert_eq!(
        classify(NvmlCall::ProcessUtilization, &WrapperError::NotFound),
        ErrorClass::NoData
    );
    assert_eq!(
        classify(NvmlCall::Memory, &WrapperError::NotFound),
        ErrorClass::Other
    );
    assert_eq!(
        classify(NvmlCall::ProcessUtilization, &WrapperError::NotSupported),
        ErrorClass::NotSupported
    );
    assert_eq!(
        classify(NvmlCall::Utilization, &WrapperError::GpuLost),
        ErrorClass::GpuLost
    );
}

#[test]
fn error_log_is_deduplicated_and_rate_limited() {
    let mut log = ErrorLog::new(Duration::from_secs(60));
    let t0 = Instant::now();
    let lost = WrapperError::GpuLost;
    assert_eq!(log.record(0, NvmlCall::Memory, &lost, t0), Some(0), "first");
    assert_eq!(log.record(0, NvmlCall::Memory, &lost, t0), None, "repeat");
    assert_eq!(
        log.record(1, NvmlCall::Memory, &lost, t0),
        Some(0),
        "another GPU is another line"
    );
    assert_eq!(
        log.record(0, NvmlCall::Name, &lost, t0),
        Some(0),
        "another call is another line"
    );
    assert_eq!(
        log.record(0, NvmlCall::Memory, &lost, t0 + Duration::from_secs(61)),
        Some(1),
        "after the interval: one line with the suppressed count"
    );
}

#[test]
fn build_rejects_bad_config_and_missing_library() {
    let off = NvmlConfig {
        enabled: false,
        ..NvmlConfig::default()
    };
    assert!(matches!(NvmlSource::build(&off), Err(NvmlError::Disabled)));
    let fast = NvmlConfig {
        period_ms: 10,
        ..NvmlConfig::default()
    };
    assert!(matches!(
        NvmlSource::build(&fast),
        Err(NvmlError::PeriodTooShort { period_ms: 10 })
    ));
    let missing = NvmlConfig {
        library_path: Some("/nonexistent/libnvidia-ml.so.1".into()),
        ..NvmlConfig::default()
    };
    match NvmlSource::build(&missing) {
        Err(NvmlError::Init { library, .. }) => {
            assert!(
                library.contains("nonexistent"),
                "names the library: {library}"
            )
        }
        other => panic!("expected Init error, got {other:?}"),
    }
}

/// The fake library, built once per test process.
fn fake_nvml() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let status = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", "fake-nvml"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p fake-nvml");
        assert!(status.success(), "cargo build -p fake-nvml failed");
        // The test binary is target/<profile>/deps/<name>; the cdylib is target/<profile>/.
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary under target/<profile>/deps");
        let lib = profile_dir.join("libnvidia_ml.so");
        assert!(lib.exists(), "fake NVML not found at {}", lib.display());
        lib
    })
}

/// Tests that load the fake share the process-wide `FAKE_NVML_SCRIPT`.
static FAKE_LOCK: Mutex<()> = Mutex::new(());

fn with_script<T>(script: &serde_json::Value, f: impl FnOnce(NvmlConfig) -> T) -> T {
    let lib = fake_nvml();
    let _guard = FAKE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!(
        "inferwatch-nvml-{}-{}",
        std::process::id(),
        unix_nanos_now()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("script.json");
    std::fs::write(&path, script.to_string()).expect("write script");
    // SAFETY: the lock above serialises every test that touches this variable.
    unsafe { std::env::set_var("FAKE_NVML_SCRIPT", &path) };
    let config = NvmlConfig {
        library_path: Some(lib.to_path_buf()),
        period_ms: 100,
        ..NvmlConfig::default()
    };
    let out = f(config);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn now_ms() -> u64 {
    unix_nanos_now() / 1_000_000
}

const GIB: u64 = 1 << 30;

#[test]
fn fake_nvml_through_nvml_wrapper_with_ramps_and_injected_errors() {
    // Build the fake first: the script's clock starts below, and a build takes seconds.
    fake_nvml();
    // Started 10 s ago: the runtime's memory ramp (0 -> 40 GiB over 0..20 s) is halfway
    // (2 GiB/s: the bounds below allow for a slow, loaded test machine).
    let start = now_ms() - 10_000;
    let script = serde_json::json!({
        "start_unix_ms": start,
        "gpus": [
            {
                "uuid": "GPU-11111111-2222-3333-4444-555555555555",
                "name": "Fake H100 80GB HBM3",
                "memory_total": 80 * GIB,
                "memory_base": GIB / 2,
                "processes": [
                    {"pid": 4242, "memory": [[0, 0], [20, 40 * GIB]],
                     "sm_util": [[0, 60]], "mem_util": [[0, 20]]},
                    {"pid": 777, "start_s": 5, "memory": [[0, 2 * GIB]],
                     "sm_util": [[0, 30]], "mem_util": [[0, 5]]},
                    {"pid": 999, "start_s": 1000, "memory": [[0, GIB]]}
                ],
                "errors": [
                    {"call": "utilization", "code": 999, "max_times": 1}
                ]
            },
            {
                "uuid": "GPU-66666666-7777-8888-9999-000000000000",
                "name": "Fake A100 MIG",
                "memory_total": 40 * GIB,
                "processes": [{"pid": 31337, "memory": [[0, GIB]], "sm_util": [[0, 10]]}],
                "errors": [{"call": "process_utilization", "code": 3}]
            }
        ]
    });
    with_script(&script, |config| {
        let check = NvmlSource::check(&config).expect("check against the fake");
        assert_eq!(check.gpus.len(), 2, "{check:?}");
        assert_eq!(check.gpus[0].2, "Fake H100 80GB HBM3");
        assert_eq!(check.driver_version.as_deref(), Some("550.00.fake"));

        let mut source = NvmlSource::build(&config).expect("build against the fake");
        let first = source.poll();
        assert_eq!(first.gpus.len(), 2, "both GPUs answer: {first:?}");
        let g0 = &first.gpus[0];
        assert_eq!(g0.uuid, "GPU-11111111-2222-3333-4444-555555555555");
        assert_eq!(
            g0.sm_util, None,
            "the injected utilisation error empties only that"
        );
        assert_eq!(g0.memory_total, Some(80 * GIB));
        let used = g0
            .memory_used
            .expect("memory works despite the injected error");
        assert!(
            (22 * GIB..=26 * GIB).contains(&used),
            "0.5 GiB base + ~20 GiB runtime + 2 GiB neighbour, got {used}"
        );
        let runtime = first
            .processes
            .iter()
            .find(|p| p.pid == 4242)
            .expect("runtime listed");
        let mem = runtime.used_memory.expect("runtime memory");
        assert!(
            (20 * GIB..=24 * GIB).contains(&mem),
            "halfway up the ramp, got {mem}"
        );
        assert_eq!(runtime.sm_util, Some(60));
        assert_eq!(runtime.mem_util, Some(20));
        assert!(
            first.processes.iter().all(|p| p.pid != 999),
            "not started yet"
        );
        let mig = first
            .processes
            .iter()
            .find(|p| p.pid == 31337)
            .expect("MIG process listed with memory");
        assert_eq!(mig.used_memory, Some(GIB));
        assert_eq!(mig.sm_util, None, "NotSupported leaves the share empty");
        assert_eq!(
            first.gpus[1].sm_util,
            Some(10),
            "the MIG GPU's other calls work"
        );

        std::thread::sleep(Duration::from_millis(150));
        let second = source.poll();
        assert_eq!(
            second.gpus[0].sm_util,
            Some(90),
            "the injected error fired once; then 60 + 30"
        );
        let later = second
            .processes
            .iter()
            .find(|p| p.pid == 4242)
            .and_then(|p| p.used_memory)
            .expect("runtime memory again");
        assert!(later >= mem, "the ramp goes up: {mem} -> {later}");
        let counters = source.counters();
        assert_eq!(counters.polls.load(Ordering::Relaxed), 2);
        assert!(
            counters.call_errors.load(Ordering::Relaxed) >= 3,
            "utilisation once + MIG twice"
        );
    });
}

#[test]
fn no_gpu_is_a_typed_error() {
    with_script(
        &serde_json::json!({"gpus": []}),
        |config| match NvmlSource::build(&config) {
            Err(NvmlError::NoGpu { library }) => assert!(library.ends_with("libnvidia_ml.so")),
            other => panic!("expected NoGpu, got {other:?}"),
        },
    );
}

#[test]
fn spawn_sends_samples_and_stops_on_cancel() {
    let script = serde_json::json!({
        "gpus": [{"uuid": "GPU-x", "name": "Fake", "memory_total": GIB,
                  "processes": [{"pid": 5, "memory": [[0, 1024]], "sm_util": [[0, 7]]}]}]
    });
    with_script(&script, |config| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let source = NvmlSource::build(&config).expect("build");
            let counters = source.counters();
            let (tx, mut rx) = source_channel("nvml", 1, &AgentMetrics::default());
            let cancel = CancellationToken::new();
            let handle = source.spawn(tx, cancel.clone());
            let sample = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a sample within 5 s")
                .expect("channel open");
            assert_eq!(sample.processes.len(), 1, "{sample:?}");
            // Do not read: the channel (capacity 1) fills and samples are dropped, counted.
            tokio::time::sleep(Duration::from_millis(450)).await;
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(2), handle)
                .await
                .expect("poller stops within 2 s of cancel")
                .expect("poller did not panic");
            assert!(
                counters.samples_dropped.load(Ordering::Relaxed) >= 1,
                "a full queue drops and counts"
            );
        });
    });
}
