//! `cargo xtask demo --runtime vllm`: the demo's shape against the real vLLM (the CPU build and
//! small model that `cargo xtask setup` installs under `target/real-vllm/`, installed here on
//! first use). The agent starts first, then vLLM (a cold start, with vLLM's own start-up
//! spans), then the `openai` client plays two tenants, some of whose streams are abandoned
//! mid-way, and a noisy tenant's long prompts through the small prefix cache. The table is the
//! testbed demo's; the ground truth comes from vLLM itself: its request log (aborts) and its
//! Prometheus counters (tokens generated, against the tokens the clients read).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{AgentPorts, Tally, free_port, read_new, start_agent, stop};
use crate::real_vllm;
use crate::util::{cargo, is_root, root, run};

/// The client plan: tenants `acme` and `globex` stream chat completions, every third stream
/// abandoned after a few chunks; tenant `noisy` sends long distinct prompts in between.
fn plan() -> Vec<Value> {
    (0..30)
        .map(|i| {
            if i % 5 == 4 {
                json!({"request_id": format!("demo-noisy-{i}"), "max_tokens": 4, "stream": false,
                       "words": 900, "seed": 100 + i, "headers": {"x-tenant-id": "noisy"}})
            } else {
                let tenant = if i % 2 == 0 { "acme" } else { "globex" };
                json!({"request_id": format!("demo-{tenant}-{i}"), "max_tokens": 60, "stream": true,
                       "words": 40, "seed": i % 3,
                       "abandon_after": if i % 3 == 0 { Some(4 + i % 7) } else { None },
                       "headers": {"x-tenant-id": tenant, "x-conversation-id": format!("c{}", i % 3)}})
            }
        })
        .collect()
}

pub fn task() -> anyhow::Result<()> {
    if real_vllm::skipped()? {
        bail!("INFERWATCH_SKIP_REAL_RUNTIME=1 is set: unset it to run the demo on the real vLLM");
    }
    eprintln!("[demo] the real vLLM (installed under target/real-vllm on first use)");
    let install = real_vllm::ensure()?;
    run(cargo().args(["build", "-p", "inferwatch"]))?;
    let target = root().join("target");
    let out = target.join("demo-vllm");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let traces = out.join("traces.jsonl");
    let clients = out.join("client.jsonl");
    for f in [&traces, &clients] {
        let _ = std::fs::remove_file(f);
    }
    if !is_root() {
        eprintln!(
            "note: not root, so the kernel (eBPF) source cannot load; the agent runs on the runtime's spans only"
        );
    }
    let (port, grpc, http, metrics, kv) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );
    let mut agent_cmd = Command::new(target.join("debug/inferwatch"));
    agent_cmd.env(
        "INFERWATCH_KV_EVENTS__ENDPOINTS",
        format!(r#"[{{endpoint = "tcp://127.0.0.1:{kv}", instance = "vllm"}}]"#),
    );
    let start = Instant::now();
    let mut agent = start_agent(
        agent_cmd,
        AgentPorts {
            runtime: port,
            grpc,
            http,
            metrics,
        },
        &traces,
        &out,
    )?;
    eprintln!(
        "[demo] starting vLLM cold (45-80 s on two cores); its log: target/demo-vllm/vllm.log"
    );
    let mut vllm = spawn_vllm(&install, port, grpc, kv, &out.join("vllm.log"))?;
    let result = play(&install, port, &out, &traces, &clients, &mut vllm, start);
    stop_group(&mut vllm);
    // SIGTERM: the agent settles what it still holds and flushes it to the file.
    stop(&mut agent);
    let (mut tally, mut offset, generated) = result?;
    read_new(&traces, &mut offset, &mut tally);
    let truth = ground_truth(&tally, &out, &clients, generated);
    println!("{}", tally.render(start.elapsed()));
    let startup: Vec<&str> = tally_startup(&traces);
    println!(
        "  vLLM start-up spans forwarded: {} ({})",
        startup.len(),
        startup.join(", ")
    );
    println!("{truth}");
    println!(
        "traces: {} (OTLP JSON lines); agent log: {}; vLLM log: {}",
        traces.display(),
        out.join("agent.log").display(),
        out.join("vllm.log").display()
    );
    Ok(())
}

/// Waits for vLLM, plays the clients, and returns the tally, how far it read the traces, and
/// the tokens vLLM generated meanwhile (its own counter).
fn play(
    install: &real_vllm::RealVllm,
    port: u16,
    out: &Path,
    traces: &Path,
    clients: &Path,
    vllm: &mut Child,
    start: Instant,
) -> anyhow::Result<(Tally, u64, f64)> {
    let mut tally = Tally::default();
    let mut offset = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !health(port) {
        if let Ok(Some(status)) = vllm.try_wait() {
            bail!(
                "vLLM exited ({status}); see {}",
                out.join("vllm.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "vLLM not ready after 300 s; see {}",
                out.join("vllm.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "[demo] vLLM ready after {:.1} s; the clients start",
        start.elapsed().as_secs_f64()
    );
    let generated_before = vllm_counter(port, "vllm:generation_tokens_total");
    let plan_path = out.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan())?)?;
    let python = install
        .vllm
        .parent()
        .map(|bin| bin.join("python"))
        .context("the real vLLM's venv")?;
    let mut client = Command::new(python)
        .arg(root().join("tests/real-vllm/client.py"))
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg(&plan_path)
        .arg(clients)
        .stdout(Stdio::null())
        .spawn()
        .context("starting the openai client")?;
    let live = std::io::stdout().is_terminal();
    let mut shown = 0usize;
    loop {
        read_new(traces, &mut offset, &mut tally);
        if live {
            let screen = tally.render(start.elapsed());
            if shown > 0 {
                print!("\x1b[{shown}A\x1b[J");
            }
            print!("{screen}");
            shown = screen.lines().count();
        } else {
            for line in tally.fresh.drain(..) {
                println!("{line}");
            }
        }
        let _ = std::io::stdout().flush();
        if let Some(status) = client.try_wait()? {
            if !status.success() {
                bail!("the openai client failed ({status})");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let the last spans arrive.
    std::thread::sleep(Duration::from_secs(3));
    if live && shown > 0 {
        print!("\x1b[{shown}A\x1b[J");
    }
    let generated = vllm_counter(port, "vllm:generation_tokens_total") - generated_before;
    Ok((tally, offset, generated))
}

/// The ground-truth line: what vLLM did (its request log, its token counter against what the
/// clients read) beside what the agent found.
fn ground_truth(tally: &Tally, out: &Path, clients: &Path, generated: f64) -> String {
    let records: Vec<Value> = std::fs::read_to_string(clients)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let read: u64 = records.iter().filter_map(|r| r["chunks"].as_u64()).sum();
    let abandoned: Vec<&str> = records
        .iter()
        .filter(|r| r["abandoned"].as_bool() == Some(true))
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let log = std::fs::read_to_string(out.join("vllm.log")).unwrap_or_default();
    let logged = abandoned
        .iter()
        .filter(|id| log.contains(&format!("Request chatcmpl-{id} aborted")))
        .count();
    let found: BTreeMap<&str, u64> = abandoned
        .iter()
        .filter_map(|id| {
            let t = tally
                .aborts
                .get(&format!("chatcmpl-{id}"))
                .or_else(|| tally.aborts.get(*id))?;
            Some((*id, *t))
        })
        .collect();
    format!(
        "ground truth (from vLLM): {} streams abandoned, {logged} of them logged as aborted by vLLM; vLLM generated {} tokens, {} of them never read by a client; the agent made {} abort findings on them, {} tokens after the client left",
        abandoned.len(),
        generated as u64,
        (generated as u64).saturating_sub(read),
        found.len(),
        found.values().sum::<u64>()
    )
}

/// The names of the vLLM start-up spans the agent forwarded.
fn tally_startup(traces: &Path) -> Vec<&'static str> {
    const PHASES: &[&str] = &[
        "Overall Loading",
        "EngineCoreProc init",
        "Executor init",
        "Load weights",
        "Allocate KV cache",
        "Warmup (CPU)",
    ];
    let text = std::fs::read_to_string(traces).unwrap_or_default();
    PHASES
        .iter()
        .copied()
        .filter(|p| text.contains(&format!("\"name\":\"{p}\"")))
        .collect()
}

/// `vllm serve` with the tier's settings (`tests/real-vllm/serve.json`), its own process group.
fn spawn_vllm(
    install: &real_vllm::RealVllm,
    port: u16,
    grpc: u16,
    kv: u16,
    log: &Path,
) -> anyhow::Result<Child> {
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/real-vllm/serve.json"))
            .context("reading tests/real-vllm/serve.json")?,
    )
    .context("parsing tests/real-vllm/serve.json")?;
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&install.vllm);
    cmd.arg("serve")
        .arg(&install.model)
        .args(strings(settings.get("args")))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--otlp-traces-endpoint",
            &format!("http://127.0.0.1:{grpc}"),
        ])
        .arg("--kv-events-config")
        .arg(format!(
            r#"{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:{kv}"}}"#
        ))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    if let Some(env) = settings.get("env").and_then(Value::as_object) {
        cmd.envs(
            env.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))),
        );
    }
    // SAFETY: setpgid touches only the child; its group is stopped as one.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    cmd.spawn().context("starting vllm serve")
}

/// SIGTERM to vLLM's process group (API server, EngineCore, workers), SIGKILL after 20 s.
fn stop_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: signals to the process group this task created.
    unsafe { libc::killpg(pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// One GET on loopback; the response's text.
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

fn health(port: u16) -> bool {
    get(port, "/health").is_some_and(|t| t.starts_with("HTTP/1.1 200"))
}

/// vLLM's own counter `name`, summed over its label sets.
fn vllm_counter(port: u16, name: &str) -> f64 {
    get(port, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
