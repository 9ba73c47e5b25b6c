//! Prints the NVML source's samples as JSON lines, one per poll: a probe for a GPU node
//! (`tests/gpu-check/gpu_check.sh` runs it) and for the fake NVML.
//!
//! ```text
//! nvml_dump [--period-ms 500] [--duration-s 90] [--lib /path/to/libnvidia-ml.so.1]
//! ```
//! Exits 2 when NVML cannot be loaded or sees no GPU (the error is printed on stderr).

use std::path::PathBuf;
use std::time::Duration;

use inferwatch::internal_events::AgentMetrics;
use inferwatch::sources::channel::source_channel;
use inferwatch::sources::nvml::{NvmlConfig, NvmlSource};
use inferwatch::sources::procfs::ProcReader;
use tokio_util::sync::CancellationToken;

fn parse_args() -> anyhow::Result<(u64, u64, Option<PathBuf>)> {
    let mut period_ms = 500;
    let mut duration_s = 90;
    let mut lib = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--period-ms" => period_ms = value()?.parse()?,
            "--duration-s" => duration_s = value()?.parse()?,
            "--lib" => lib = Some(PathBuf::from(value()?)),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok((period_ms, duration_s, lib))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (period_ms, duration_s, library_path) = parse_args()?;
    let config = NvmlConfig {
        period_ms,
        library_path,
        ..NvmlConfig::default()
    };
    let source = match NvmlSource::build(&config) {
        Ok(s) => s,
        Err(err) => {
            eprintln!(
                "nvml_dump: {}",
                inferwatch::internal_events::ErrorChain(&err)
            );
            std::process::exit(2);
        }
    };
    eprintln!("nvml_dump: loaded {}", source.library());
    let counters = source.counters();
    let (tx, mut rx) = source_channel("nvml", 64, &AgentMetrics::default());
    let cancel = CancellationToken::new();
    let poller = source.spawn(tx, cancel.clone());
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(duration_s)).await;
        stop.cancel();
    });
    let mut procs = ProcReader::new("/proc", 1024);
    while let Some(sample) = rx.recv().await {
        // Identity lines for pids not seen before, then the sample.
        for p in &sample.processes {
            if let Some(id) = procs.identity_if_new(p.pid) {
                println!("{}", serde_json::json!({ "process": id }));
            }
        }
        println!("{}", serde_json::json!({ "sample": sample }));
    }
    poller.await?;
    eprintln!(
        "nvml_dump: polls {}, dropped {}, call errors {}",
        counters.polls.load(std::sync::atomic::Ordering::Relaxed),
        counters
            .samples_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        counters
            .call_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
