//! Billed-after-abort with the official `openai` Python client as the streaming client: the
//! test abandons some streams the way user code does (break out of the loop, close the
//! stream), and the agent must find exactly those requests.

use std::collections::HashMap;
use std::path::PathBuf;

use inferwatch_testbed::truth::{RequestTruth, TruthRecord, read_jsonl};

use crate::abort_truth::AbortTruth;
use crate::harness::{
    Agent, Collector, attr, free_port, kernel_tests_enabled, scratch, serial, testbed_bin,
    workspace,
};

fn python() -> PathBuf {
    let p = std::env::var_os("INFERWATCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "Python with the `openai` package not found at {}: run `cargo xtask setup` or set INFERWATCH_PYTHON",
        p.display()
    );
    p
}

#[derive(serde::Deserialize)]
struct PyClient {
    request_id: String,
    abandoned: bool,
    chunks: u64,
    close_ns: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_abandoning_streams() {
    if !kernel_tests_enabled("openai_python_client_abandoning_streams") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("openai");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start(port, backend).await;

    let truth_path = dir.join("truth.jsonl");
    let mut runtime = tokio::process::Command::new(testbed_bin())
        .args(["serve", "--port", &port.to_string(), "--policy", "never"])
        .arg("--truth")
        .arg(&truth_path)
        .args(["--otlp-endpoint", &format!("http://{}", agent.otlp_grpc)])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start iw-testbed serve");
    // Wait until it listens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "testbed did not listen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let out = dir.join("python.jsonl");
    let status = tokio::process::Command::new(python())
        .arg(workspace().join("tests/python/openai_abort_client.py"))
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("30")
        .arg(&out)
        .status()
        .await
        .expect("run the openai client");
    assert!(status.success(), "openai client failed: {status}");
    let clients: Vec<PyClient> = read_jsonl(&out).expect("client records");
    assert_eq!(clients.len(), 30);

    // Let the runtime finish decoding the abandoned streams (policy `never`), then stop it so
    // it flushes its truth and spans.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    if let Some(pid) = runtime.id() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let _ = runtime.wait().await;
    let truth: Vec<TruthRecord> = read_jsonl(&truth_path).expect("truth");
    let requests: HashMap<String, RequestTruth> = truth
        .into_iter()
        .filter_map(|r| match r {
            TruthRecord::Request(r) => Some((r.request_id.clone(), r)),
            _ => None,
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    agent.stop().await;

    let findings: HashMap<String, _> = collector
        .spans()
        .into_iter()
        .filter(|s| s.span.name == "inferwatch.abort")
        .map(|s| (hex::encode(&s.span.trace_id), s))
        .collect();
    let mut found = 0;
    for c in &clients {
        let r = requests
            .get(&c.request_id)
            .unwrap_or_else(|| panic!("no truth for {}", c.request_id));
        let finding = findings.get(&r.trace_id);
        let early = c.abandoned && c.close_ns < r.stop_ns;
        assert_eq!(
            early,
            finding.is_some(),
            "{}: abandoned {} (after {} chunks), finding {:?}",
            c.request_id,
            c.abandoned,
            c.chunks,
            finding.map(|f| &f.span.attributes)
        );
        if let Some(f) = finding {
            found += 1;
            let after: u64 = attr(&f.span, "inferwatch.abort.tokens_after")
                .and_then(|v| v.parse().ok())
                .expect("tokens_after");
            let method = attr(&f.span, "inferwatch.abort.method").expect("method");
            if let Err(e) =
                AbortTruth::of(r, c.abandoned, c.close_ns).check_tokens_after(&method, after)
            {
                panic!("{}: {e}", c.request_id);
            }
            assert_eq!(attr(&f.span, "tenant.id").as_deref(), Some("python"));
        }
    }
    println!(
        "\n== openai python client: 30 streams, {} abandoned, {found} findings",
        clients.iter().filter(|c| c.abandoned).count()
    );
    assert_eq!(found, 10, "every third of 30 streams is abandoned");
}
