//! The real-vLLM rig, started once per test binary: a recording OTLP collector (the backend),
//! the agent in this process (kernel programs on the real kernel, OTLP receiver, KV event
//! subscriber, exporter to the collector), and a real `vllm serve` (the CPU build installed by
//! `cargo xtask setup` under `target/real-vllm/`) exporting its spans to the agent over
//! OTLP/gRPC and publishing KV events.
//!
//! The agent starts before vLLM, so it receives vLLM's start-up spans too. vLLM takes 45-80 s
//! to start on two cores, so one instance serves every test of the binary; tests take the
//! rig's lock and tell their requests apart by their ids. vLLM runs in its own process group
//! with a parent-death signal tied to the rig's thread, which lives as long as the test
//! process: when the test binary exits, vLLM is told to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::harness::{Agent, Collector, free_port, kernel_tests_enabled, now_ns, workspace};

/// The rig's parts, shared by the tests.
pub struct Rig {
    runtime: tokio::runtime::Handle,
    lock: Mutex<()>,
    /// What the agent exported.
    pub collector: Collector,
    /// The agent's `/metrics`.
    pub agent_metrics: SocketAddr,
    /// The agent's OTLP/HTTP receiver (for a second vLLM with the HTTP exporter).
    pub agent_otlp_http: SocketAddr,
    /// The port of a second vLLM, watched by the agent from the start.
    pub spare_port: u16,
    /// A port for a gateway in front of the shared vLLM, watched by the agent from the start.
    pub gateway_port: u16,
    /// The port of a vLLM without KV events (the KV-eviction test's), watched likewise: its own,
    /// so that it never races the other spare vLLM for a port.
    pub no_kv_port: u16,
    /// The shared vLLM.
    pub vllm: VllmInfo,
    /// The installed environment.
    pub install: Install,
}

/// A running vLLM.
#[derive(Debug, Clone)]
pub struct VllmInfo {
    /// Its HTTP port on loopback.
    pub port: u16,
    /// Its log (`--enable-log-requests`).
    pub log: PathBuf,
    /// Wall clock just before it was started (unix ns).
    pub spawned_ns: u64,
    /// Wall clock when `/health` first answered (unix ns).
    pub ready_ns: u64,
    /// `/health` polls whose connection the port refused (vLLM not listening yet): the truth
    /// of the attempts that waited for its start.
    pub refused_before_listen: u32,
}

/// When a vLLM answered `/health`, and how many polls before it the port refused.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// Wall clock (unix ns).
    pub at_ns: u64,
    /// Polls refused (nothing listened on the port).
    pub refused: u32,
}

/// The environment `cargo xtask setup` installed.
#[derive(Debug, Clone)]
pub struct Install {
    /// `vllm`.
    pub vllm: PathBuf,
    /// Its Python (with the `openai` client).
    pub python: PathBuf,
    /// The model directory.
    pub model: PathBuf,
}

impl Rig {
    /// Starts a vLLM of a test's own on the spare watched port `no_kv_port` (no KV events, its
    /// spans to the agent over OTLP/HTTP under `service`), logging to `name`'s log, and waits
    /// until it answers. Call it while holding the rig ([`Rig::run`]): its start-up load then
    /// never overlaps another test's measurements.
    pub fn spawn_own_vllm(&self, name: &str, service: &str) -> Child {
        let log = log_path(name);
        let endpoint = format!("http://{}/v1/traces", self.agent_otlp_http);
        let mut child = spawn_vllm_env(
            &self.install,
            self.no_kv_port,
            &endpoint,
            Exporter::HttpProtobuf,
            None,
            &log,
            &[("OTEL_SERVICE_NAME", service)],
        );
        wait_ready(&mut child, self.no_kv_port, &log);
        child
    }

    /// Runs `f` on the rig's runtime, holding the rig for this test alone.
    pub fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _one_at_a_time = self.lock();
        self.runtime.block_on(f)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // A test that panicked while holding the lock leaves the rig usable.
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The agent's Prometheus text.
    pub async fn scrape(&self) -> String {
        crate::harness::scrape(self.agent_metrics).await
    }

    /// The URL of the shared vLLM's OpenAI API.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.vllm.port)
    }
}

/// The rig, started on first use; `None` when the tier is skipped (not root, or the real vLLM
/// not installed and not required).
pub fn rig() -> Option<&'static Rig> {
    static RIG: OnceLock<Option<Rig>> = OnceLock::new();
    RIG.get_or_init(start).as_ref()
}

/// The installed environment, or `None` (with a loud line) when it is missing and not required.
pub fn install() -> Option<Install> {
    let dir = workspace().join("target/real-vllm");
    let install = Install {
        vllm: dir.join("venv/bin/vllm"),
        python: dir.join("venv/bin/python"),
        model: dir.join("model"),
    };
    if dir.join("installed.stamp").exists() && install.vllm.exists() {
        return Some(install);
    }
    if std::env::var("INFERWATCH_REQUIRE_REAL_RUNTIME").is_ok_and(|v| v == "1") {
        panic!(
            "the real vLLM is required (INFERWATCH_REQUIRE_REAL_RUNTIME=1) but not installed under {}: run `cargo xtask setup`",
            dir.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED the real-vLLM tier: no real vLLM under {} (run `cargo xtask setup`) ***\n",
        dir.display()
    );
    None
}

fn start() -> Option<Rig> {
    if !kernel_tests_enabled("real_vllm") {
        return None;
    }
    let install = install()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("real-vllm-rig".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("rig runtime");
            let collector = Collector::default();
            let vllm_port = free_port();
            let spare_port = free_port();
            let gateway_port = free_port();
            let no_kv_port = free_port();
            let otlp_grpc = free_port();
            let otlp_http = free_port();
            let kv_port = free_port();
            let agent = runtime.block_on(async {
                let backend = collector.start().await;
                Agent::start_with(vllm_port, backend, |c| {
                    c.kernel.watch_ports = vec![vllm_port, spare_port, gateway_port, no_kv_port];
                    c.otlp.grpc_port = otlp_grpc;
                    c.otlp.http_port = otlp_http;
                    // No KV endpoint configured: the agent finds it on vLLM's command line
                    // (it starts before vLLM, so its periodic /proc scan does).
                    c.kv_events.endpoints = Vec::new();
                })
                .await
            });
            let log = log_path("shared");
            // Spawned from this thread, which never exits while the process lives: the
            // parent-death signal fires only when the test process ends.
            let spawned_ns = now_ns();
            let mut child = spawn_vllm(
                &install,
                vllm_port,
                &format!("http://127.0.0.1:{otlp_grpc}"),
                Exporter::Grpc,
                Some(kv_port),
                &log,
            );
            let ready = wait_ready(&mut child, vllm_port, &log);
            let rig = Rig {
                runtime: runtime.handle().clone(),
                lock: Mutex::new(()),
                collector,
                agent_metrics: agent.metrics,
                agent_otlp_http: SocketAddr::from(([127, 0, 0, 1], otlp_http)),
                spare_port,
                gateway_port,
                no_kv_port,
                vllm: VllmInfo {
                    port: vllm_port,
                    log,
                    spawned_ns,
                    ready_ns: ready.at_ns,
                    refused_before_listen: ready.refused,
                },
                install,
            };
            tx.send(rig).expect("hand the rig over");
            // The runtime (and so the agent) and the vLLM child live until the process ends.
            let _keep = (agent, child, runtime);
            loop {
                std::thread::park();
            }
        })
        .expect("spawn the rig thread");
    Some(rx.recv().expect(
        "the real-vLLM rig failed to start (its panic is above; vLLM's log is under target/real-vllm/logs/)",
    ))
}

/// How vLLM exports its spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exporter {
    /// OTLP/gRPC, vLLM's default.
    Grpc,
    /// OTLP/HTTP protobuf (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`).
    HttpProtobuf,
}

/// A log file for one vLLM start.
pub fn log_path(name: &str) -> PathBuf {
    let dir = workspace().join("target/real-vllm/logs");
    std::fs::create_dir_all(&dir).expect("vLLM log dir");
    dir.join(format!("{name}-{}.log", std::process::id()))
}

/// Starts `vllm serve` on `port` with the tier's settings (`tests/real-vllm/serve.json`), spans
/// to `otlp`, and KV events on `kv_port` when given. Its own process group; told to stop
/// when the spawning thread ends.
pub fn spawn_vllm(
    install: &Install,
    port: u16,
    otlp: &str,
    exporter: Exporter,
    kv_port: Option<u16>,
    log: &Path,
) -> Child {
    spawn_vllm_env(install, port, otlp, exporter, kv_port, log, &[])
}

/// [`spawn_vllm`] with more environment (`OTEL_SERVICE_NAME`, to tell its spans apart).
pub fn spawn_vllm_env(
    install: &Install,
    port: u16,
    otlp: &str,
    exporter: Exporter,
    kv_port: Option<u16>,
    log: &Path,
    env: &[(&str, &str)],
) -> Child {
    let out = std::fs::File::create(log).expect("vLLM log");
    let err = out.try_clone().expect("vLLM log");
    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("tests/real-vllm/serve.json"))
            .expect("tests/real-vllm/serve.json"),
    )
    .expect("serve.json parses");
    let strings = |v: &serde_json::Value| v.as_str().expect("a string").to_owned();
    let mut cmd = Command::new(&install.vllm);
    cmd.arg("serve")
        .arg(&install.model)
        .args(
            settings["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(strings),
        )
        .envs(
            settings["env"]
                .as_object()
                .expect("env")
                .iter()
                .map(|(k, v)| (k.clone(), strings(v))),
        )
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--otlp-traces-endpoint", otlp])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if exporter == Exporter::HttpProtobuf {
        cmd.env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf");
    }
    cmd.envs(env.iter().copied());
    if let Some(kv) = kv_port {
        cmd.arg("--kv-events-config").arg(format!(
            r#"{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:{kv}"}}"#
        ));
    }
    // SAFETY: setpgid and prctl are async-signal-safe and touch only the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().expect("start vllm serve")
}

/// Waits until vLLM's `/health` answers; returns that time (unix ns). Panics with the log's
/// tail when vLLM exits or takes over five minutes.
pub fn wait_ready(child: &mut Child, port: u16, log: &Path) -> Ready {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut refused = 0;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "vllm serve exited ({status}) before it was ready; its log ({}) ends:\n{}",
                log.display(),
                tail(log)
            );
        }
        if health(port, &mut refused) {
            return Ready {
                at_ns: now_ns(),
                refused,
            };
        }
        if Instant::now() > deadline {
            panic!(
                "vllm serve not ready after 300 s; its log ({}) ends:\n{}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether `/health` answers 200; a connection the port refused is counted in `refused`.
fn health(port: u16, refused: &mut u32) -> bool {
    use std::io::{Read, Write};
    let mut s = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                *refused += 1;
            }
            return false;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.ends_with(b"200")
}

/// The last lines of a log.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Stops a vLLM started by a test: SIGTERM to its process group, then SIGKILL after 20 s.
pub fn stop_vllm(mut child: Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: signals to the process group this test created.
    unsafe { libc::killpg(pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // Its children (EngineCore, workers) share the group.
            // SAFETY: as above.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// vLLM's own Prometheus counter `name` (summed over its label sets), from its `/metrics`.
pub async fn vllm_counter(port: u16, name: &str) -> f64 {
    let text = crate::harness::scrape(SocketAddr::from(([127, 0, 0, 1], port))).await;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
