//! Requests lost in flight (contract §3.5, issue 25): the testbed runtime is killed with
//! SIGKILL, drained with SIGTERM, and OOM-killed by the kernel (a memory cgroup at its limit)
//! while 8 streams are mid-response. Truth: the test's own clients, which know which streams
//! the runtime cut and which it finished.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::harness::{
    Agent, Collector, Received, attr, free_port, kernel_tests_enabled, now_ns, scratch, serial,
};
use crate::peers::{Runtime, open_stream_of, open_stream_read, wait_until};

const STREAMS: usize = 8;

/// Reads a stream to its end; whether it ended with the stream terminator (`[DONE]`).
async fn read_to_end(s: TcpStream) -> bool {
    read_all(s, Vec::new()).await.0
}

/// Reads a stream to its end after `seen`: whether it ended with the stream terminator
/// (`[DONE]`), and the output tokens the client received (chunks whose delta has text; the
/// testbed writes one token per chunk).
async fn read_all(mut s: TcpStream, mut seen: Vec<u8>) -> (bool, u64) {
    let mut buf = [0u8; 8192];
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if seen.windows(6).any(|w| w == b"[DONE]") {
                return true;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or(false);
    let count = |needle: &[u8]| seen.windows(needle.len()).filter(|w| *w == needle).count();
    let tokens = count(b"\"content\":\"") - count(b"\"content\":\"\"");
    (done, tokens as u64)
}

fn lost_findings(spans: &[Received]) -> Vec<&Received> {
    spans
        .iter()
        .filter(|r| r.span.name == "inferwatch.lost_in_flight")
        .collect()
}

/// The agent with a short `span_wait_ms`: a lost request is reported that long after the close.
async fn agent(port: u16, backend: SocketAddr) -> Agent {
    Agent::start_with(port, backend, |c| c.correlator.span_wait_ms = 3_000).await
}

/// Opens the 8 streams, runs `cut` on the runtime's pid, and checks one finding per stream
/// with `cause` (and `signal` when set); returns the findings' ran_ms for the figures.
async fn cut_streams(name: &str, cause: &str, signal: Option<i64>, cut: impl FnOnce(u32)) {
    let dir = scratch(name);
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = agent(port, backend).await;
    let mut runtime = Runtime::serve(port, agent.otlp_grpc, &dir).await;
    let pid = runtime.pid() as u32;
    let ids: Vec<String> = (0..STREAMS).map(|i| format!("{name}-{i}")).collect();
    let mut open = Vec::new();
    for id in &ids {
        open.push(open_stream_read(port, id, "", "tell me a long story", 4000, 2).await);
    }
    cut(pid);
    runtime.wait(Duration::from_secs(20)).await;
    let mut cut_short = 0;
    // Truth: the tokens each client received before the runtime went away.
    let mut received = std::collections::HashMap::new();
    for (id, (s, seen)) in ids.iter().zip(open) {
        let (done, tokens) = read_all(s, seen).await;
        if !done {
            cut_short += 1;
        }
        received.insert(id.clone(), tokens);
    }
    assert_eq!(cut_short, STREAMS, "every stream was cut mid-response");
    let complete = wait_until(Duration::from_secs(30), || {
        lost_findings(&collector.spans()).len() >= STREAMS
    })
    .await;
    // A little longer: a duplicate or an extra finding would come in the same settle pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = collector.spans();
    let metrics = agent.scrape().await;
    agent.stop().await;
    let found = lost_findings(&spans);
    assert!(complete, "{} of {STREAMS} lost requests found", found.len());
    assert_eq!(found.len(), STREAMS, "one finding per request");
    let mut found_ids: Vec<String> = found
        .iter()
        .filter_map(|r| attr(&r.span, "gen_ai.request.id"))
        .collect();
    found_ids.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(found_ids, want, "the findings name the cut requests");
    for r in &found {
        assert_eq!(
            attr(&r.span, "inferwatch.lost.cause").as_deref(),
            Some(cause)
        );
        assert_eq!(
            attr(&r.span, "process.pid").as_deref(),
            Some(pid.to_string().as_str())
        );
        if let Some(signal) = signal {
            assert_eq!(
                attr(&r.span, "inferwatch.lost.signal").as_deref(),
                Some(signal.to_string().as_str())
            );
        }
        let ran_ms: f64 = attr(&r.span, "inferwatch.lost.ran_ms")
            .and_then(|v| v.parse().ok())
            .expect("ran_ms");
        assert!(ran_ms > 0.0, "the request had run");
        // The runtime's sends while the client was there, less its response head: what the
        // client received (the kernel delivers what was sent before the close's FIN).
        let id = attr(&r.span, "gen_ai.request.id").unwrap_or_default();
        let delivered: Option<u64> =
            attr(&r.span, "inferwatch.lost.tokens_delivered").and_then(|v| v.parse().ok());
        assert_eq!(delivered, received.get(&id).copied(), "{name}: {id}");
    }
    let counted = metrics
        .lines()
        .filter(|l| {
            l.starts_with("inferwatch_lost_in_flight_total{")
                && l.contains(&format!("cause=\"{cause}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert_eq!(
        counted, STREAMS as f64,
        "inferwatch_lost_in_flight_total{{cause={cause}}}"
    );
    eprintln!(
        "{name}: {STREAMS} streams cut, {} lost requests found, cause {cause}; tokens the \
         clients received {:?}",
        found.len(),
        received.values().collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_response_loses_every_stream() {
    if !kernel_tests_enabled("sigkill_mid_response_loses_every_stream") {
        return;
    }
    let _one_at_a_time = serial().await;
    cut_streams("lost-sigkill", "signal", Some(9), |pid| {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    })
    .await;
}

/// The memory cgroup (v2, or v1's memory hierarchy) this process is in, as a directory.
fn own_memory_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v1 = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| PathBuf::from(format!("/sys/fs/cgroup/memory{path}")))
    });
    let v2 = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|path| PathBuf::from(format!("/sys/fs/cgroup{path}")))
        .filter(|p| {
            p.join("memory.max").exists() || Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        });
    v1.filter(|p| p.is_dir()).or(v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_mid_response_loses_every_stream() {
    if !kernel_tests_enabled("oom_kill_mid_response_loses_every_stream") {
        return;
    }
    let _one_at_a_time = serial().await;
    let parent = own_memory_cgroup().expect("a memory cgroup to make a child in");
    let cg = parent.join(format!("iw-oom-{}", now_ns()));
    std::fs::create_dir(&cg).unwrap_or_else(|e| panic!("creating {}: {e}", cg.display()));
    let limit_file = if cg.join("memory.limit_in_bytes").exists() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    let cg_for_cut = cg.clone();
    let hog = std::sync::Arc::new(std::sync::Mutex::new(None));
    let hog_handle = hog.clone();
    cut_streams("lost-oom", "oom_kill", Some(9), move |pid| {
        // The runtime goes into a cgroup with 64 MiB of room above what it uses, and is the
        // OOM killer's choice there (oom_score_adj 1000); a hog then fills the cgroup.
        std::fs::write(cg_for_cut.join("cgroup.procs"), pid.to_string()).expect("move runtime");
        std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000").expect("oom_score_adj");
        let usage_file = if limit_file == "memory.max" {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        let usage: u64 = std::fs::read_to_string(cg_for_cut.join(usage_file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        std::fs::write(cg_for_cut.join(limit_file), (usage + (64 << 20)).to_string())
            .expect("set the limit");
        let procs = cg_for_cut.join("cgroup.procs");
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import os, time\nopen({:?}, 'w').write(str(os.getpid()))\nheld = []\nfor _ in range(64):\n    held.append(bytearray(8 << 20))\n    time.sleep(0.02)\ntime.sleep(30)\n",
                procs.display().to_string()
            ))
            .spawn()
            .expect("start the hog");
        *hog_handle.lock().expect("hog") = Some(child);
    })
    .await;
    if let Some(mut child) = hog.lock().expect("hog").take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir(&cg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_drain_loses_nothing() {
    if !kernel_tests_enabled("sigterm_with_a_drain_loses_nothing") {
        return;
    }
    let _one_at_a_time = serial().await;
    let dir = scratch("lost-drain");
    let collector = Collector::default();
    let backend = collector.start().await;
    let port = free_port();
    let agent = agent(port, backend).await;
    let mut runtime = Runtime::serve_with(port, agent.otlp_grpc, &dir, &["--drain"]).await;
    let pid = runtime.pid();
    let ids: Vec<String> = (0..STREAMS).map(|i| format!("drained-{i}")).collect();
    let mut open = Vec::new();
    for id in &ids {
        open.push(open_stream_of(port, id, "", "tell me a long story", 300, 2).await);
    }
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut finished = 0;
    for s in open {
        if read_to_end(s).await {
            finished += 1;
        }
    }
    let exited = runtime.wait(Duration::from_secs(30)).await;
    assert_eq!(finished, STREAMS, "the drain finished every stream");
    assert!(
        exited.is_some_and(|s| s.success()),
        "the drained runtime exits 0"
    );
    // Every request's span came and joined; then, past span_wait_ms, still no loss.
    let joined = wait_until(Duration::from_secs(20), || {
        let spans = collector.spans();
        ids.iter().all(|id| {
            spans.iter().any(|r| {
                r.span.name == "llm_request"
                    && attr(&r.span, "gen_ai.request.id").is_some_and(|v| v.ends_with(id.as_str()))
                    && attr(&r.span, "inferwatch.join").is_some_and(|j| j != "unjoined")
            })
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let spans = collector.spans();
    agent.stop().await;
    assert!(joined, "the drained requests' spans joined");
    let lost = lost_findings(&spans);
    assert!(
        lost.is_empty(),
        "a graceful drain loses nothing: {:?}",
        lost.iter()
            .map(|r| attr(&r.span, "gen_ai.request.id"))
            .collect::<Vec<_>>()
    );
    eprintln!("lost-drain: {STREAMS} streams drained, 0 lost requests found");
}
