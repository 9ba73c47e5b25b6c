//! Security tests (issue 9): no header outside the allow-list and no body byte reaches any export
//! (spans at the collector, the file sink, the metrics text, the agent's log), and the
//! receiver's bearer token through the whole agent.

use std::net::SocketAddr;
use std::time::Duration;

use crate::faults::{
    Runtime, metric_sum, open_stream, rst_close, wait_listening, wait_until, write_config,
};
use crate::harness::{
    Agent, Collector, agent_bin, attr, free_port, kernel_tests_enabled, scratch, serial,
};

const SECRETS: [&str; 4] = [
    "sk-planted-secret-",
    "planted-cookie-",
    "planted-unknown-",
    "planted-body-",
];

/// Requests that carry a bearer token, a cookie, an unknown header and a secret in the JSON
/// body; half abort (so findings quote their heads), half run to the end. None of the planted
/// values may appear in anything the agent writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_reach_no_export() {
    if !kernel_tests_enabled("planted_secrets_reach_no_export") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("secrets");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let grpc = free_port();
    let metrics_port = free_port();
    let spans_file = dir.join("spans.jsonl");
    let config = write_config(
        &dir,
        &format!(
            "[kernel]\nwatch_ports = [{port}]\n[otlp]\ngrpc_port = {grpc}\nhttp_port = {}\n\
             [prometheus]\nport = {metrics_port}\n[export]\nendpoint = \"http://{backend}\"\n\
             [file]\nenabled = true\npath = \"{}\"\n",
            free_port(),
            spans_file.display()
        ),
    );
    let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
    let mut agent = tokio::process::Command::new(agent_bin())
        .arg("run")
        .arg("-c")
        .arg(&config)
        // The most verbose level: a secret that leaks into any log line shows here.
        .env("INFERWATCH_LOG", "trace")
        .stdout(std::fs::File::create(dir.join("agent.stdout")).expect("stdout file"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start inferwatch");
    wait_listening(grpc).await;
    let otlp: SocketAddr = format!("127.0.0.1:{grpc}").parse().expect("addr");
    let runtime = Runtime::serve(port, otlp, &dir).await;

    const N: usize = 10;
    for i in 0..N {
        let headers = format!(
            "authorization: Bearer sk-planted-secret-{i}\r\ncookie: session=planted-cookie-{i}\r\n\
             x-planted: planted-unknown-{i}\r\n"
        );
        let content = format!("tell me planted-body-{i} please");
        let chunks = if i % 2 == 0 { 2 } else { 1 };
        let stream = open_stream(port, &format!("sec-{i}"), &headers, &content, chunks).await;
        if i % 2 == 0 {
            let std = stream.into_std().expect("into std");
            rst_close(std::os::fd::AsRawFd::as_raw_fd(&std));
        } else {
            // Read to the end of the stream: a completed request.
            let mut stream = stream;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf),
            )
            .await;
        }
    }
    let findings = wait_until(Duration::from_secs(15), || {
        collector
            .spans()
            .iter()
            .filter(|s| s.span.name == "inferwatch.abort")
            .count()
            >= N / 2
    })
    .await;
    let scrape = {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .expect("connect metrics");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("scrape");
        let mut out = String::new();
        stream.read_to_string(&mut out).await.expect("read metrics");
        out
    };
    runtime.stop(libc::SIGTERM).await;
    if let Some(pid) = agent.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;

    let received = collector.spans();
    let spans_text = format!("{:?}", received.iter().map(|r| &r.span).collect::<Vec<_>>());
    let exports = [
        ("collector spans", spans_text),
        (
            "file sink",
            std::fs::read_to_string(&spans_file).unwrap_or_default(),
        ),
        ("metrics", scrape.clone()),
        (
            "agent log",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default(),
        ),
        (
            "agent stdout",
            std::fs::read_to_string(dir.join("agent.stdout")).unwrap_or_default(),
        ),
    ];
    for (name, text) in &exports {
        eprintln!("planted_secrets: {name}: {} bytes", text.len());
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret}* leaked into the {name}");
        }
    }
    // The grep saw real output: the findings and the allow-listed ids are there.
    assert!(findings, "the aborted requests were found");
    assert!(
        received
            .iter()
            .any(|s| attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with("sec-0"))),
        "the allow-listed request id is exported"
    );
    assert!(
        exports[1].1.contains("sec-0"),
        "the file sink has the spans"
    );
    assert!(
        scrape.contains("inferwatch_aborts"),
        "the metrics were scraped"
    );
}

/// The receiver's bearer token through the whole agent: a runtime without the token is refused
/// (counted as `unauthenticated`, nothing forwarded), one with it is served and joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_through_the_agent() {
    if !kernel_tests_enabled("bearer_token_through_the_agent") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("bearer");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        config.otlp.bearer_token = Some("tok-e2e".into());
    })
    .await;

    // Without the token.
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let stream = open_stream(port, "no-token", "", "hi", 1).await;
    drop(stream);
    // Let the runtime finish the request and export its span (refused) before it stops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    runtime.stop(libc::SIGTERM).await;
    let metrics = agent.scrape().await;
    let unauthenticated = metric_sum(
        &metrics,
        "inferwatch_otlp_requests_rejected_total",
        "unauthenticated",
    );

    // With it (the OpenTelemetry SDK's standard header variable).
    let child = tokio::process::Command::new(crate::harness::testbed_bin())
        .args(["serve", "--port", &port.to_string(), "--policy", "never"])
        .args(["--otlp-endpoint", &format!("http://{}", agent.otlp_grpc)])
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20tok-e2e",
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start iw-testbed serve");
    wait_listening(port).await;
    let found = crate::faults::abort_is_found(&collector, port, "with-token").await;
    drop(child);
    agent.stop().await;
    let forwarded_without = collector.spans().iter().any(|s| {
        // Only the runtime's own span; a kernel-only abort finding may name the request.
        s.span.name == "llm_request"
            && attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with("no-token"))
    });
    assert!(unauthenticated > 0.0, "refusals counted:\n{metrics}");
    assert!(
        !forwarded_without,
        "spans without the token are not forwarded"
    );
    assert!(found, "with the token the runtime's spans are joined");
}
