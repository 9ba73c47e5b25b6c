//! Fault tests (issue 9): the agent under a backend outage, a runtime killed mid-request, a
//! runtime restarting on its port, a connection flood that overflows the ring buffer (the agent
//! frozen meanwhile), SIGTERM during load, missing capabilities, NVML calls failing at random
//! and tracefs absent (the agent in a private mount namespace). Each is bounded in time (about
//! 30 s) and uses loopback only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use inferwatch_testbed::truth::TruthRecord;

use crate::harness::{
    Agent, Collector, agent_bin, attr, fake_nvml_lib, free_port, kernel_tests_enabled, metric_sum,
    now_ns, reset_nvml_script, run_testbed, scratch, serial, testbed_bin, workspace,
};
use crate::peers::{
    Runtime, abort_is_found, http_status, open_stream, rst_close, wait_listening, wait_until,
    wait_until_async, write_config,
};

/// This process's resident set (the in-process agent's included), KiB.
fn rss_kib() -> u64 {
    rss_at("/proc/self/status")
}

/// The resident set of `pid`, KiB.
fn rss_of(pid: libc::pid_t) -> u64 {
    rss_at(&format!("/proc/{pid}/status"))
}

/// `VmRSS` from a /proc status file, KiB (0 when it cannot be read).
fn rss_at(status: &str) -> u64 {
    std::fs::read_to_string(status)
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

/// A flood listener on loopback, drained by blocking acceptor threads (one per core: the accept
/// queue must empty as fast as the clients fill it, or connects stall on SYN retransmits).
struct FloodTarget {
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    acceptors: Vec<std::thread::JoinHandle<()>>,
}

impl FloodTarget {
    fn bind() -> FloodTarget {
        let listener = Arc::new(std::net::TcpListener::bind("127.0.0.1:0").expect("bind flood"));
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let acceptors = (0..2)
            .map(|_| {
                let (listener, stop, accepted) = (
                    Arc::clone(&listener),
                    Arc::clone(&stop),
                    Arc::clone(&accepted),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((s, _)) = listener.accept() {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            drop(s);
                        }
                    }
                })
            })
            .collect();
        FloodTarget {
            port,
            stop,
            accepted,
            acceptors,
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Four client threads connect and reset as fast as they can, until `limit` passes or
    /// `max` connections were made; returns (connections, seconds).
    fn flood(&self, limit: Duration, max: usize) -> (usize, f64) {
        let port = self.port;
        let started = Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut n = 0usize;
                    while started.elapsed() < limit && n < max / 4 {
                        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                            rst_close(std::os::fd::AsRawFd::as_raw_fd(&s));
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let connections = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
        (connections, started.elapsed().as_secs_f64())
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocked acceptors so that they see the flag.
        for _ in &self.acceptors {
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        }
        for a in self.acceptors {
            let _ = a.join();
        }
    }
}

/// Every kernel record the agent accounted for: sent on, dropped in the agent (channel full,
/// undecodable, unknown type) or lost in the kernel (ring buffer full).
fn kernel_records_accounted(metrics: &str) -> f64 {
    metric_sum(
        metrics,
        "inferwatch_events_received_total",
        "source=\"kernel\"",
    ) + metric_sum(
        metrics,
        "inferwatch_events_dropped_total",
        "source=\"kernel\"",
    ) + metric_sum(metrics, "inferwatch_kernel_ringbuf_drops_total", "")
}

/// The state letter of `pid` (`T` when stopped), from /proc/<pid>/stat.
fn process_state(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses and may contain spaces.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The smallest ring buffer the loader makes: one page (the loader rounds any size up to a
/// power-of-two number of pages).
const SMALLEST_RING: u32 = 4096;

/// A connection flood against a watched port with the smallest ring buffer, in two rounds.
/// First at full speed with the agent running: every accepted connection is accounted for
/// (an event passed on, or a drop counted), lost or not. Then with the agent frozen
/// (SIGSTOP, as a CPU-throttled pod is): its reader cannot drain the ring, so the flood
/// overflows it whatever rate this machine reaches; after SIGCONT the drops are counted, the
/// agent finds the next abort, and its memory stayed bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_overflows_ring_buffer() {
    if !kernel_tests_enabled("connection_flood_overflows_ring_buffer") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("flood");
    let collector = Collector::default();
    let backend = collector.start().await;
    let (port, grpc, metrics_port) = (free_port(), free_port(), free_port());
    let target = FloodTarget::bind();
    let config = binary_config(
        &dir,
        &[port, target.port],
        grpc,
        metrics_port,
        backend,
        &format!("ring_buffer_bytes = {SMALLEST_RING}\n"),
    );
    let mut agent = agent_command(&config, &dir)
        .spawn()
        .expect("start inferwatch");
    let pid = agent.id().expect("agent pid") as libc::pid_t;
    wait_listening(grpc).await;
    let otlp: SocketAddr = format!("127.0.0.1:{grpc}").parse().expect("addr");
    let runtime = Runtime::serve(port, otlp, &dir).await;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let scrape = || crate::harness::scrape(metrics_addr);
    // Waits until the agent accounted for `at_least` records and its count stopped moving
    // (the counters reach the metrics once a second), at most 15 s; returns the last scrape.
    let settle = |at_least: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = -1.0;
        loop {
            let text = crate::harness::scrape(metrics_addr).await;
            let now = kernel_records_accounted(&text);
            if (now >= at_least && now == last) || Instant::now() > deadline {
                return text;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
    };

    // Round 1: the agent running.
    let before = kernel_records_accounted(&scrape().await);
    let accepted0 = target.accepted();
    let (fast, fast_s) =
        tokio::task::block_in_place(|| target.flood(Duration::from_secs(3), 100_000));
    let fast_accepted = target.accepted() - accepted0;
    let text = settle(before + fast_accepted as f64).await;
    let fast_accounted = kernel_records_accounted(&text) - before;
    let fast_drops = metric_sum(&text, "inferwatch_kernel_ringbuf_drops_total", "");
    let rss_before = rss_of(pid);

    // Round 2: the agent frozen.
    let before = kernel_records_accounted(&text);
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = wait_until(Duration::from_secs(5), || process_state(pid) == Some('T')).await;
    let accepted1 = target.accepted();
    let (frozen, frozen_s) =
        tokio::task::block_in_place(|| target.flood(Duration::from_secs(10), 3_000));
    // Until the acceptors caught up with the last connects.
    wait_until(Duration::from_secs(5), || {
        target.accepted() - accepted1 >= frozen as u64
    })
    .await;
    let frozen_accepted = target.accepted() - accepted1;
    let still_stopped = process_state(pid) == Some('T');
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let text = settle(before + frozen_accepted as f64).await;
    let frozen_accounted = kernel_records_accounted(&text) - before;
    let drops = metric_sum(&text, "inferwatch_kernel_ringbuf_drops_total", "");
    let frozen_drops = drops - fast_drops;

    let found = abort_is_found(&collector, port, "after-flood").await;
    let rss_after = rss_of(pid);
    runtime.stop(libc::SIGTERM).await;
    target.stop();
    let status = terminate(&mut agent).await;
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    eprintln!(
        "connection_flood: running: {fast} connections in {fast_s:.1} s ({:.0}/s), {fast_accepted} \
         accepted, {fast_accounted} records accounted, ring-buffer drops {fast_drops}; frozen: \
         {frozen} connections in {frozen_s:.1} s ({:.0}/s), {frozen_accepted} accepted, \
         {frozen_accounted} records accounted, ring-buffer drops {frozen_drops}; RSS {rss_before} \
         -> {rss_after} KiB; abort after the flood found: {found}",
        fast as f64 / fast_s,
        frozen as f64 / frozen_s,
    );
    assert!(
        fast_accounted >= fast_accepted as f64,
        "every connection of the running flood is accounted for (an event or a drop): \
         {fast_accounted} records for {fast_accepted} connections"
    );
    assert!(
        stopped && still_stopped,
        "the agent was frozen during the flood"
    );
    assert!(
        frozen_accepted >= 2_000,
        "the frozen flood ran: {frozen_accepted}"
    );
    assert!(
        frozen_drops > 0.0,
        "a frozen reader overflows the ring buffer and the drops are counted:\n{text}"
    );
    assert!(
        frozen_accounted >= frozen_accepted as f64,
        "every connection of the frozen flood is accounted for: {frozen_accounted} records for \
         {frozen_accepted} connections"
    );
    assert!(
        found,
        "the agent still finds an abort after the flood:\n{log}"
    );
    // Generous: a ring of one page and bounded queues; anything near this is a leak.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(status.success(), "exit 0 on SIGTERM: {status}\n{log}");
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
    let mut agent = agent_command(&config, &dir)
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

/// Replaces the fake NVML's script with `doc`, atomically (the fake may read it at any time).
fn write_nvml_script(path: &Path, doc: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).expect("write NVML script");
    std::fs::rename(&tmp, path).expect("replace NVML script");
}

/// NVML calls failing at random (seeded): about 30% of the utilisation, process-list and
/// process-utilisation calls fail with assorted NVML errors while the testbed plays the GPU
/// contention scenario. The agent stays up and ready, counts the failed calls, keeps sampling
/// (the per-GPU gauge moves, samples keep arriving) and still names the hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvml_calls_failing_at_random() {
    if !kernel_tests_enabled("nvml_calls_failing_at_random") {
        return;
    }
    let _one_at_a_time = serial().await;
    let lib = fake_nvml_lib();
    testbed_bin();
    let dir = scratch("nvml-random");
    let script = reset_nvml_script();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&script).expect("read script"))
            .expect("script is JSON");
    doc["seed"] = serde_json::json!(2024);
    // Two errors on one call fire with p1 + (1 - p1) p2: 0.15 + 0.85 x 0.18 = 0.3.
    // Not `NotFound` (6) on the process utilisation: that one means "no new sample".
    doc["gpus"][0]["errors"] = serde_json::json!([
        {"call": "utilization", "code": 999, "probability": 0.15},
        {"call": "utilization", "code": 15, "probability": 0.18},
        {"call": "processes", "code": 10, "probability": 0.15},
        {"call": "processes", "code": 2, "probability": 0.18},
        {"call": "process_utilization", "code": 3, "probability": 0.15},
        {"call": "process_utilization", "code": 17, "probability": 0.18},
    ]);
    write_nvml_script(&script, &doc);
    let gpu = doc["gpus"][0]["uuid"]
        .as_str()
        .expect("the script names its GPU")
        .to_owned();

    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = Agent::start_with(port, backend, |config| {
        config.nvml.library_path = Some(lib);
        config.nvml.period_ms = 200;
        // Close a contention interval 2 s after its last contended request, during the run.
        config.correlator.gpu.interval_close_ms = 2_000;
    })
    .await;
    let metrics_port = agent.metrics.port();

    let play = {
        let otlp = agent.otlp_grpc;
        let script = script.to_string_lossy().into_owned();
        let dir = dir.clone();
        tokio::spawn(async move {
            run_testbed(
                "gpu-contention.toml",
                port,
                otlp,
                &["--nvml-script", &script],
                &dir,
            )
            .await
        })
    };
    // While it plays: ready all along, and the GPU's SM gauge as the agent serves it.
    let gauge = "inferwatch_gpu_sm_utilization_percent";
    let gpu_label = format!("gpu=\"{gpu}\"");
    let mut sm_values: Vec<i64> = Vec::new();
    let mut not_ready: Vec<String> = Vec::new();
    let mut scrapes = 0;
    let first_samples = metric_sum(
        &agent.scrape().await,
        "inferwatch_events_received_total",
        "source=\"nvml\"",
    );
    while !play.is_finished() {
        let status = http_status(metrics_port, "/readyz").await;
        if !status.contains("200") {
            not_ready.push(status);
        }
        let text = agent.scrape().await;
        scrapes += 1;
        if text
            .lines()
            .any(|l| l.starts_with(gauge) && l.contains(&gpu_label))
        {
            sm_values.push(metric_sum(&text, gauge, &gpu_label) as i64);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let truth = play.await.expect("testbed task");
    let hog = truth
        .server
        .iter()
        .find_map(|r| match r {
            TruthRecord::Contention(c) if c.factor > 1.0 => c.neighbour_pid,
            _ => None,
        })
        .expect("the scenario ran a real hog");
    let named = |spans: &[crate::harness::Received]| {
        spans.iter().any(|s| {
            s.span.name == "inferwatch.gpu_contention"
                && attr(&s.span, "inferwatch.noisy_neighbour.pid") == Some(hog.to_string())
        })
    };
    let found = wait_until(Duration::from_secs(15), || named(&collector.spans())).await;
    let metrics = agent.scrape().await;
    let ready_after = http_status(metrics_port, "/readyz").await;
    agent.stop().await;

    let errors = metric_sum(
        &metrics,
        "inferwatch_events_dropped_total",
        "reason=\"call_error\"",
    );
    let samples = metric_sum(
        &metrics,
        "inferwatch_events_received_total",
        "source=\"nvml\"",
    );
    let mut distinct = sm_values.clone();
    distinct.sort_unstable();
    distinct.dedup();
    eprintln!(
        "nvml_calls_failing_at_random: {samples} samples, {errors} NVML call errors counted \
         ({:.2} per sample); {scrapes} scrapes while playing, SM gauge values {distinct:?}; \
         hog pid {hog} named: {found}",
        errors / samples.max(1.0)
    );
    assert!(
        not_ready.is_empty(),
        "/readyz answered 200 throughout: {not_ready:?}"
    );
    assert!(ready_after.contains("200"), "still ready: {ready_after}");
    // Three calls at 30% per poll (a process call may fail on its size query or its fill):
    // about one failure per sample; at most three.
    assert!(
        errors >= 0.3 * samples && errors <= 3.0 * samples,
        "NVML call errors counted: {errors} for {samples} samples:\n{metrics}"
    );
    assert!(
        samples > first_samples + 20.0,
        "samples kept flowing: {first_samples} then {samples}"
    );
    assert!(
        distinct.len() >= 2,
        "the per-GPU SM gauge moved while the scenario played: {sm_values:?}"
    );
    assert!(found, "the contention finding names the hog (pid {hog})");
}

/// The tracefs mounts (mount points) that `pid` sees, from its mountinfo.
fn tracefs_mounts(pid: libc::pid_t) -> Vec<String> {
    let path = if pid == 0 {
        "/proc/self/mountinfo".to_owned()
    } else {
        format!("/proc/{pid}/mountinfo")
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("tracefs "))
        })
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

/// The mount namespace of `pid`.
fn mount_ns(pid: libc::pid_t) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Runs the child in a mount namespace of its own (private, so nothing propagates back to the
/// host) from which tracefs is unmounted: at /sys/kernel/tracing, and debugfs with the tracefs
/// it automounts under /sys/kernel/debug/tracing. The host's mounts are not touched.
fn without_tracefs(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls
    // (async-signal-safe) on static C strings.
    unsafe {
        command.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for path in [
                c"/sys/kernel/debug/tracing",
                c"/sys/kernel/tracing",
                c"/sys/kernel/debug",
            ] {
                // Mounts may be stacked; EINVAL once nothing is mounted there.
                for _ in 0..8 {
                    if libc::umount2(path.as_ptr(), libc::MNT_DETACH) != 0 {
                        break;
                    }
                }
            }
            Ok(())
        });
    }
}

/// The agent binary with `config`, its log in `dir/agent.log`, without tracefs.
fn spawn_agent_without_tracefs(config: &Path, dir: &Path) -> tokio::process::Child {
    let mut command = agent_command(config, dir);
    without_tracefs(&mut command);
    command.spawn().expect("start inferwatch without tracefs")
}

/// `inferwatch run -c config`, logging at info to `dir/agent.log`, killed when dropped.
fn agent_command(config: &Path, dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(agent_bin());
    command
        .arg("run")
        .arg("-c")
        .arg(config)
        .env("INFERWATCH_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("log file"))
        .kill_on_drop(true);
    command
}

/// SIGTERM, then the exit status (at most 10 s).
async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .expect("wait for the agent")
}

/// The config of a binary run watching `ports`, exporting to `backend`, with no NVML library.
fn binary_config(
    dir: &Path,
    ports: &[u16],
    grpc: u16,
    metrics: u16,
    backend: SocketAddr,
    kernel_extra: &str,
) -> PathBuf {
    write_config(
        dir,
        &format!(
            "[kernel]\nwatch_ports = {ports:?}\n{kernel_extra}[otlp]\ngrpc_port = {grpc}\n\
             http_port = {}\n[prometheus]\nport = {metrics}\n[export]\nendpoint = \
             \"http://{backend}\"\n[nvml]\nlibrary_path = \"/nonexistent/libnvidia-ml.so.1\"\n",
            free_port()
        ),
    )
}

/// tracefs absent: the kernel source needs none (raw tracepoints and a cgroup program), so it
/// works without mounting anything: it sees the watched port's traffic and an abort is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracefs_absent_kernel_source_works() {
    if !kernel_tests_enabled("tracefs_absent_kernel_source_works") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("tracefs-absent");
    let host_tracefs = tracefs_mounts(0);
    let collector = Collector::default();
    let backend = collector.start().await;
    let (port, grpc, metrics_port) = (free_port(), free_port(), free_port());
    let config = binary_config(&dir, &[port], grpc, metrics_port, backend, "");
    let mut agent = spawn_agent_without_tracefs(&config, &dir);
    let pid = agent.id().expect("agent pid") as libc::pid_t;
    wait_listening(grpc).await;
    let own_ns = mount_ns(pid) != mount_ns(std::process::id() as libc::pid_t);
    let agent_tracefs = tracefs_mounts(pid);
    let otlp: SocketAddr = format!("127.0.0.1:{grpc}").parse().expect("addr");
    let runtime = Runtime::serve(port, otlp, &dir).await;
    let found = abort_is_found(&collector, port, "tracefs-absent").await;
    let agent_tracefs_after = tracefs_mounts(pid);
    // The kernel counters reach the metrics once a second.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let mut kernel_events = 0.0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while kernel_events == 0.0 && Instant::now() < deadline {
        kernel_events = metric_sum(
            &crate::harness::scrape(metrics_addr).await,
            "inferwatch_events_received_total",
            "source=\"kernel\"",
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runtime.stop(libc::SIGTERM).await;
    let status = terminate(&mut agent).await;
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    eprintln!(
        "tracefs_absent: host tracefs {host_tracefs:?}, the agent's {agent_tracefs:?} at start, \
         {agent_tracefs_after:?} after; kernel events {kernel_events}; abort found {found}; exit \
         {status}"
    );
    assert!(own_ns, "the agent ran in a mount namespace of its own");
    assert!(
        agent_tracefs.is_empty() && agent_tracefs_after.is_empty(),
        "no tracefs in the agent's namespace, none mounted: {agent_tracefs:?}, \
         {agent_tracefs_after:?}"
    );
    assert!(
        !log.contains("kernel source unavailable"),
        "the kernel source started:\n{log}"
    );
    assert!(kernel_events > 0.0, "kernel events received");
    assert!(found, "an abort is found through the kernel source:\n{log}");
    assert!(status.success(), "exit 0 on SIGTERM: {status}\n{log}");
    assert_eq!(
        tracefs_mounts(0),
        host_tracefs,
        "the host's tracefs untouched"
    );
}
