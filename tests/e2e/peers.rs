//! The peers the e2e tests drive around the agent: a testbed runtime, raw streaming clients,
//! HTTP probes of the agent's endpoints, and readers of its metrics text.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Collector, attr, now_ns, testbed_bin};

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

/// As [`wait_until`], with an async condition.
pub async fn wait_until_async<F, Fut>(limit: Duration, mut f: F) -> bool
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
/// billed-after-abort case) on `port`, exporting its spans to `otlp`; killed when dropped.
pub struct Runtime {
    child: tokio::process::Child,
}

impl Runtime {
    pub async fn serve(port: u16, otlp: SocketAddr, dir: &Path) -> Runtime {
        Self::serve_with(port, otlp, dir, &[]).await
    }

    /// As [`Runtime::serve`], with more `iw-testbed serve` arguments (`--drain`).
    pub async fn serve_with(port: u16, otlp: SocketAddr, dir: &Path, extra: &[&str]) -> Runtime {
        let child = tokio::process::Command::new(testbed_bin())
            .args(["serve", "--port", &port.to_string(), "--policy", "never"])
            .args(extra)
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

    /// Waits at most `limit` for the process to exit by itself; its status, if it did.
    pub async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Sends `signal` and waits for the process to exit.
    pub async fn stop(mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.pid(), signal) };
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Opens a streaming chat completion on `port` with `x-request-id: id` plus `extra_headers`
/// (each `name: value\r\n`) and `content` as the prompt, asking for 120 tokens; returns once
/// `chunks` SSE chunks came.
pub async fn open_stream(
    port: u16,
    id: &str,
    extra_headers: &str,
    content: &str,
    chunks: usize,
) -> TcpStream {
    open_stream_of(port, id, extra_headers, content, 120, chunks).await
}

/// As [`open_stream`], asking for `max_tokens`.
pub async fn open_stream_of(
    port: u16,
    id: &str,
    extra_headers: &str,
    content: &str,
    max_tokens: u32,
    chunks: usize,
) -> TcpStream {
    open_stream_read(port, id, extra_headers, content, max_tokens, chunks)
        .await
        .0
}

/// As [`open_stream_of`], also returning the bytes read so far.
pub async fn open_stream_read(
    port: u16,
    id: &str,
    extra_headers: &str,
    content: &str,
    max_tokens: u32,
    chunks: usize,
) -> (TcpStream, Vec<u8>) {
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
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
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("first chunks within 15 s");
    (stream, seen)
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

/// The agent's config file for a run of the binary.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("inferwatch.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

/// `GET path` on loopback `port`; the status line, or "" when nothing answers.
pub async fn http_status(port: u16, path: &str) -> String {
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
