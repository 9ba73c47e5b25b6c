//! `cargo xtask bench kernel` (root): what the kernel programs cost a server, and how fast the
//! userspace reader drains their ring buffer.
//!
//! 1. Overhead: a loopback request loop (connect, request, 20 streamed chunks, close) with the
//!    programs attached vs detached, alternated in rounds within the same run; the median
//!    throughput of each and their ratio, and the same for the CPU time the client and server
//!    threads spend per request (the programs run in those threads, so that is their cost
//!    itself, and it is much less disturbed than throughput by what else the machine runs).
//!    The programs are loaded once and only their links attached and detached between halves
//!    (a few syscalls), so the pairs can be short and many: one pair's ratio moves by ±10 %
//!    with the shared machine's load, and only the median of many says something.
//! 2. Reader: a server thread writing as fast as it can to a connection whose peer has left
//!    (each write is a `WriteAfterPeerClose` event) while the agent's reader drains the ring;
//!    events per second received, and the drops the kernel counted.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use inferwatch::internal_events::AgentMetrics;
use inferwatch::sources::channel::source_channel;
use inferwatch::sources::kernel::{KernelConfig, KernelProbes, KernelSource, batch_capacity};
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 100;
const ROUND: Duration = Duration::from_millis(250);
const CHUNKS: usize = 20;

/// CPU time of the calling thread (user + system), in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Serves connections one after the other, publishing its CPU time after each.
fn serve(listener: TcpListener, cpu_ns: &AtomicU64) {
    let mut buf = [0u8; 4096];
    for stream in listener.incoming() {
        cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        let Ok(mut stream) = stream else { return };
        if !matches!(stream.read(&mut buf), Ok(n) if n > 0) {
            continue;
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n");
        for i in 0..CHUNKS {
            let _ = stream.write_all(format!("data: {{\"token\": {i}}}\n\n").as_bytes());
        }
    }
}

/// Runs requests until stopped; returns the CPU time it used.
fn client_loop(addr: std::net::SocketAddr, stop: &AtomicBool, done: &AtomicU64) -> u64 {
    let start = thread_cpu_ns();
    let mut buf = [0u8; 8192];
    let request = b"POST /v1/completions HTTP/1.1\r\nhost: b\r\nx-request-id: bench\r\ncontent-length: 2\r\n\r\n{}";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        if s.write_all(request).is_err() {
            continue;
        }
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        done.fetch_add(1, Ordering::Relaxed);
    }
    thread_cpu_ns() - start
}

/// One round: requests per second, and the client's and server's CPU time per request (ns).
fn measure(addr: std::net::SocketAddr, server_cpu: &AtomicU64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (s, d) = (Arc::clone(&stop), Arc::clone(&done));
    let server_before = server_cpu.load(Ordering::Relaxed);
    let client = thread::spawn(move || client_loop(addr, &s, &d));
    let start = Instant::now();
    thread::sleep(ROUND);
    stop.store(true, Ordering::Relaxed);
    let client_cpu = client.join().unwrap_or(0);
    let server = server_cpu
        .load(Ordering::Relaxed)
        .saturating_sub(server_before);
    let n = done.load(Ordering::Relaxed);
    (
        n as f64 / start.elapsed().as_secs_f64(),
        (client_cpu + server) as f64 / n.max(1) as f64,
    )
}

/// The programs loaded once for the whole overhead run, detached, and a thread draining their
/// ring buffer on the agent's default timer (100 ms) while they are attached.
struct Programs {
    probes: KernelProbes,
    records: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    drain: Option<thread::JoinHandle<()>>,
}

impl Programs {
    fn load(port: u16) -> Self {
        let config = KernelConfig::default();
        let mut probes = KernelProbes::load(&[port], config.ring_buffer_bytes)
            .unwrap_or_else(|e| panic!("kernel programs (run as root): {e:#?}"));
        probes.detach().expect("detach");
        let mut ring = probes.take_ring_buf().expect("ring buffer");
        let records = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (Arc::clone(&records), Arc::clone(&stop));
        let poll = Duration::from_millis(config.poll_interval_ms);
        let drain = thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                while let Some(record) = ring.next() {
                    std::hint::black_box(&*record);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(poll);
            }
        });
        Self {
            probes,
            records,
            stop,
            drain: Some(drain),
        }
    }
}

impl Drop for Programs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn overhead() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_cpu = Arc::new(AtomicU64::new(0));
    let cpu = Arc::clone(&server_cpu);
    thread::spawn(move || serve(listener, &cpu));
    let mut programs = Programs::load(addr.port());
    let _ = measure(addr, &server_cpu); // warm-up
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_off, mut cpu_on, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut attached = |on: bool| {
        let done = if on {
            programs.probes.attach()
        } else {
            programs.probes.detach()
        };
        done.expect("attach / detach");
    };
    for round in 0..ROUNDS {
        // Alternate which half of the pair goes first, so that a drift in the machine's load
        // does not favour one side.
        let ((a, a_cpu), (b, b_cpu)) = if round % 2 == 0 {
            let a = measure(addr, &server_cpu);
            attached(true);
            let b = measure(addr, &server_cpu);
            attached(false);
            (a, b)
        } else {
            attached(true);
            let b = measure(addr, &server_cpu);
            attached(false);
            let a = measure(addr, &server_cpu);
            (a, b)
        };
        off.push(a);
        on.push(b);
        ratios.push(b / a);
        cpu_off.push(a_cpu);
        cpu_on.push(b_cpu);
        cpu_ratios.push(b_cpu / a_cpu);
    }
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    let mut sorted = ratios.clone();
    let m_ratio = median(&mut sorted);
    let (q1, q3) = (sorted[sorted.len() / 4], sorted[sorted.len() * 3 / 4]);
    println!(
        "kernel overhead: loopback request loop (connect, request, {CHUNKS} chunks, close), {ROUNDS} alternated pairs of {ROUND:?}"
    );
    println!("  detached  median {m_off:>9.0} req/s");
    println!("  attached  median {m_on:>9.0} req/s");
    println!(
        "  attached/detached: median of per-pair ratios {m_ratio:.3} (IQR {q1:.3}-{q3:.3}) = {:.1}% throughput loss; {} records drained",
        (1.0 - m_ratio) * 100.0,
        programs.records.load(Ordering::Relaxed)
    );
    let (c_off, c_on) = (median(&mut cpu_off), median(&mut cpu_on));
    let mut sorted = cpu_ratios.clone();
    let c_ratio = median(&mut sorted);
    let (c1, c3) = (sorted[sorted.len() / 4], sorted[sorted.len() * 3 / 4]);
    println!(
        "  CPU of the client + server threads per request: detached {:.1} µs, attached {:.1} µs (medians); median of per-pair ratios {c_ratio:.3} (IQR {c1:.3}-{c3:.3}) = {:+.1}% CPU per request",
        c_off / 1000.0,
        c_on / 1000.0,
        (c_ratio - 1.0) * 100.0
    );
}

fn reader() {
    const EVENTS: u64 = 600_000;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = KernelConfig {
        watch_ports: vec![addr.port()],
        // 64 MiB holds ~1.4M 48-byte records (40-byte event + ring header).
        ring_buffer_bytes: 64 * 1024 * 1024,
        channel_capacity: 1 << 20,
        ..KernelConfig::default()
    };
    let source = runtime
        .block_on(async { KernelSource::build(&config) })
        .unwrap_or_else(|e| panic!("kernel source (run as root): {e:#?}"));
    let counters = source.counters();
    let stats = source.stats();
    let client = TcpStream::connect(addr).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    // The client resets: from now on every server write is a write after the peer left.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid linger struct and size.
    unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    drop(client);
    thread::sleep(Duration::from_millis(100));
    let produce = Instant::now();
    for _ in 0..EVENTS {
        let _ = server.write(b"x");
    }
    let produce_secs = produce.elapsed().as_secs_f64();
    let ring_drops_before: u64 = counters
        .read()
        .map(|c| c.ringbuf_drops.iter().sum())
        .unwrap_or(0);

    let (tx, mut rx) = source_channel(
        "kernel",
        batch_capacity(config.channel_capacity),
        &AgentMetrics::default(),
    );
    let shutdown = CancellationToken::new();
    let (received, drain_secs) = runtime.block_on(async {
        let reader = tokio::spawn(source.run(tx, shutdown.clone()));
        let start = Instant::now();
        let mut received = 0u64;
        // The first events of the connection (Accepted, PeerClosed, Closed) come too.
        while received < EVENTS {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(batch)) => received += batch.len() as u64,
                _ => break,
            }
        }
        let secs = start.elapsed().as_secs_f64();
        shutdown.cancel();
        let _ = reader.await;
        (received, secs)
    });
    println!(
        "reader: {EVENTS} WriteAfterPeerClose events queued in the ring in {produce_secs:.2} s ({:.0}/s from one producer thread), ring drops {ring_drops_before}",
        EVENTS as f64 / produce_secs
    );
    println!(
        "  drained {received} events in {drain_secs:.3} s = {:.0} events/s (decode, convert, send on the channel; one core), channel drops {}",
        received as f64 / drain_secs,
        stats.channel_full.load(Ordering::Relaxed)
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the kernel benchmark needs root (it loads eBPF programs)");
        std::process::exit(2);
    }
    if std::env::args().any(|a| a == "--bench" || a == "--test")
        && std::env::args().any(|a| a == "--test")
    {
        return;
    }
    overhead();
    reader();
}
