//! Fault tests (issue 9): the agent under a backend outage, a runtime killed mid-request, a
//! runtime restarting on its port, a connection flood that overflows the ring buffer, and
//! SIGTERM during load. Each is bounded in time (about 30 s) and uses loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    Agent, Collector, agent_bin, attr, free_port, kernel_tests_enabled, now_ns, scratch, serial,
    testbed_bin, workspace,
};

/// Polls `f` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts on `127.0.0.1:port` (at most 60 s: a loaded 2-core CI box
/// can take a while to start a debug binary and load its programs).
pub async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `iw-testbed serve` (policy `never`: the runtime decodes on after the client leaves, the
/// billed-after-abort case) on `port`, exporting its spans to `otlp`.
pub struct Runtime {
    child: tokio::process::Child,
}

impl Runtime {
    pub async fn serve(port: u16, otlp: SocketAddr, dir: &Path) -> Runtime {
        let child = tokio::process::Command::new(testbed_bin())
            .args(["serve", "--port", &port.to_string(), "--policy", "never"])
            .arg("--truth")
            .arg(dir.join(format!("truth-{}.jsonl", now_ns())))
            .args(["--otlp-endpoint", &format!("http://{otlp}")])
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start iw-testbed serve");
        wait_listening(port).await;
        Runtime { child }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id().expect("runtime running") as libc::pid_t
    }

    /// Sends `signal` and waits for the process to exit.
    pub async fn stop(mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.pid(), signal) };
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Opens a streaming chat completion on `port` with `x-request-id: id` plus `extra_headers`
/// (each `name: value\r\n`) and `content` as the prompt; returns once `chunks` SSE chunks came.
pub async fn open_stream(
    port: u16,
    id: &str,
    extra_headers: &str,
    content: &str,
    chunks: usize,
) -> TcpStream {
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 120,
        "stream": true,
    })
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nx-request-id: {id}\r\n\
         x-tenant-id: acme\r\n{extra_headers}content-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect runtime");
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while count(&seen, b"data:") < chunks {
            let n = stream.read(&mut buf).await.expect("read stream");
            assert!(n > 0, "runtime closed the stream early");
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("first chunks within 10 s");
    stream
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Closes with a RST (SO_LINGER 0), the way a client that gives up abruptly does; also keeps
/// floods from filling the port range with TIME_WAIT.
pub fn rst_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Aborts one stream by RST on `port` and waits (at most 15 s) for its abort finding.
pub async fn abort_is_found(collector: &Collector, port: u16, id: &str) -> bool {
    let stream = open_stream(port, id, "", "hello there", 3).await;
    let std = stream.into_std().expect("into std");
    rst_close(std::os::fd::AsRawFd::as_raw_fd(&std));
    drop(std);
    wait_until(Duration::from_secs(15), || {
        collector.spans().iter().any(|s| {
            s.span.name == "inferwatch.abort"
                && attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with(id))
        })
    })
    .await
}

/// The value of every sample of `metric` (a Prometheus text exposition), summed; `filter` must
/// appear in the sample's line.
pub fn metric_sum(text: &str, metric: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric)
                && matches!(l.as_bytes().get(metric.len()), Some(b'{' | b' '))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// This process's resident set (the in-process agent's included), KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A collector that can be stopped and started again on the same address.
async fn serve_collector(collector: &Collector, addr: SocketAddr) -> CancellationToken {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let listener = {
        // The old listener's socket may linger briefly after the stop.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let token = CancellationToken::new();
    let stop = token.clone();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    });
    token
}

/// Backend down for a while, then back: the exporter's queue fills and drops are counted, the
/// export resumes when the backend returns, and memory stays bounded meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_then_back() {
    if !kernel_tests_enabled("backend_down_then_back") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("backend-down");
    let collector = Collector::default();
    let backend: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let up = serve_collector(&collector, backend).await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        // A small queue so that a few seconds of outage overflow it.
        config.export.queue_max_spans = 64;
        config.export.retry_max_ms = 500;
    })
    .await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    assert!(
        abort_is_found(&collector, port, "before-outage").await,
        "export works before the outage"
    );
    let rss_before = rss_kib();

    up.cancel();
    // Requests during the outage: each yields a runtime span (forwarded) and an abort finding.
    let outage = Instant::now();
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(6) && i < 400 {
        let s = open_stream(port, &format!("outage-{i}"), "", "hi", 1).await;
        let std = s.into_std().expect("into std");
        rst_close(std::os::fd::AsRawFd::as_raw_fd(&std));
        drop(std);
        i += 1;
    }
    let metrics_down = agent.scrape().await;
    let dropped = metric_sum(&metrics_down, "inferwatch_spans_dropped_total", "");
    let errors = metric_sum(&metrics_down, "inferwatch_export_errors_total", "");
    let rss_down = rss_kib();

    let _up_again = serve_collector(&collector, backend).await;
    let back = agent_found_after(&collector, port).await;
    let metrics = agent.scrape().await;
    runtime.stop(libc::SIGTERM).await;
    agent.stop().await;
    let rss_after = rss_kib();
    eprintln!(
        "backend_down_then_back: {i} aborted requests during a 6 s outage; spans dropped {dropped}, \
         export errors {errors}; RSS before {rss_before} KiB, during {rss_down} KiB, after \
         {rss_after} KiB; exported after recovery: {back}"
    );
    assert!(
        dropped > 0.0,
        "drops counted during the outage:\n{metrics_down}"
    );
    assert!(errors > 0.0, "export errors counted during the outage");
    assert!(back, "export resumes after the backend returns");
    assert!(
        metric_sum(&metrics, "inferwatch_spans_exported_total", "") > 0.0,
        "exported spans counted"
    );
    // Generous: the queue is bounded at 64 spans; anything near this bound is a leak.
    assert!(
        rss_down < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_down} KiB during the outage"
    );
}

async fn agent_found_after(collector: &Collector, port: u16) -> bool {
    abort_is_found(collector, port, "after-outage").await
}

/// The runtime killed (SIGKILL) with streams open: the agent keeps running and sees the resets,
/// and requests to the restarted runtime are joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_killed_mid_request() {
    if !kernel_tests_enabled("runtime_killed_mid_request") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("runtime-killed");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start(port, backend).await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let mut open = Vec::new();
    for i in 0..8 {
        open.push(open_stream(port, &format!("killed-{i}"), "", "hello", 1).await);
    }
    runtime.stop(libc::SIGKILL).await;
    // The streams see the kernel's close of the dead process's sockets.
    for mut s in open {
        let mut buf = [0u8; 4096];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the stream ends when the runtime dies");
    }
    // The agent outlived the runtime: its endpoint still answers.
    let metrics = agent.scrape().await;
    assert!(
        metrics.starts_with("HTTP/1.1 200"),
        "the agent still serves metrics"
    );
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let found = abort_is_found(&collector, port, "after-restart").await;
    let joined = collector.spans().iter().any(|s| {
        s.span.name == "llm_request"
            && attr(&s.span, "gen_ai.request.id").is_some_and(|r| r.ends_with("after-restart"))
            && attr(&s.span, "inferwatch.join").is_some_and(|j| j != "unjoined")
    });
    runtime.stop(libc::SIGTERM).await;
    agent.stop().await;
    assert!(found, "an abort on the restarted runtime is found");
    assert!(joined, "the restarted runtime's request is joined");
}

/// A connection flood on loopback with a 64 KiB ring buffer: the buffer overflows, the drops are
/// counted and exported, and afterwards the agent still finds an abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_overflows_ring_buffer() {
    if !kernel_tests_enabled("connection_flood_overflows_ring_buffer") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("flood");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let flood_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind flood");
    let flood_port = flood_listener.local_addr().expect("addr").port();
    let agent = Agent::start_with(port, backend, |config| {
        config.kernel.watch_ports = vec![port, flood_port];
        config.kernel.ring_buffer_bytes = 64 * 1024;
    })
    .await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;

    const SECONDS: f64 = 3.0;
    const MAX_CONNECTIONS: usize = 200_000;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Blocking acceptors (two, one per core): the accept queue must drain as fast as the
    // clients fill it, or connects stall on SYN retransmits.
    let flood_listener = std::sync::Arc::new(flood_listener);
    let acceptors: Vec<_> = (0..2)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            let listener = std::sync::Arc::clone(&flood_listener);
            std::thread::spawn(move || {
                let mut accepted = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((s, _)) = listener.accept() {
                        accepted += 1;
                        drop(s);
                    }
                }
                accepted
            })
        })
        .collect();
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0usize;
                while started.elapsed().as_secs_f64() < SECONDS && n < MAX_CONNECTIONS / 4 {
                    if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", flood_port)) {
                        rst_close(std::os::fd::AsRawFd::as_raw_fd(&s));
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let connections: usize = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Wake the blocked acceptors so that they see the flag.
    for _ in 0..2 {
        let _ = std::net::TcpStream::connect(("127.0.0.1", flood_port));
    }
    let accepted: u64 = acceptors.into_iter().map(|a| a.join().unwrap_or(0)).sum();
    // The counters are copied into the metrics once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = agent.scrape().await;
    let drops = metric_sum(&metrics, "inferwatch_kernel_ringbuf_drops_total", "");
    let found = abort_is_found(&collector, port, "after-flood").await;
    runtime.stop(libc::SIGTERM).await;
    agent.stop().await;
    eprintln!(
        "connection_flood: {connections} connections in {elapsed:.1} s ({:.0}/s), {accepted} \
         accepted; ring-buffer drops {drops}",
        connections as f64 / elapsed
    );
    let rate = connections as f64 / elapsed;
    // The overflow needs a flood the poller cannot follow; a loaded 2-core box reaches only a
    // few thousand connections/s in a debug build, which a 64 KiB buffer absorbs.
    if rate >= 20_000.0 {
        assert!(drops > 0.0, "ring-buffer drops counted and exported");
    } else {
        eprintln!(
            "\n*** connection_flood: only {rate:.0} connections/s here; the overflow is NOT \
             exercised (drops {drops}) ***\n"
        );
    }
    assert!(found, "the agent still finds an abort after the flood");
}

/// The watched server restarting on the same port: connections after the restart are tracked
/// (a new Listen, heads joined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_on_same_port() {
    if !kernel_tests_enabled("server_restarts_on_same_port") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("restart");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start(port, backend).await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let first = abort_is_found(&collector, port, "first-life").await;
    runtime.stop(libc::SIGTERM).await;
    let runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let second = abort_is_found(&collector, port, "second-life").await;
    runtime.stop(libc::SIGTERM).await;
    agent.stop().await;
    assert!(first, "found before the restart");
    assert!(second, "found after the restart on the same port");
}

/// The agent's config file for a run of the binary.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("inferwatch.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

/// The ids of the BPF programs loaded now (`bpftool prog show`); `None` without bpftool.
fn iw_programs() -> Option<Vec<u64>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .ok()?;
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        progs
            .iter()
            .filter(|p| {
                p.get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| n.starts_with("iw_"))
            })
            .filter_map(|p| p.get("id")?.as_u64())
            .collect(),
    )
}

/// The BPF program ids `pid` holds open (`prog_id:` in /proc/<pid>/fdinfo): the agent's own
/// programs, told apart from other agents' on a shared machine.
fn program_ids(pid: libc::pid_t) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// SIGTERM during load: the `inferwatch` binary exits 0 within 5 s, everything it found is at
/// the collector (the findings in flight were flushed), and its programs are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_flushes_and_exits_zero() {
    if !kernel_tests_enabled("sigterm_during_load_flushes_and_exits_zero") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("sigterm");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let grpc = free_port();
    let config = write_config(
        &dir,
        &format!(
            "[kernel]\nwatch_ports = [{port}]\n[otlp]\ngrpc_port = {grpc}\nhttp_port = {}\n\
             [prometheus]\nport = {}\n[export]\nendpoint = \"http://{backend}\"\n",
            free_port(),
            free_port()
        ),
    );
    let log = std::fs::File::create(dir.join("agent.log")).expect("log file");
    let mut agent = tokio::process::Command::new(agent_bin())
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env("INFERWATCH_LOG", "info")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start inferwatch");
    let agent_pid = agent.id().expect("agent pid") as libc::pid_t;
    wait_listening(grpc).await;
    let otlp: SocketAddr = format!("127.0.0.1:{grpc}").parse().expect("addr");

    // Load: the e2e abort scenario (about 30 requests/s, a third aborted) for 10 s.
    let mut load = tokio::process::Command::new(testbed_bin())
        .arg("run")
        .arg("--scenario")
        .arg(workspace().join("tests/scenarios/e2e-abort.toml"))
        .args(["--port", &port.to_string(), "--policy", "never"])
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .expect("start the load");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ours = program_ids(agent_pid);

    let term_at = now_ns();
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the agent exits within 10 s of SIGTERM")
        .expect("wait for the agent");
    let exit_s = t0.elapsed().as_secs_f64();
    let _ = load.kill().await;
    // The kernel frees a program after its last reference goes, and for raw tracepoint links
    // that happens after an RCU grace period, a moment after the process is gone: poll.
    let mut left: Vec<u64> = Vec::new();
    for _ in 0..50 {
        left = match iw_programs() {
            Some(now) => ours.iter().copied().filter(|id| now.contains(id)).collect(),
            None => {
                eprintln!("sigterm: bpftool not available; program detach not checked");
                Vec::new()
            }
        };
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let received = collector.spans();
    let after_term = received.iter().filter(|s| s.at >= term_at).count();
    let last_s = received
        .iter()
        .map(|s| s.at.saturating_sub(term_at) as f64 / 1e9)
        .fold(0.0, f64::max);
    let exported_findings = received
        .iter()
        .filter(|s| s.span.name == "inferwatch.abort")
        .count();
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let logged_findings = log
        .lines()
        .filter(|l| l.contains("tokens billed after the client left"))
        .count();
    eprintln!(
        "sigterm: exit {status} after {exit_s:.2} s; {} spans received, {after_term} after \
         SIGTERM, last {last_s:.2} s after it; abort findings logged {logged_findings}, \
         exported {exported_findings}",
        received.len()
    );
    assert!(status.success(), "exit code 0 after SIGTERM; log:\n{log}");
    assert!(
        exit_s < 5.0,
        "exits within 5 s of SIGTERM (took {exit_s:.2})"
    );
    assert!(last_s < 5.0, "everything flushed within 5 s of SIGTERM");
    assert!(
        logged_findings > 0,
        "the load produced findings; log:\n{log}"
    );
    assert_eq!(
        exported_findings, logged_findings,
        "every finding the agent made reached the collector"
    );
    assert!(after_term > 0, "spans in flight at SIGTERM were flushed");
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert!(
        !ours.is_empty(),
        "the agent held BPF programs before SIGTERM"
    );
    assert!(
        left.is_empty(),
        "programs still loaded after exit: {left:?}"
    );
}

/// `setpriv` arguments that drop every capability (bounding, inheritable and ambient sets)
/// while staying uid 0, so that file permissions do not get in the way: what is left is
/// exactly "root without capabilities".
const NO_CAPS: [&str; 4] = [
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--",
];

/// `GET path` on loopback `port`; the status line, or "" when nothing answers.
async fn http_status(port: u16, path: &str) -> String {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut out)).await;
    out.lines().next().unwrap_or("").to_owned()
}

/// Missing capabilities: `check` names CAP_BPF and CAP_PERFMON as missing; `run` without them
/// logs the kernel source's failure once and keeps running on the OTLP receiver (`/readyz`
/// answers 200, the process is still alive after 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_capabilities_run_on_what_can() {
    if !kernel_tests_enabled("missing_capabilities_run_on_what_can") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("nocaps");
    let metrics_port = free_port();
    let config = write_config(
        &dir,
        &format!(
            "[kernel]\nwatch_ports = [{}]\n[otlp]\ngrpc_port = {}\nhttp_port = {}\n\
             [prometheus]\nport = {metrics_port}\n[nvml]\nlibrary_path = \"/nonexistent/libnvidia-ml.so.1\"\n",
            free_port(),
            free_port(),
            free_port()
        ),
    );
    let check = tokio::process::Command::new("setpriv")
        .args(NO_CAPS)
        .arg(agent_bin())
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .await
        .expect("setpriv inferwatch check");
    let check_out = String::from_utf8_lossy(&check.stdout).into_owned();

    let mut run = tokio::process::Command::new("setpriv")
        .args(NO_CAPS)
        .arg(agent_bin())
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv inferwatch run");
    let ready = wait_until_async(Duration::from_secs(10), || async {
        http_status(metrics_port, "/readyz").await.contains("200")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still_running = run.try_wait().expect("try_wait").is_none();
    if let Some(pid) = run.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    let status = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("exits on SIGTERM")
        .expect("wait");
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();

    assert!(
        check_out.contains("missing CAP_BPF and CAP_PERFMON"),
        "check names the missing capabilities:\n{check_out}"
    );
    assert!(ready, "run serves /readyz without capabilities:\n{log}");
    assert!(still_running, "run keeps running:\n{log}");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{log}");
    assert_eq!(
        log.matches("kernel source unavailable").count(),
        1,
        "one clear line for the kernel source:\n{log}"
    );
}

/// Nothing can run: no capabilities (no kernel source), no NVML library, and both OTLP ports
/// already taken: `run` exits non-zero at once with one error naming every source's cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_can_run_exits_non_zero() {
    if !kernel_tests_enabled("nothing_can_run_exits_non_zero") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("nothing-runs");
    // Held for the whole test: the agent's receiver cannot bind them.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = write_config(
        &dir,
        &format!(
            "[kernel]\nwatch_ports = [{}]\n[otlp]\ngrpc_port = {}\nhttp_port = {}\n\
             [prometheus]\nport = {}\n[nvml]\nlibrary_path = \"/nonexistent/libnvidia-ml.so.1\"\n",
            free_port(),
            grpc.local_addr().expect("addr").port(),
            http.local_addr().expect("addr").port(),
            free_port()
        ),
    );
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("setpriv")
            .args(NO_CAPS)
            .arg(agent_bin())
            .args(["run", "-c"])
            .arg(&config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exits within 20 s")
    .expect("setpriv inferwatch run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    drop((grpc, http));
    assert!(!out.status.success(), "non-zero exit:\n{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("inferwatch: "))
        .unwrap_or_default();
    assert!(
        error.contains("no source could start")
            && error.contains("kernel:")
            && error.contains("OTLP receiver:")
            && error.contains("NVML:"),
        "one error naming every source:\n{stderr}"
    );
}

/// As [`wait_until`], with an async condition.
async fn wait_until_async<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
