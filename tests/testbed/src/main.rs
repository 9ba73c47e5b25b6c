//! `iw-testbed`: the simulated vLLM-compatible runtime (`serve`), the traffic generator
//! (`traffic`), both together for a scenario (`run`), and open-loop load at a fixed rate
//! (`load`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use inferwatch_testbed::config::{ResourcePid, Scenario};
use inferwatch_testbed::load::{self, LoadOptions};
use inferwatch_testbed::runtime::{self, ServeOptions};
use inferwatch_testbed::traffic::{self, TrafficOptions};
use inferwatch_testbed::truth::JsonlWriter;

#[derive(Parser, Debug)]
#[command(name = "iw-testbed", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the simulated runtime (runtime settings from the scenario's `[runtime]`).
    Serve {
        /// Scenario file (only `[runtime]` is used); defaults apply without one.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Listen port.
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Ground-truth JSONL output.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// OTLP/gRPC endpoint for `llm_request` spans, e.g. http://127.0.0.1:4317.
        #[arg(long, env = "IW_TESTBED_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Override the disconnect policy (immediate | delayed:<ms> | never).
        #[arg(long)]
        policy: Option<String>,
        /// Multiply every duration.
        #[arg(long, default_value_t = 1.0)]
        duration_scale: f64,
        /// Write (and keep updating) the fake NVML's script (tests/fake-nvml) as the runtime
        /// plays the scenario: its GPU memory and SM use, and contention neighbours as real
        /// processes. An existing script's GPU and start time are kept.
        #[arg(long)]
        nvml_script: Option<PathBuf>,
        /// Override the pid attribute of the span resource (none | process_pid |
        /// vllm_process_id).
        #[arg(long)]
        resource_pid: Option<ResourcePid>,
        /// On SIGTERM, finish the requests in flight before exiting (a graceful drain), instead
        /// of stopping at once.
        #[arg(long)]
        drain: bool,
    },
    /// Send a scenario's traffic to a running runtime.
    Traffic {
        /// Scenario file.
        #[arg(long)]
        scenario: PathBuf,
        /// Target, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        target: String,
        /// Client-side truth JSONL output.
        #[arg(long)]
        client_truth: Option<PathBuf>,
        /// Multiply arrival offsets and think times.
        #[arg(long, default_value_t = 1.0)]
        duration_scale: f64,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Start the runtime and the traffic of a scenario; exit when the traffic is done.
    Run {
        /// Scenario file.
        #[arg(long)]
        scenario: PathBuf,
        /// Runtime port (0: pick a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Server-side truth JSONL output.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// Client-side truth JSONL output.
        #[arg(long)]
        client_truth: Option<PathBuf>,
        /// OTLP/gRPC endpoint for the runtime's spans.
        #[arg(long, env = "IW_TESTBED_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Multiply every duration.
        #[arg(long, default_value_t = 1.0)]
        duration_scale: f64,
        /// Override the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the disconnect policy (immediate | delayed:<ms> | never).
        #[arg(long)]
        policy: Option<String>,
        /// Override per-token span events (true | false).
        #[arg(long)]
        token_events: Option<bool>,
        /// Write (and keep updating) the fake NVML's script, as `serve --nvml-script`.
        #[arg(long)]
        nvml_script: Option<PathBuf>,
        /// Override the pid attribute of the span resource, as `serve --resource-pid`.
        #[arg(long)]
        resource_pid: Option<ResourcePid>,
    },
    /// Open-loop load at a fixed rate against a running runtime (`serve`): one tiny streaming
    /// completion per connection, a share closing early; prints a JSON summary on stdout.
    Load {
        /// Target, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        target: String,
        /// Requests per second offered.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds to offer them for.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// `max_tokens` of the requests read to the end.
        #[arg(long, default_value_t = 4)]
        max_tokens: u32,
        /// Share of requests that close (FIN) mid-stream.
        #[arg(long, default_value_t = 0.0)]
        abort_share: f64,
        /// `max_tokens` of the aborting requests.
        #[arg(long, default_value_t = 64)]
        abort_max_tokens: u32,
        /// Tokens an aborting request reads before it closes.
        #[arg(long, default_value_t = 2)]
        abort_after: u64,
        /// Requests in flight at most (beyond: skipped and counted).
        #[arg(long, default_value_t = 4096)]
        max_in_flight: u64,
        /// Client-side truth JSONL of the aborted requests.
        #[arg(long)]
        abort_truth: Option<PathBuf>,
        /// Model name sent.
        #[arg(long, default_value = "sim-llama-3-8b")]
        model: String,
        /// Seed of the trace ids.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// A neighbour process for the fake NVML to list (started by the runtime with `argv[0]` set
    /// to the scenario's neighbour): detaches, prints its pid, sleeps until killed.
    #[command(hide = true)]
    Hog {
        /// Command name to take (`/proc/<pid>/comm`).
        #[arg(long)]
        comm: String,
        /// Exit when this process is gone.
        #[arg(long)]
        watch_pid: u32,
        /// Exit after this many seconds at most.
        #[arg(long, default_value_t = 600.0)]
        max_s: f64,
    },
    /// The engine child of a runtime (started by it): holds the fake GPU in the NVML script,
    /// sleeps until its server is gone.
    #[command(hide = true)]
    EngineCore {
        /// Command name to take (`/proc/<pid>/comm`).
        #[arg(long)]
        comm: String,
        /// Exit when this process is gone.
        #[arg(long)]
        watch_pid: u32,
        /// Exit after this many seconds at most.
        #[arg(long, default_value_t = 86_400.0)]
        max_s: f64,
    },
}

fn target_addr(t: &str) -> String {
    t.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Hog {
        comm,
        watch_pid,
        max_s,
    } = &cli.cmd
    {
        // Before any runtime thread exists: it forks.
        return inferwatch_testbed::nvml::hog_main(comm, *watch_pid, *max_s);
    }
    if let Cmd::EngineCore {
        comm,
        watch_pid,
        max_s,
    } = &cli.cmd
    {
        return inferwatch_testbed::nvml::engine_main(comm, *watch_pid, *max_s);
    }
    // Multi-thread: the OTLP batch exporter blocks on a current-thread runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve {
            scenario,
            host,
            port,
            truth,
            otlp_endpoint,
            policy,
            duration_scale,
            nvml_script,
            resource_pid,
            drain,
        } => {
            let mut rt = match scenario {
                Some(p) => Scenario::load(&p)?.runtime,
                None => Default::default(),
            };
            if let Some(p) = policy {
                rt.disconnect_policy = p;
            }
            if let Some(p) = resource_pid {
                rt.resource_pid = p;
            }
            let listen: SocketAddr = format!("{host}:{port}")
                .parse()
                .with_context(|| format!("bad listen address {host}:{port}"))?;
            let running = runtime::start(ServeOptions {
                listen,
                runtime: rt,
                duration_scale,
                truth,
                otlp_endpoint,
                nvml_script,
            })
            .await?;
            wait_signal().await;
            if drain {
                tracing::info!("draining");
                running.drain(std::time::Duration::from_secs(60)).await;
            }
            tracing::info!("shutting down");
            running.shutdown().await;
            Ok(())
        }
        Cmd::Traffic {
            scenario,
            target,
            client_truth,
            duration_scale,
            seed,
        } => {
            let mut s = Scenario::load(&scenario)?;
            if let Some(seed) = seed {
                s.seed = seed;
            }
            let plan = traffic::plan(&s)?;
            let writer = Arc::new(JsonlWriter::create(client_truth.as_deref())?);
            let sum = traffic::run(
                plan,
                TrafficOptions {
                    target: target_addr(&target),
                    model: s.runtime.model.clone(),
                    duration_scale,
                    connect_timeout: Duration::from_secs(120),
                },
                writer,
            )
            .await;
            tracing::info!(?sum, "traffic done");
            Ok(())
        }
        Cmd::Run {
            scenario,
            port,
            truth,
            client_truth,
            otlp_endpoint,
            duration_scale,
            seed,
            policy,
            token_events,
            nvml_script,
            resource_pid,
        } => {
            let mut s = Scenario::load(&scenario)?;
            if let Some(seed) = seed {
                s.seed = seed;
            }
            if let Some(p) = policy {
                s.runtime.disconnect_policy = p;
            }
            if let Some(t) = token_events {
                s.runtime.token_events = t;
            }
            if let Some(p) = resource_pid {
                s.runtime.resource_pid = p;
            }
            let port = if port == 0 { free_port()? } else { port };
            let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
            let plan = traffic::plan(&s)?;
            let writer = Arc::new(JsonlWriter::create(client_truth.as_deref())?);
            let opts = TrafficOptions {
                target: addr.to_string(),
                model: s.runtime.model.clone(),
                duration_scale,
                connect_timeout: Duration::from_secs(120),
            };
            if s.runtime.separate_process {
                // A real new process: the agent sees exec, the load phase and listen().
                let exe = std::env::current_exe()?;
                let mut cmd = tokio::process::Command::new(exe);
                cmd.arg("serve")
                    .arg("--scenario")
                    .arg(&scenario)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--duration-scale")
                    .arg(duration_scale.to_string())
                    .kill_on_drop(true);
                if let Some(t) = &truth {
                    cmd.arg("--truth").arg(t);
                }
                if let Some(e) = &otlp_endpoint {
                    cmd.arg("--otlp-endpoint").arg(e);
                }
                cmd.arg("--policy").arg(&s.runtime.disconnect_policy);
                if let Some(p) = &nvml_script {
                    cmd.arg("--nvml-script").arg(p);
                }
                cmd.arg("--resource-pid")
                    .arg(s.runtime.resource_pid.as_str());
                let mut child = cmd.spawn().context("spawning iw-testbed serve")?;
                let sum = traffic::run(plan, opts, writer).await;
                tracing::info!(?sum, "traffic done");
                if let Some(pid) = child.id() {
                    // SIGTERM so the child flushes its spans.
                    // SAFETY: kill(2) on our own child's pid has no memory effects.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGTERM);
                    }
                }
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    child.start_kill()?;
                }
                Ok(())
            } else {
                let rt = s.runtime.clone();
                let server = tokio::spawn(runtime::start(ServeOptions {
                    listen: addr,
                    runtime: rt,
                    duration_scale,
                    truth,
                    otlp_endpoint,
                    nvml_script,
                }));
                let sum = traffic::run(plan, opts, writer).await;
                tracing::info!(?sum, "traffic done");
                let running = server.await??;
                // Let the engine finish requests that `never` keeps generating.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while running.engine.load() != (0, 0) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                running.shutdown().await;
                Ok(())
            }
        }
        Cmd::Load {
            target,
            rate,
            duration,
            max_tokens,
            abort_share,
            abort_max_tokens,
            abort_after,
            max_in_flight,
            abort_truth,
            model,
            seed,
        } => {
            anyhow::ensure!(
                rate > 0.0 && duration > 0.0,
                "--rate and --duration must be > 0"
            );
            let writer = Arc::new(JsonlWriter::create(abort_truth.as_deref())?);
            let sum = load::run(
                LoadOptions {
                    target: target_addr(&target),
                    model,
                    rate,
                    duration: Duration::from_secs_f64(duration),
                    max_tokens: max_tokens.max(1),
                    abort_share,
                    abort_max_tokens: abort_max_tokens.max(1),
                    abort_after,
                    max_in_flight: max_in_flight.max(1),
                    seed,
                },
                writer,
            )
            .await;
            println!("{}", serde_json::to_string(&sum)?);
            Ok(())
        }
        // Dispatched in `main` before the runtime starts.
        Cmd::Hog { .. } | Cmd::EngineCore { .. } => Ok(()),
    }
}
