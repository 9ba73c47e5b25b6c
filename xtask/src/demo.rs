//! `cargo xtask demo`: builds the agent and the testbed, starts the agent (real eBPF when root;
//! the fake GPU unless a real one is present), plays a scenario that mixes the four problems,
//! and shows what the agent finds, live, from the spans it exports. Ends by itself with a
//! summary scored against the testbed's ground truth.
//!
//! The spans go to `target/demo/traces.jsonl` (OTLP JSON lines), and also to
//! `OTEL_EXPORTER_OTLP_ENDPOINT` when it is set (the agent honours the standard variables).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::util::{cargo, is_root, root, run};

mod vllm;

/// Which runtime the demo plays against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// The bundled testbed: fast, with exact ground truth, and the fake GPU.
    Testbed,
    /// The real vLLM (CPU build, small local model; installed on first use).
    Vllm,
}

/// Everything the demo counted from the exported spans.
#[derive(Debug, Default)]
struct Tally {
    runtime_spans: u64,
    output_tokens: u64,
    joins: BTreeMap<String, u64>,
    findings: BTreeMap<String, u64>,
    billed_after_abort: u64,
    abort_methods: BTreeMap<String, u64>,
    /// The latest findings, for the live table.
    last: Vec<String>,
    /// Findings not printed yet, for plain output.
    fresh: Vec<String>,
    /// Abort findings by request id: tokens after.
    aborts: BTreeMap<String, u64>,
    /// Contention intervals seen (neighbour pid, start): one span per affected request
    /// arrives for each, listed once.
    contention_intervals: std::collections::BTreeSet<(String, String)>,
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span.get("attributes")?
        .as_array()?
        .iter()
        .find(|kv| kv.get("key").and_then(Value::as_str) == Some(key))?
        .get("value")
}

fn attr_str(span: &Value, key: &str) -> Option<String> {
    let v = attr(span, key)?;
    v.get("stringValue")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            v.get("intValue")
                .map(|i| i.to_string().trim_matches('"').to_owned())
        })
        .or_else(|| {
            v.get("doubleValue")
                .and_then(Value::as_f64)
                .map(|d| format!("{d:.2}"))
        })
}

fn attr_u64(span: &Value, key: &str) -> Option<u64> {
    let v = attr(span, key)?;
    match v.get("intValue")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Ok(request) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let Some(resource_spans) = request.get("resourceSpans").and_then(Value::as_array) else {
            return;
        };
        for rs in resource_spans {
            for ss in rs
                .get("scopeSpans")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for span in ss
                    .get("spans")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.add_span(span);
                }
            }
        }
    }

    fn add_span(&mut self, span: &Value) {
        let name = span.get("name").and_then(Value::as_str).unwrap_or("");
        if let Some(rule) = attr_str(span, "inferwatch.join")
            && !name.starts_with("inferwatch.")
        {
            self.runtime_spans += 1;
            *self.joins.entry(rule).or_default() += 1;
            self.output_tokens += attr_u64(span, "gen_ai.usage.completion_tokens")
                .or_else(|| attr_u64(span, "gen_ai.usage.output_tokens"))
                .unwrap_or(0);
        }
        if !name.starts_with("inferwatch.") {
            return;
        }
        *self.findings.entry(name.to_owned()).or_default() += 1;
        let line = match name {
            "inferwatch.abort" => {
                let after = attr_u64(span, "inferwatch.abort.tokens_after").unwrap_or(0);
                self.billed_after_abort += after;
                self.aborts.insert(
                    attr_str(span, "gen_ai.request.id").unwrap_or_default(),
                    after,
                );
                let method = attr_str(span, "inferwatch.abort.method").unwrap_or_default();
                *self.abort_methods.entry(method.clone()).or_default() += 1;
                format!(
                    "abort      {:<28} tenant {:<8} {after:>4} of {:>4} tokens after the client left ({}, {}, lag {} ms)",
                    attr_str(span, "gen_ai.request.id").unwrap_or_default(),
                    attr_str(span, "tenant.id").unwrap_or_default(),
                    attr_str(span, "inferwatch.abort.tokens_total").unwrap_or_else(|| "?".into()),
                    attr_str(span, "inferwatch.abort.how").unwrap_or_default(),
                    method,
                    attr_str(span, "inferwatch.abort.lag_ms").unwrap_or_default(),
                )
            }
            "inferwatch.kv_eviction" => format!(
                "kv evict   conversation {:<16} tenant {:<8} cached {:>5} of {:>5} expected; noisy neighbour {} ({} of the KV demand), TTFT +{} ms",
                attr_str(span, "gen_ai.conversation.id").unwrap_or_default(),
                attr_str(span, "tenant.id").unwrap_or_default(),
                attr_str(span, "inferwatch.kv_eviction.cached_tokens").unwrap_or_default(),
                attr_str(span, "inferwatch.kv_eviction.expected_cached_tokens").unwrap_or_default(),
                attr_str(span, "inferwatch.noisy_neighbour.tenant").unwrap_or_default(),
                attr_str(span, "inferwatch.noisy_neighbour.share").unwrap_or_default(),
                attr_str(span, "inferwatch.kv_eviction.ttft_penalty_ms")
                    .unwrap_or_else(|| "?".into()),
            ),
            "inferwatch.gpu_contention"
                if !self.contention_intervals.insert((
                    attr_str(span, "inferwatch.noisy_neighbour.pid").unwrap_or_default(),
                    span.get("startTimeUnixNano")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                )) =>
            {
                return;
            }
            "inferwatch.gpu_contention" => format!(
                "contention GPU {} slowed by pid {} ({}), decode x{} slower",
                attr_str(span, "inferwatch.gpu.uuid").unwrap_or_default(),
                attr_str(span, "inferwatch.noisy_neighbour.pid").unwrap_or_default(),
                attr_str(span, "inferwatch.noisy_neighbour.executable").unwrap_or_default(),
                attr_str(span, "inferwatch.contention.tpot_inflation").unwrap_or_default(),
            ),
            "inferwatch.cold_start" => format!(
                "cold start pid {} ({}): {} ms from process start to first token",
                attr_str(span, "process.pid").unwrap_or_default(),
                attr_str(span, "process.executable.name").unwrap_or_default(),
                attr_str(span, "inferwatch.cold_start.floor_ms").unwrap_or_default(),
            ),
            // Cold-start phases are children of the cold-start span: counted, not listed.
            other if other.starts_with("inferwatch.cold_start.") => return,
            other => other.to_owned(),
        };
        self.fresh.push(line.clone());
        self.last.push(line);
        if self.last.len() > 8 {
            self.last.remove(0);
        }
    }

    fn render(&self, elapsed: Duration) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "inferwatch demo — {:>4.1} s\n",
            elapsed.as_secs_f64()
        ));
        out.push_str(&format!(
            "  runtime requests forwarded {:>5}   joined by {}\n",
            self.runtime_spans,
            if self.joins.is_empty() {
                "-".to_owned()
            } else {
                self.joins
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        let share = if self.output_tokens == 0 {
            0.0
        } else {
            self.billed_after_abort as f64 * 100.0 / self.output_tokens as f64
        };
        out.push_str(&format!(
            "  billed after abort   {:>5} findings   {:>6} tokens = {share:.1}% of {} output tokens\n",
            self.findings.get("inferwatch.abort").copied().unwrap_or(0),
            self.billed_after_abort,
            self.output_tokens
        ));
        for (name, label) in [
            ("inferwatch.cold_start", "cold-start floor"),
            ("inferwatch.kv_eviction", "KV eviction"),
        ] {
            out.push_str(&format!(
                "  {label:<20} {:>5} findings\n",
                self.findings.get(name).copied().unwrap_or(0)
            ));
        }
        out.push_str(&format!(
            "  GPU contention       {:>5} findings   {} requests slowed\n",
            self.contention_intervals.len(),
            self.findings
                .get("inferwatch.gpu_contention")
                .copied()
                .unwrap_or(0)
        ));
        out.push_str("  latest:\n");
        for line in &self.last {
            out.push_str(&format!("    {line}\n"));
        }
        out
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn ready(metrics_port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", metrics_port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n");
    let mut first = String::new();
    let _ = BufReader::new(s).read_line(&mut first);
    first.contains(" 200")
}

/// Reads what was appended to `path` since `offset`.
fn read_new(path: &Path, offset: &mut u64, tally: &mut Tally) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return;
    };
    if file.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    while let Ok(n) = reader.read_line(&mut line) {
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        *offset += n as u64;
        tally.add_line(&line);
        line.clear();
    }
}

fn stop(child: &mut Child) {
    // SIGTERM: the agent settles what it holds and flushes its sinks.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The ports the demo's agent serves on (and watches: `runtime`).
struct AgentPorts {
    runtime: u16,
    grpc: u16,
    http: u16,
    metrics: u16,
}

/// Starts the agent (`cmd`: the binary, with any settings of the caller's) watching the
/// runtime's port, receiving OTLP and serving metrics on loopback, writing the spans it exports
/// to `traces` and its log to `out/agent.log`; returns once it is ready.
fn start_agent(
    mut cmd: Command,
    ports: AgentPorts,
    traces: &Path,
    out: &Path,
) -> anyhow::Result<Child> {
    let log = out.join("agent.log");
    let agent_log = std::fs::File::create(&log).context("creating agent.log")?;
    let mut agent = cmd
        .args(["run", "--watch-port", &ports.runtime.to_string()])
        .env("INFERWATCH_OTLP__GRPC_PORT", ports.grpc.to_string())
        .env("INFERWATCH_OTLP__HTTP_PORT", ports.http.to_string())
        .env("INFERWATCH_PROMETHEUS__PORT", ports.metrics.to_string())
        .env("INFERWATCH_PROMETHEUS__BIND_ADDRESS", "\"127.0.0.1\"")
        .env("INFERWATCH_FILE__ENABLED", "true")
        .env("INFERWATCH_FILE__PATH", format!("\"{}\"", traces.display()))
        .stdout(Stdio::null())
        .stderr(agent_log)
        .spawn()
        .context("starting the agent")?;
    let start = Instant::now();
    while !ready(ports.metrics) {
        if let Ok(Some(status)) = agent.try_wait() {
            bail!("the agent exited ({status}); see {}", log.display());
        }
        if start.elapsed() > Duration::from_secs(20) {
            stop(&mut agent);
            bail!("the agent did not become ready; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(agent)
}

/// Scores the abort findings against the testbed's truth.
fn score(truth: &Path, client: &Path, tally: &Tally) -> String {
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let clients: BTreeMap<String, Value> = read(client)
        .into_iter()
        .filter_map(|c| Some((c.get("request_id")?.as_str()?.to_owned(), c)))
        .collect();
    let requests = read(truth);
    let known: Vec<(&str, &str)> = requests
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("request"))
        .filter_map(|r| {
            Some((
                r.get("request_id")?.as_str()?,
                r.get("runtime_request_id")?.as_str()?,
            ))
        })
        .collect();
    let (mut aborted, mut truth_tokens, mut found, mut found_tokens) = (0, 0, 0, 0);
    for r in requests
        .iter()
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some("request"))
    {
        let id = r.get("request_id").and_then(Value::as_str).unwrap_or("");
        let runtime_id = r
            .get("runtime_request_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let stop = r.get("stop_ns").and_then(Value::as_u64).unwrap_or(0);
        let Some(c) = clients.get(id) else { continue };
        let how = c.get("close").and_then(Value::as_str).unwrap_or("");
        let close = c
            .get("close_ns")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        if matches!(how, "fin" | "rst") && close < stop {
            aborted += 1;
            truth_tokens += r
                .get("tokens_after_abort")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if let Some(t) = tally
                .aborts
                .get(runtime_id)
                .or_else(|| tally.aborts.get(id))
            {
                found += 1;
                found_tokens += t;
            }
        }
    }
    let unfinished = tally
        .aborts
        .keys()
        .filter(|id| !known.iter().any(|(x, r)| x == id || r == id))
        .count();
    let mut out = format!(
        "ground truth: {aborted} requests aborted while the runtime was decoding, {truth_tokens} tokens generated after the client left; the agent found {found} of them and counted {found_tokens} tokens"
    );
    if unfinished > 0 {
        out.push_str(&format!(
            "\n  plus {unfinished} aborted request(s) the runtime was still decoding when the demo stopped it (no span, no truth record: counted from the kernel's writes)"
        ));
    }
    out
}

/// Whether a real NVIDIA driver is here: then the agent uses it, else the demo's fake GPU.
fn real_gpu() -> bool {
    Path::new("/dev/nvidiactl").exists()
}

pub fn task(scenario: &str, runtime: Runtime) -> anyhow::Result<()> {
    // The build's packages first (the same path as `cargo xtask setup --for demo`): installed
    // as root, named with their install command otherwise, before a build that would fail.
    let needs = match runtime {
        Runtime::Testbed => crate::setup::DEMO,
        Runtime::Vllm => crate::setup::DEMO_VLLM,
    };
    crate::setup::ensure(needs, "demo", &crate::setup::Host::current())?;
    if runtime == Runtime::Vllm {
        return vllm::task();
    }
    run(cargo().args([
        "build",
        "-p",
        "inferwatch",
        "-p",
        "inferwatch-testbed",
        "-p",
        "fake-nvml",
    ]))?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"));
    let out = target.join("demo");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let traces = out.join("traces.jsonl");
    let nvml_script = out.join("nvml.json");
    let _ = std::fs::remove_file(&nvml_script);
    let fake_gpu = !real_gpu();
    let truth = out.join("truth.jsonl");
    let client = out.join("client.jsonl");
    for f in [&traces, &truth, &client] {
        let _ = std::fs::remove_file(f);
    }
    let scenario_path = root()
        .join("tests/scenarios")
        .join(format!("{scenario}.toml"));
    if !scenario_path.exists() {
        bail!("no scenario {}", scenario_path.display());
    }
    if !is_root() {
        eprintln!(
            "note: not root, so the kernel (eBPF) source cannot load; the agent runs on the runtime's spans only (run it as root for the full picture: `sudo -E env \"PATH=$PATH\" cargo xtask demo`)"
        );
    }
    let (runtime_port, grpc, http, metrics) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let mut agent_cmd = Command::new(target.join("debug/inferwatch"));
    if fake_gpu {
        // The scripted libnvidia-ml that the testbed drives: the agent's real NVML code path,
        // with the runtime's memory ramp and the fine-tune job appearing on a fake H100.
        println!(
            "no NVIDIA driver here: the agent reads a fake GPU that follows the scenario ({})",
            nvml_script.display()
        );
        // An idle GPU until the testbed adds its processes (it keeps this GPU and start time).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let idle = serde_json::json!({
            "start_unix_ms": now_ms,
            "gpus": [{
                "uuid": "GPU-7e57bed0-0000-4000-8000-000000000001",
                "name": "Fake H100 80GB HBM3",
                "memory_total": 85_899_345_920u64,
                "memory_base": 268_435_456u64,
                "processes": []
            }]
        });
        std::fs::write(&nvml_script, idle.to_string())
            .with_context(|| format!("writing {}", nvml_script.display()))?;
        agent_cmd
            .env(
                "INFERWATCH_NVML__LIBRARY_PATH",
                format!("\"{}\"", target.join("debug/libnvidia_ml.so").display()),
            )
            .env("INFERWATCH_NVML__PERIOD_MS", "200")
            .env("FAKE_NVML_SCRIPT", &nvml_script);
    }
    let start = Instant::now();
    let mut agent = start_agent(
        agent_cmd,
        AgentPorts {
            runtime: runtime_port,
            grpc,
            http,
            metrics,
        },
        &traces,
        &out,
    )?;
    let mut testbed = Command::new(target.join("debug/iw-testbed"))
        .arg("run")
        .arg("--scenario")
        .arg(&scenario_path)
        .args(["--port", &runtime_port.to_string()])
        .arg("--truth")
        .arg(&truth)
        .arg("--client-truth")
        .arg(&client)
        .args(["--otlp-endpoint", &format!("http://127.0.0.1:{grpc}")])
        .args(if fake_gpu {
            vec![
                "--nvml-script".to_owned(),
                nvml_script.display().to_string(),
            ]
        } else {
            Vec::new()
        })
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the testbed")?;

    let live = std::io::stdout().is_terminal();
    let mut tally = Tally::default();
    let mut offset = 0u64;
    let mut shown_lines = 0usize;
    let mut testbed_done: Option<Instant> = None;
    loop {
        read_new(&traces, &mut offset, &mut tally);
        if live {
            let screen = tally.render(start.elapsed());
            // Redraw in place: move up over the previous frame and clear it.
            if shown_lines > 0 {
                print!("\x1b[{shown_lines}A\x1b[J");
            }
            print!("{screen}");
            shown_lines = screen.lines().count();
        } else {
            for line in tally.fresh.drain(..) {
                println!("{line}");
            }
        }
        let _ = std::io::stdout().flush();
        if testbed_done.is_none()
            && let Ok(Some(status)) = testbed.try_wait()
        {
            if !status.success() {
                stop(&mut agent);
                bail!("the testbed failed ({status})");
            }
            testbed_done = Some(Instant::now());
        }
        // A little after the traffic ends, so the last spans settle and are exported.
        if testbed_done.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(&mut agent);
    read_new(&traces, &mut offset, &mut tally);
    if live && shown_lines > 0 {
        print!("\x1b[{shown_lines}A\x1b[J");
    }
    println!("{}", tally.render(start.elapsed()));
    println!("{}", score(&truth, &client, &tally));
    println!(
        "traces: {} (OTLP JSON lines); agent log: {}",
        traces.display(),
        out.join("agent.log").display()
    );
    Ok(())
}
