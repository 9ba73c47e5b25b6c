//! Kernel integration tests: the agent's own load functions against the real kernel.
//!
//! A small HTTP/1.1 server on loopback streams a chunked, SSE-style response (one write per
//! chunk, a few ms apart); clients complete normally, close mid-stream (FIN), reset mid-stream
//! (SO_LINGER 0: RST), send two requests on one keep-alive connection, and talk to an unwatched
//! port. The test asserts the events the kernel source reports for each, over IPv4 (server
//! using recv/send) and IPv6 (server using read/write).
//!
//! Needs root (CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN, cgroup v2). Without it each test prints a loud SKIPPED line
//! and passes, unless `INFERWATCH_REQUIRE_KERNEL_TESTS=1` (set by `cargo xtask test`), where it
//! fails.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use inferwatch::internal_events::AgentMetrics;
use inferwatch::model::{CloseHow, ConnId, KernelEvent, KernelEventKind};
use inferwatch::sources::channel::source_channel;
use inferwatch::sources::kernel::{KernelConfig, KernelSource, batch_capacity};
use tokio_util::sync::CancellationToken;

const CHUNKS: usize = 20;
const CHUNK_GAP: Duration = Duration::from_millis(4);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn kernel_tests_enabled(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("INFERWATCH_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1") {
        panic!(
            "{name}: kernel tests are required (INFERWATCH_REQUIRE_KERNEL_TESTS=1) but not running as root"
        );
    }
    eprintln!(
        "\n*** SKIPPED {name}: kernel tests need root (CAP_BPF, CAP_PERFMON); run `sudo cargo xtask test` ***\n"
    );
    false
}

/// How the test server does its socket I/O: std's recv/send, or read/write on the raw fd
/// (uvicorn / uvloop style).
#[derive(Clone, Copy, Debug)]
enum Io {
    RecvSend,
    ReadWrite,
}

fn sys_read(stream: &mut TcpStream, io: Io, buf: &mut [u8]) -> std::io::Result<usize> {
    match io {
        Io::RecvSend => stream.read(buf),
        Io::ReadWrite => {
            // SAFETY: buf is a valid writable buffer of buf.len() bytes; the fd is open.
            let n = unsafe { libc::read(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }
    }
}

fn sys_write(stream: &mut TcpStream, io: Io, buf: &[u8]) -> std::io::Result<usize> {
    match io {
        Io::RecvSend => stream.write(buf),
        Io::ReadWrite => {
            // SAFETY: buf is a valid readable buffer; the fd is open.
            let n = unsafe { libc::write(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }
    }
}

/// Blocks until the peer has shut down its side (FIN or RST), at most 2 s.
fn wait_peer_gone(stream: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
    n == 1
}

/// The response header the server writes first.
const RESPONSE_HEADER: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
/// The terminating chunk of a complete response.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The `i`th chunk of a response, as written.
fn chunk(i: usize) -> String {
    let data = format!("data: {{\"token\": {i}}}\n\n");
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// Bytes of a response up to (not including) chunk `n`.
fn response_bytes(n: usize) -> u32 {
    let chunks: usize = (0..n).map(|i| chunk(i).len()).sum();
    (RESPONSE_HEADER.len() + chunks) as u32
}

/// What the server did per request id: how many writes it attempted after it saw the peer go.
type ServerLog = Arc<Mutex<HashMap<String, usize>>>;

/// Serves one connection: requests until EOF. `GET /stream?close_after=K` makes the server
/// write K chunks, then wait until the client has gone, then keep writing until a write fails,
/// logging how many writes it attempted after the peer left.
fn serve_conn(mut stream: TcpStream, io: Io, log: ServerLog) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match sys_read(&mut stream, io, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        let Some(line) = head.lines().next() else {
            return;
        };
        let target = line.split(' ').nth(1).unwrap_or("/");
        let request_id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or("-")
            .to_string();
        let close_after: Option<usize> = target
            .split_once("close_after=")
            .and_then(|(_, v)| v.parse().ok());
        let mut after_gone = 0usize;
        let mut peer_gone = false;
        // `GET /stream?before_header`: the client leaves before the first response byte (a
        // non-streaming request that timed out); the whole response is then written after.
        if target.ends_with("before_header") {
            peer_gone = wait_peer_gone(&stream);
            assert!(peer_gone, "client of {request_id} did not go away");
            after_gone += 1;
        }
        if sys_write(&mut stream, io, RESPONSE_HEADER.as_bytes()).is_err() {
            log.lock().expect("log lock").insert(request_id, after_gone);
            return;
        }
        for i in 0..CHUNKS {
            if close_after == Some(i) {
                peer_gone = wait_peer_gone(&stream);
                assert!(peer_gone, "client of {request_id} did not go away");
            }
            if peer_gone {
                after_gone += 1;
            }
            if sys_write(&mut stream, io, chunk(i).as_bytes()).is_err() {
                break;
            }
            thread::sleep(CHUNK_GAP);
        }
        log.lock().expect("log lock").insert(request_id, after_gone);
        if peer_gone {
            return;
        }
        if sys_write(&mut stream, io, LAST_CHUNK).is_err() {
            return;
        }
    }
}

fn spawn_server(listener: TcpListener, io: Io, log: ServerLog) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let log = Arc::clone(&log);
            thread::spawn(move || serve_conn(stream, io, log));
        }
    });
}

fn request(id: &str, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer sk-must-not-leak\r\n\
         x-request-id: {id}\r\ntraceparent: {TRACEPARENT}\r\nx-tenant-id: tenant-a\r\n\r\n"
    )
}

/// SO_LINGER with a zero timeout: close() then sends RST instead of FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_LINGER): {}",
        std::io::Error::last_os_error()
    );
}

/// Reads one whole chunked response (until the terminating chunk).
fn read_response(stream: &mut TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "server closed early");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads until `chunks` `data:` lines have arrived.
fn read_chunks(stream: &mut TcpStream, chunks: usize) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(5).filter(|w| w == b"data:").count() < chunks {
        let n = stream.read(&mut buf).expect("read chunks");
        assert!(n > 0, "server closed early");
        got.extend_from_slice(&buf[..n]);
    }
}

struct Capture {
    events: Arc<Mutex<Vec<KernelEvent>>>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Runtime,
}

fn start_capture(ports: Vec<u16>) -> Capture {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let config = KernelConfig {
        watch_ports: ports,
        ..KernelConfig::default()
    };
    let source = runtime
        .block_on(async { KernelSource::build(&config) })
        .unwrap_or_else(|e| panic!("loading the kernel source: {e:#?}"));
    let (tx, mut rx) = source_channel("kernel", batch_capacity(65_536), &AgentMetrics::default());
    let shutdown = CancellationToken::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    runtime.spawn(source.run(tx, shutdown.clone()));
    let sink = Arc::clone(&events);
    runtime.spawn(async move {
        while let Some(batch) = rx.recv().await {
            sink.lock().expect("events lock").extend(batch);
        }
    });
    Capture {
        events,
        shutdown,
        runtime,
    }
}

impl Capture {
    /// Waits until `done` holds for the captured events, at most 5 s.
    fn wait_for(&self, what: &str, done: impl Fn(&[KernelEvent]) -> bool) -> Vec<KernelEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.events.lock().expect("events lock").clone();
            if done(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {events:#?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) {
        self.shutdown.cancel();
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

/// The connection whose Accepted event has this client (peer) address.
fn conn_of(events: &[KernelEvent], client: SocketAddr) -> Option<(usize, ConnId)> {
    events.iter().enumerate().find_map(|(i, e)| match &e.kind {
        KernelEventKind::Accepted { conn, peer, .. } if *peer == client => Some((i, *conn)),
        _ => None,
    })
}

/// The events of one connection's lifetime, in time order: from its Accepted to the next
/// Accepted of the same key. The kernel reuses `struct sock` addresses, so one `ConnId` can name
/// several connections over time; and a write that the peer's RST overtakes (loopback delivers
/// in the same call chain) reaches the ring after Closed, stamped with its start time.
fn lifetime_of(events: &[KernelEvent], client: SocketAddr) -> Vec<KernelEvent> {
    let start = events
        .iter()
        .position(|e| matches!(&e.kind, KernelEventKind::Accepted { peer, .. } if *peer == client))
        .unwrap_or_else(|| panic!("no Accepted for {client}"));
    let conn = events[start].kind.conn();
    let mut out = vec![events[start].clone()];
    for e in events[start + 1..].iter().filter(|e| e.kind.conn() == conn) {
        if matches!(e.kind, KernelEventKind::Accepted { .. }) {
            break;
        }
        out.push(e.clone());
    }
    out.sort_by_key(|e| e.ts);
    out
}

/// A compact name per event, to compare sequences.
fn shape(e: &KernelEvent) -> String {
    match &e.kind {
        KernelEventKind::Listen { .. } => "listen".into(),
        KernelEventKind::Accepted { .. } => "accepted".into(),
        KernelEventKind::Refused { .. } => "refused".into(),
        KernelEventKind::RequestHead { head, .. } => {
            format!("head:{}", head.request_id.as_deref().unwrap_or("?"))
        }
        KernelEventKind::PeerClosed { how, .. } => format!("peer_closed:{}", how.as_str()),
        KernelEventKind::WriteAfterPeerClose { .. } => "write_after".into(),
        KernelEventKind::ResponseId { id, .. } => {
            format!("response_id:{}", id.as_deref().unwrap_or("-"))
        }
        KernelEventKind::LocalClosed { .. } => "local_closed".into(),
        KernelEventKind::Closed { .. } => "closed".into(),
        KernelEventKind::ProcessExit { .. } => "process_exit".into(),
        KernelEventKind::OomVictim => "oom_victim".into(),
    }
}

/// The send sequences of a lifetime's first head and the peer's close.
fn head_and_close_seqs(evs: &[KernelEvent]) -> (u32, u32) {
    let at_head = evs.iter().find_map(|e| match e.kind {
        KernelEventKind::RequestHead { send_seq, .. } => send_seq,
        _ => None,
    });
    let at_close = evs.iter().find_map(|e| match e.kind {
        KernelEventKind::PeerClosed { send_seq, .. } => send_seq,
        _ => None,
    });
    match (at_head, at_close) {
        (Some(h), Some(c)) => (h, c),
        _ => panic!("no head and close with send sequences: {evs:#?}"),
    }
}

/// Whether the connection accepted at `events[start]` has closed.
fn closed(events: &[KernelEvent], (start, conn): (usize, ConnId)) -> bool {
    events[start..]
        .iter()
        .any(|e| matches!(e.kind, KernelEventKind::Closed { conn: c } if c == conn))
}

fn lifecycle(loopback: &str, io: Io) {
    let watched = TcpListener::bind(format!("{loopback}:0")).expect("bind watched");
    let unwatched = TcpListener::bind(format!("{loopback}:0")).expect("bind unwatched");
    let watched_addr = watched.local_addr().expect("addr");
    let unwatched_addr = unwatched.local_addr().expect("addr");

    let capture = start_capture(vec![watched_addr.port()]);
    let log: ServerLog = Arc::default();
    spawn_server(watched, io, Arc::clone(&log));
    spawn_server(unwatched, io, Arc::clone(&log));

    // 1. Completes normally.
    let mut complete = TcpStream::connect(watched_addr).expect("connect");
    let complete_addr = complete.local_addr().expect("addr");
    complete
        .write_all(request("complete-1", "/stream").as_bytes())
        .expect("send");
    read_response(&mut complete);
    drop(complete);

    // 2. Leaves mid-stream with FIN.
    let mut fin = TcpStream::connect(watched_addr).expect("connect");
    let fin_addr = fin.local_addr().expect("addr");
    fin.write_all(request("fin-1", "/stream?close_after=3").as_bytes())
        .expect("send");
    read_chunks(&mut fin, 3);
    fin.shutdown(Shutdown::Both).expect("shutdown");
    drop(fin);

    // 3. Leaves mid-stream with RST (SO_LINGER 0).
    let mut rst = TcpStream::connect(watched_addr).expect("connect");
    let rst_addr = rst.local_addr().expect("addr");
    rst.write_all(request("rst-1", "/stream?close_after=3").as_bytes())
        .expect("send");
    read_chunks(&mut rst, 3);
    set_linger_zero(&rst);
    drop(rst);

    // 4. Two requests on one keep-alive connection.
    let mut ka = TcpStream::connect(watched_addr).expect("connect");
    let ka_addr = ka.local_addr().expect("addr");
    ka.write_all(request("ka-1", "/stream").as_bytes())
        .expect("send");
    read_response(&mut ka);
    ka.write_all(request("ka-2", "/stream").as_bytes())
        .expect("send");
    read_response(&mut ka);
    drop(ka);

    // 5. Leaves before the response started.
    let mut early = TcpStream::connect(watched_addr).expect("connect");
    let early_addr = early.local_addr().expect("addr");
    early
        .write_all(request("early-1", "/stream?before_header").as_bytes())
        .expect("send");
    // Once the server has read the request (as a client that times out does, long after):
    // the kernel has reported its head. The reader drains every 100 ms.
    capture.wait_for("early-1's head", |events| {
        events.iter().any(|e| {
            matches!(&e.kind, KernelEventKind::RequestHead { head, .. }
                if head.request_id.as_deref() == Some("early-1"))
        })
    });
    early.shutdown(Shutdown::Both).expect("shutdown");
    drop(early);

    // 6. The unwatched port.
    let mut other = TcpStream::connect(unwatched_addr).expect("connect");
    other
        .write_all(request("unwatched-1", "/stream").as_bytes())
        .expect("send");
    read_response(&mut other);
    drop(other);

    let clients = [complete_addr, fin_addr, rst_addr, ka_addr, early_addr];
    let events = capture.wait_for("every watched connection to close", |events| {
        clients
            .iter()
            .all(|c| conn_of(events, *c).is_some_and(|at| closed(events, at)))
    });
    capture.stop();

    let seq = |client: SocketAddr| lifetime_of(&events, client);
    // The sends that carried no token are checked on their own below.
    let shapes = |evs: &[KernelEvent]| {
        evs.iter()
            .map(shape)
            .filter(|s| s != "response_id:-")
            .collect::<Vec<_>>()
    };

    // Every event of every connection: right 4-tuple, monotonic timestamps, pid where the
    // event ran in process context.
    let me = std::process::id();
    for client in clients {
        let evs = seq(client);
        match &evs[0].kind {
            KernelEventKind::Accepted { local, peer, .. } => {
                assert_eq!(*local, watched_addr, "{evs:#?}");
                assert_eq!(*peer, client);
                assert_eq!(evs[0].pid, None, "the handshake completes in softirq");
            }
            other => panic!("first event of {client} is {other:?}"),
        }
        for pair in evs.windows(2) {
            assert!(pair[0].ts <= pair[1].ts, "timestamps go back: {pair:#?}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        for e in &evs {
            assert!(
                now.abs_diff(e.ts) < 60_000_000_000,
                "wall-clock conversion is off: {e:?}"
            );
            match e.kind {
                // The server's read, in its process.
                KernelEventKind::RequestHead { fd, .. } => {
                    assert_eq!(e.pid, Some(me), "{e:?}");
                    assert!(fd > 2, "the server's socket fd: {e:?}");
                }
                // Our FIN, or the release of a reset socket: the server's close().
                KernelEventKind::LocalClosed { .. } => assert_eq!(e.pid, Some(me), "{e:?}"),
                _ => {}
            }
        }
    }

    let complete_seq = seq(complete_addr);
    assert_eq!(
        shapes(&complete_seq),
        [
            "accepted",
            "head:complete-1",
            "peer_closed:fin",
            "local_closed",
            "closed"
        ],
        "{complete_seq:#?}"
    );
    // The response's first send, its head alone, carried no token (this server's chunks are
    // not OpenAI-shaped, so they count as tokens); the server's close carries the response's
    // sends while the client was there: the head, every chunk and the last chunk.
    let tokenless = |evs: &[KernelEvent]| {
        evs.iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    KernelEventKind::ResponseId {
                        tokenless: true,
                        ..
                    }
                )
            })
            .count()
    };
    let response_sends = |evs: &[KernelEvent]| {
        evs.iter().find_map(|e| match e.kind {
            KernelEventKind::LocalClosed { response_sends, .. } => Some(response_sends),
            _ => None,
        })
    };
    assert_eq!(tokenless(&complete_seq), 1, "{complete_seq:#?}");
    assert_eq!(
        response_sends(&complete_seq),
        Some(Some(CHUNKS as u32 + 2)),
        "{complete_seq:#?}"
    );
    let KernelEventKind::RequestHead { head, .. } = &complete_seq[1].kind else {
        panic!("not a head")
    };
    assert_eq!(head.method, "GET");
    assert_eq!(head.path, "/stream");
    assert_eq!(head.tenant.as_deref(), Some("tenant-a"));
    let tp = head.traceparent.expect("traceparent parsed");
    assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(!format!("{head:?}").contains("sk-must-not-leak"));

    let writes_after = |evs: &[KernelEvent]| {
        evs.iter()
            .filter(|e| matches!(e.kind, KernelEventKind::WriteAfterPeerClose { .. }))
            .count()
    };
    let server = log.lock().expect("log").clone();
    for (client, id, how) in [
        (fin_addr, "fin-1", CloseHow::Fin),
        (rst_addr, "rst-1", CloseHow::Rst),
    ] {
        let evs = seq(client);
        let s = shapes(&evs);
        assert_eq!(s[1], format!("head:{id}"), "{s:?}");
        assert_eq!(s[2], format!("peer_closed:{}", how.as_str()), "{s:?}");
        // The response was streaming when the client left: the socket's send sequence
        // moved by the header and 3 chunks between the head and the close.
        let (at_head, at_close) = head_and_close_seqs(&evs);
        assert_eq!(at_close.wrapping_sub(at_head), response_bytes(3), "{id}");
        let expected = server[id];
        assert!(expected >= 1, "the server wrote after {id}'s client left");
        assert_eq!(
            writes_after(&evs),
            expected,
            "writes after the peer left on {id}: {s:?}"
        );
        // Writes after the peer left come after PeerClosed and before the close.
        let first_write = s
            .iter()
            .position(|x| x == "write_after")
            .expect("a write after");
        assert!(first_write > 2);
        assert!(
            s.contains(&"closed".to_string()) && s.contains(&"local_closed".to_string()),
            "{s:?}"
        );
        // Writes to the dead socket (EPIPE after the RST) still count, until the server
        // closes its fd.
        let last_write = s
            .iter()
            .rposition(|x| x == "write_after")
            .expect("a write after");
        let local_closed_at = s
            .iter()
            .position(|x| x == "local_closed")
            .expect("local_closed");
        assert!(last_write < local_closed_at, "{s:?}");
        assert_eq!(
            s.iter().filter(|x| x.starts_with("peer_closed")).count(),
            1,
            "{s:?}"
        );
        if how == CloseHow::Rst {
            // After a RST the very first write fails.
            let errno = evs.iter().find_map(|e| match e.kind {
                KernelEventKind::WriteAfterPeerClose { errno, .. } => Some(errno),
                _ => None,
            });
            assert!(
                matches!(errno, Some(libc::EPIPE) | Some(libc::ECONNRESET)),
                "{errno:?}"
            );
        }
    }

    // The client left before the first response byte: the send sequence is where the head
    // left it, and everything the server wrote afterwards is a write after the peer left.
    let early_seq = seq(early_addr);
    let early_shapes = shapes(&early_seq);
    assert_eq!(
        early_shapes[..3],
        ["accepted", "head:early-1", "peer_closed:fin"]
    );
    let (at_head, at_close) = head_and_close_seqs(&early_seq);
    assert_eq!(at_close, at_head, "{early_seq:#?}");
    assert_eq!(
        response_sends(&early_seq),
        Some(Some(0)),
        "no send while the client was there: {early_seq:#?}"
    );
    assert_eq!(
        writes_after(&early_seq),
        server["early-1"],
        "{early_shapes:?}"
    );

    let ka_seq = seq(ka_addr);
    assert_eq!(
        shapes(&ka_seq),
        [
            "accepted",
            "head:ka-1",
            "head:ka-2",
            "peer_closed:fin",
            "local_closed",
            "closed"
        ],
        "{ka_seq:#?}"
    );
    // Each response's head carried no token; the count at the close is the second response's.
    assert_eq!(tokenless(&ka_seq), 2, "{ka_seq:#?}");
    assert_eq!(
        response_sends(&ka_seq),
        Some(Some(CHUNKS as u32 + 2)),
        "{ka_seq:#?}"
    );
    // The second head comes after the whole first response, and the client's FIN after the
    // whole second one.
    let seqs: Vec<u32> = ka_seq
        .iter()
        .filter_map(|e| match e.kind {
            KernelEventKind::RequestHead { send_seq, .. }
            | KernelEventKind::PeerClosed { send_seq, .. } => send_seq,
            _ => None,
        })
        .collect();
    let whole = response_bytes(CHUNKS) + LAST_CHUNK.len() as u32;
    assert_eq!(
        seqs.windows(2)
            .map(|w| w[1].wrapping_sub(w[0]))
            .collect::<Vec<_>>(),
        [whole, whole],
        "{ka_seq:#?}"
    );

    // Nothing from the unwatched port.
    for e in &events {
        match &e.kind {
            KernelEventKind::Accepted { local, .. } => assert_ne!(*local, unwatched_addr),
            KernelEventKind::RequestHead { head, .. } => {
                assert_ne!(head.request_id.as_deref(), Some("unwatched-1"))
            }
            _ => {}
        }
    }
}

#[test]
fn tcp_lifecycle_ipv4_recv_send() {
    if kernel_tests_enabled("tcp_lifecycle_ipv4_recv_send") {
        lifecycle("127.0.0.1", Io::RecvSend);
    }
}

#[test]
fn tcp_lifecycle_ipv6_read_write() {
    if kernel_tests_enabled("tcp_lifecycle_ipv6_read_write") {
        lifecycle("[::1]", Io::ReadWrite);
    }
}

#[test]
fn listen_on_a_watched_port_is_reported() {
    if !kernel_tests_enabled("listen_on_a_watched_port_is_reported") {
        return;
    }
    // Pick a free port, then watch it before listening on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let capture = start_capture(vec![port]);
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind watched");
    let events = capture.wait_for("Listen", |evs| {
        evs.iter()
            .any(|e| matches!(e.kind, KernelEventKind::Listen { port: p, .. } if p == port))
    });
    capture.stop();
    let listen = events
        .iter()
        .find(|e| matches!(e.kind, KernelEventKind::Listen { .. }))
        .expect("listen event");
    assert_eq!(listen.pid, Some(std::process::id()));
    drop(listener);
}

#[test]
fn process_exits_are_reported_with_their_status_and_parent() {
    if !kernel_tests_enabled("process_exits_are_reported_with_their_status_and_parent") {
        return;
    }
    let capture = start_capture(Vec::new());
    let exited = std::process::Command::new("sh")
        .args(["-c", "exit 3"])
        .spawn()
        .expect("spawn sh");
    let exited_pid = exited.id();
    let mut killed = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let killed_pid = killed.id();
    killed.kill().expect("SIGKILL");
    let mut exited = exited;
    let status = exited.wait().expect("wait sh");
    assert_eq!(status.code(), Some(3));
    let _ = killed.wait();
    let events = capture.wait_for("both exits", |evs| {
        [exited_pid, killed_pid].iter().all(|pid| {
            evs.iter().any(|e| {
                e.pid == Some(*pid) && matches!(e.kind, KernelEventKind::ProcessExit { .. })
            })
        })
    });
    capture.stop();
    let exit_of = |pid: u32| {
        events
            .iter()
            .find_map(|e| match e.kind {
                KernelEventKind::ProcessExit {
                    exit_code,
                    parent_pid,
                } if e.pid == Some(pid) => Some((exit_code, parent_pid)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no exit of {pid}"))
    };
    // The wait status: exit(3) is 3 << 8; SIGKILL is 9.
    assert_eq!(exit_of(exited_pid), (3 << 8, std::process::id()));
    assert_eq!(exit_of(killed_pid), (9, std::process::id()));
    // One event per process, not per thread: no second exit of either.
    for pid in [exited_pid, killed_pid] {
        let n = events
            .iter()
            .filter(|e| e.pid == Some(pid) && matches!(e.kind, KernelEventKind::ProcessExit { .. }))
            .count();
        assert_eq!(n, 1, "exits of {pid}");
    }
}
/// `writev` of `pieces` on the raw fd (nginx's way of sending a chunk-size line and its data).
fn sys_writev(stream: &TcpStream, pieces: &[&[u8]]) -> std::io::Result<usize> {
    let iov: Vec<libc::iovec> = pieces
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: every iovec points into a live slice of its length; the fd is open.
    let n = unsafe { libc::writev(stream.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The response ids the kernel source reported on the connection of `client`, in order.
fn response_ids_of(events: &[KernelEvent], client: SocketAddr) -> Vec<String> {
    let Some((_, conn)) = conn_of(events, client) else {
        return Vec::new();
    };
    events
        .iter()
        .filter_map(|e| match &e.kind {
            KernelEventKind::ResponseId {
                conn: c,
                id: Some(id),
                ..
            } if *c == conn => Some(id.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn response_id_is_read_from_the_first_response_bytes() {
    if !kernel_tests_enabled("response_id_is_read_from_the_first_response_bytes") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let capture = start_capture(vec![addr.port()]);
    // Each request's target says how the server answers it.
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let id = target.trim_start_matches('/').to_string();
                    let chunk = |id: &str| {
                        let data = format!(
                            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\"}}\n\n"
                        );
                        (format!("{:x}\r\n", data.len()), format!("{data}\r\n"))
                    };
                    let (size, data) = chunk(&id);
                    let sent = if id.starts_with("writev") {
                        // Head in one send, then the first chunk as two iovecs.
                        stream.write_all(RESPONSE_HEADER.as_bytes()).and_then(|()| {
                            sys_writev(&stream, &[size.as_bytes(), data.as_bytes()]).map(drop)
                        })
                    } else if id.starts_with("header") {
                        // The id in an x-request-id response header; the body's id follows.
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nx-request-id: {id}\r\ntransfer-encoding: chunked\r\n\r\n"
                        );
                        let (size, data) = chunk("body-id");
                        stream
                            .write_all(head.as_bytes())
                            .and_then(|()| stream.write_all(format!("{size}{data}").as_bytes()))
                    } else if id.starts_with("late") {
                        // No id in the first two sends: the third is past the capture.
                        let (size, data) = chunk("too-late");
                        stream
                            .write_all(RESPONSE_HEADER.as_bytes())
                            .and_then(|()| stream.write_all(b"5\r\n: hi\n\r\n"))
                            .and_then(|()| stream.write_all(format!("{size}{data}").as_bytes()))
                    } else {
                        // uvicorn's way: the head, then each chunk, one write each.
                        stream
                            .write_all(RESPONSE_HEADER.as_bytes())
                            .and_then(|()| stream.write_all(format!("{size}{data}").as_bytes()))
                    };
                    // Later chunks carry the id too; only the start is captured.
                    let (size, data) = chunk(&id);
                    if sent
                        .and_then(|()| stream.write_all(format!("{size}{data}").as_bytes()))
                        .and_then(|()| stream.write_all(LAST_CHUNK))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let exchange = |stream: &mut TcpStream, target: &str| {
        stream
            .write_all(format!("GET /{target} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .expect("send");
        read_response(stream);
    };
    // Two requests on one keep-alive connection: each response's id.
    let mut keepalive = TcpStream::connect(addr).expect("connect");
    let keepalive_addr = keepalive.local_addr().expect("addr");
    exchange(&mut keepalive, "chatcmpl-k1");
    exchange(&mut keepalive, "writev-k2");
    let mut header = TcpStream::connect(addr).expect("connect");
    let header_addr = header.local_addr().expect("addr");
    exchange(&mut header, "header-3");
    let mut late = TcpStream::connect(addr).expect("connect");
    let late_addr = late.local_addr().expect("addr");
    exchange(&mut late, "late-4");
    drop((keepalive, header, late));

    let events = capture.wait_for("the response ids", |evs| {
        response_ids_of(evs, keepalive_addr).len() >= 2
            && response_ids_of(evs, header_addr).len() >= 2
            && evs
                .iter()
                .any(|e| matches!(&e.kind, KernelEventKind::Closed { conn } if Some(*conn) == conn_of(evs, late_addr).map(|c| c.1)))
    });
    capture.stop();
    assert_eq!(
        response_ids_of(&events, keepalive_addr),
        ["chatcmpl-k1", "writev-k2"],
        "one id per request, each from its response's start"
    );
    assert_eq!(
        response_ids_of(&events, header_addr),
        ["header-3", "body-id"]
    );
    assert_eq!(
        response_ids_of(&events, late_addr),
        Vec::<String>::new(),
        "only the first {} sends after a head are captured",
        2
    );
}

/// The `Refused` events for `port`, as (local, peer).
fn refused_on(events: &[KernelEvent], port: u16) -> Vec<(SocketAddr, SocketAddr)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            KernelEventKind::Refused { local, peer } if local.port() == port => {
                assert_eq!(e.pid, None, "softirq: no process");
                assert_eq!(e.kind.conn(), ConnId(0), "no socket");
                Some((*local, *peer))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn connections_refused_before_listen_are_reported() {
    if !kernel_tests_enabled("connections_refused_before_listen_are_reported") {
        return;
    }
    let free_port = |addr: &str| {
        TcpListener::bind(addr)
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    };
    let (watched, unwatched) = (free_port("127.0.0.1:0"), free_port("127.0.0.1:0"));
    let capture = start_capture(vec![watched]);
    // Three attempts over IPv4 and one over IPv6 before anything listens (a gateway retrying
    // while the runtime starts), and two to a port nobody watches.
    for target in [
        format!("127.0.0.1:{watched}"),
        format!("127.0.0.1:{watched}"),
        format!("127.0.0.1:{watched}"),
        format!("[::1]:{watched}"),
        format!("127.0.0.1:{unwatched}"),
        format!("127.0.0.1:{unwatched}"),
    ] {
        let err = TcpStream::connect(&target).expect_err("nothing listens");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{target}"
        );
    }
    let listener = TcpListener::bind(("127.0.0.1", watched)).expect("bind watched");
    let client = TcpStream::connect(("127.0.0.1", watched)).expect("connect after listen");
    let events = capture.wait_for("4 refused, the listen and the accept", |evs| {
        refused_on(evs, watched).len() >= 4
            && evs.iter().any(|e| {
                matches!(&e.kind, KernelEventKind::Accepted { peer, .. }
                    if Some(*peer) == client.local_addr().ok())
            })
    });
    capture.stop();
    let refused = refused_on(&events, watched);
    assert_eq!(refused.len(), 4, "{refused:?}");
    let v4: Vec<_> = refused.iter().filter(|(l, _)| l.is_ipv4()).collect();
    assert_eq!(v4.len(), 3, "{refused:?}");
    for (local, peer) in &v4 {
        assert_eq!(local.to_string(), format!("127.0.0.1:{watched}"));
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        assert_ne!(peer.port(), 0);
    }
    let v6: Vec<_> = refused.iter().filter(|(l, _)| l.is_ipv6()).collect();
    assert_eq!(v6.len(), 1, "{refused:?}");
    assert_eq!(v6[0].0.to_string(), format!("[::1]:{watched}"));
    // Each attempt comes from its own client port.
    let mut peers: Vec<u16> = refused.iter().map(|(_, p)| p.port()).collect();
    peers.dedup();
    assert_eq!(peers.len(), 4, "{refused:?}");
    assert!(refused_on(&events, unwatched).is_empty(), "unwatched port");
    // Once it listens, the port refuses nothing: the accepted connection makes no Refused.
    let listen = events
        .iter()
        .position(|e| matches!(e.kind, KernelEventKind::Listen { port, .. } if port == watched))
        .expect("listen event");
    assert!(
        events[listen..]
            .iter()
            .all(|e| !matches!(e.kind, KernelEventKind::Refused { .. })),
        "no refused attempt after the listen"
    );
    drop((client, listener));
}
