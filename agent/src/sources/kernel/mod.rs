//! The kernel source: eBPF programs on TCP and socket raw tracepoints that report the lifecycle
//! of each HTTP request on a watched port (contract §1.1). The design and its
//! costs are in docs/kernel-source.md.
//!
//! `KernelProbes` loads and attaches the programs; `KernelSource` reads their ring buffer,
//! decodes each record (`event::decode`), converts kernel time to wall-clock time, parses
//! request heads down to the allow-listed headers (`http::HeadParser`) and response heads down
//! to the response's id and whether the send carried a token (`response::read_send`), and
//! sends typed [`KernelEvent`]s on a bounded channel, in batches of up to [`BATCH_EVENTS`]. A
//! full channel drops the batch and counts its events; the reader never blocks the ring.

mod clock;
mod config;
pub mod discovery;
pub mod event;
pub mod exit;
pub mod http;
mod probes;
pub mod response;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use clock::MonotonicToWall;
pub use config::{KernelConfig, RUNTIME_DEFAULT_PORTS};
pub use probes::{CounterMap, KernelCounters, KernelProbes, PROGRAM_COUNT, TRACEPOINTS};

use crate::model::{CloseHow, ConnId, KernelEvent, KernelEventKind};
use crate::sources::channel::SourceSender;
use event::{RawBody, RawEvent, RawHow};
use http::HeadParser;

/// Most events sent in one message on the pipeline's channel. The reader drains the ring a few
/// times a second and each drain finds hundreds of events: one message per event cost the
/// pipeline a wakeup of its select loop each (its futures re-armed every time), one per batch
/// costs that once per batch. The bound keeps a batch's allocation small and lets the pipeline
/// interleave other sources' work between batches.
pub const BATCH_EVENTS: usize = 256;

/// The channel capacity, in batches, that bounds the queued events to `events`.
pub fn batch_capacity(events: usize) -> usize {
    events.div_ceil(BATCH_EVENTS).max(1)
}

/// Errors of the kernel source, each naming the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The agent was built with `INFERWATCH_EBPF_STUB=1`: no programs to load.
    #[error(
        "the eBPF object is a build stub (built with INFERWATCH_EBPF_STUB=1); rebuild with clang"
    )]
    StubObject,
    /// More watched ports than the kernel map holds.
    #[error("{count} watched ports, the kernel map holds {max}")]
    TooManyPorts {
        /// Ports asked for.
        count: usize,
        /// Map capacity.
        max: usize,
    },
    /// The kernel's BTF (/sys/kernel/btf/vmlinux) could not be read: the tp_btf programs
    /// resolve their tracepoints in it.
    #[error("reading the kernel's BTF from /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)")]
    Btf {
        /// The cause.
        #[source]
        source: Box<aya::BtfError>,
    },
    /// Parsing the object or creating its maps failed (BPF_MAP_CREATE, BTF).
    #[error(
        "loading the eBPF object (BPF_MAP_CREATE / BTF); needs CAP_BPF and CAP_PERFMON or root"
    )]
    Load {
        /// The cause.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program named in `TRACEPOINTS` is not in the object.
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    /// A map the agent needs is not in the object.
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// BPF_PROG_LOAD failed (verifier, capabilities).
    #[error("BPF_PROG_LOAD of {name} failed (verifier or missing CAP_BPF / CAP_PERFMON)")]
    Program {
        /// The program.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Detaching a program failed.
    #[error("detaching {name} failed")]
    Detach {
        /// The program.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Attaching a program failed (BPF_LINK_CREATE / BPF_RAW_TRACEPOINT_OPEN).
    #[error("attaching {name} to {tracepoint}")]
    Attach {
        /// The program.
        name: &'static str,
        /// `category/name`.
        tracepoint: String,
        /// The cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("BPF map operation on {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// Registering the ring buffer fd with the tokio reactor failed.
    #[error("registering the ring buffer fd with epoll")]
    Poll(#[source] std::io::Error),
}

/// Counters of the kernel source, shared with the metrics sink.
#[derive(Debug, Default)]
pub struct KernelStats {
    /// Records read from the ring buffer.
    pub records: AtomicU64,
    /// Events sent to the pipeline.
    pub events: AtomicU64,
    /// Records that did not decode (truncated, invalid field).
    pub decode_errors: AtomicU64,
    /// Records of a type this agent does not know, skipped.
    pub unknown_types: AtomicU64,
    /// Request heads that were not HTTP/1.x requests after all.
    pub unparsed_heads: AtomicU64,
    /// Response bytes captured after a request head that held no id (a response head without
    /// `x-request-id`, a body that is not an OpenAI-style JSON object); dropped.
    pub responses_without_id: AtomicU64,
    /// Events dropped because the pipeline's channel was full (whole batches).
    pub channel_full: AtomicU64,
    /// Process-exit events lost to the exit programs' full ring buffer (summed over CPUs).
    pub exit_ringbuf_drops: AtomicU64,
}

/// Turns decoded kernel records into model events: wall-clock time and parsed heads.
#[derive(Debug, Clone)]
pub struct EventConverter {
    clock: MonotonicToWall,
    heads: HeadParser,
}

impl EventConverter {
    /// A converter with the given clock and header names.
    pub fn new(clock: MonotonicToWall, config: &KernelConfig) -> Self {
        Self {
            clock,
            heads: HeadParser::new(&config.tenant_header, &config.conversation_header),
        }
    }

    /// The model event for a decoded record; `None` for a request head that is not an HTTP/1.x
    /// request, or response bytes that hold no id.
    pub fn convert(&self, raw: &RawEvent<'_>) -> Option<KernelEvent> {
        let conn = ConnId(raw.conn);
        let kind = match &raw.body {
            RawBody::Listen { port } => KernelEventKind::Listen { conn, port: *port },
            RawBody::Accepted { local, peer } => KernelEventKind::Accepted {
                conn,
                local: *local,
                peer: *peer,
            },
            RawBody::Refused { local, peer } => KernelEventKind::Refused {
                local: *local,
                peer: *peer,
            },
            RawBody::RequestHead { fd, send_seq, data } => KernelEventKind::RequestHead {
                conn,
                fd: *fd,
                head: self.heads.parse(data)?,
                send_seq: Some(*send_seq),
            },
            RawBody::PeerClosed { how, send_seq } => KernelEventKind::PeerClosed {
                conn,
                how: match how {
                    RawHow::Fin => CloseHow::Fin,
                    RawHow::Rst => CloseHow::Rst,
                },
                send_seq: Some(*send_seq),
            },
            RawBody::WriteAfterPeerClose { bytes, errno } => KernelEventKind::WriteAfterPeerClose {
                conn,
                bytes: *bytes,
                errno: *errno,
            },
            RawBody::ResponseHead { pieces, send_len } => {
                let response::ResponseSend { id, tokenless } =
                    response::read_send(pieces, *send_len);
                if id.is_none() && !tokenless {
                    return None;
                }
                KernelEventKind::ResponseId {
                    conn,
                    id,
                    tokenless,
                }
            }
            RawBody::LocalClosed { response_sends } => KernelEventKind::LocalClosed {
                conn,
                response_sends: *response_sends,
            },
            RawBody::Closed => KernelEventKind::Closed { conn },
            RawBody::ProcessExit { exit_code, ppid } => KernelEventKind::ProcessExit {
                exit_code: *exit_code,
                parent_pid: *ppid,
            },
            RawBody::OomVictim => KernelEventKind::OomVictim,
        };
        Some(KernelEvent {
            ts: self.clock.to_unix(raw.mono_ns),
            pid: (raw.tgid != 0).then_some(raw.tgid),
            kind,
        })
    }
}

/// The running kernel source: the attached probes and the ring-buffer reader.
pub struct KernelSource {
    probes: KernelProbes,
    ring: RingBuf<MapData>,
    /// The process-exit programs and their ring, when they loaded.
    exit: Option<(exit::ExitProbes, RingBuf<MapData>)>,
    counters: Arc<CounterMap>,
    converter: EventConverter,
    stats: Arc<KernelStats>,
    poll_interval: std::time::Duration,
}

impl std::fmt::Debug for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSource")
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

impl KernelSource {
    /// Loads and attaches the programs for the configured ports.
    ///
    /// # Errors
    /// See [`KernelError`]; the caller logs it once and runs without this source.
    pub fn build(config: &KernelConfig) -> Result<Self, KernelError> {
        let mut probes = KernelProbes::load(&config.ports(), config.ring_buffer_bytes)?;
        let ring = probes.take_ring_buf()?;
        let counters = Arc::new(probes.take_counters()?);
        let exit = match exit::ExitProbes::load().and_then(|mut p| {
            let ring = p.take_ring_buf()?;
            Ok((p, ring))
        }) {
            Ok(exit) => Some(exit),
            Err(e) => {
                tracing::warn!(
                    error = %crate::internal_events::ErrorChain(&e),
                    "process-exit programs not loaded: requests lost in flight are found from server-side closes only, without exit causes"
                );
                None
            }
        };
        Ok(Self {
            probes,
            ring,
            exit,
            counters,
            converter: EventConverter::new(MonotonicToWall::sample(), config),
            stats: Arc::new(KernelStats::default()),
            poll_interval: std::time::Duration::from_millis(config.poll_interval_ms.max(1)),
        })
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<KernelStats> {
        Arc::clone(&self.stats)
    }

    /// The programs' per-CPU counters, readable while the source runs.
    pub fn counters(&self) -> Arc<CounterMap> {
        Arc::clone(&self.counters)
    }

    /// Reads the ring buffer until `shutdown`, sending events on `tx` in batches of up to
    /// [`BATCH_EVENTS`] (a batch is dropped and its events counted when the channel is full;
    /// size the channel with [`batch_capacity`]). Returns the probes so that the caller decides
    /// when to detach; dropping them detaches every program.
    pub async fn run(
        self,
        tx: SourceSender<Vec<KernelEvent>>,
        shutdown: CancellationToken,
    ) -> Result<KernelProbes, KernelError> {
        let Self {
            probes,
            ring,
            exit,
            converter,
            stats,
            poll_interval,
            ..
        } = self;
        let (exit_probes, exit_ring) = match exit {
            Some((p, r)) => (Some(p), Some(r)),
            None => (None, None),
        };
        // SAFETY: as for the main ring below: the fd lives as long as the AsyncFd that owns it.
        let mut exit_ring = match exit_ring {
            Some(r) => Some(
                unsafe { AsyncFd::register_with_interest(r, tokio::io::Interest::READABLE) }
                    .map_err(|e| KernelError::Poll(e.into_parts().1))?,
            ),
            None => None,
        };
        tracing::debug!(fd = ring.as_raw_fd(), "kernel ring buffer reader started");
        // SAFETY: the ring buffer's fd stays open for as long as `ring` (owned by the AsyncFd)
        // lives, and nothing else registers it with the reactor.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| KernelError::Poll(e.into_parts().1))?;
        // The programs wake the reader only when the ring fills up (see `submit` in the C);
        // otherwise it drains on this timer.
        let mut tick = tokio::time::interval(poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            // Readiness is cleared before draining: a wakeup during the drain sets it again.
            let exit_ready = async {
                match exit_ring.as_mut() {
                    Some(r) => r.readable_mut().await.map(|mut g| g.clear_ready()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ready = ring.readable_mut() => ready.map_err(KernelError::Poll)?.clear_ready(),
                ready = exit_ready => ready.map_err(KernelError::Poll)?,
                _ = tick.tick() => {}
            }
            if let Some(p) = &exit_probes {
                stats
                    .exit_ringbuf_drops
                    .store(p.ringbuf_drops(), Ordering::Relaxed);
            }
            let rb = ring.get_mut();
            // Process exits are rare: copied out, so that the two rings are not borrowed at once.
            let mut exit_records: Vec<Vec<u8>> = Vec::new();
            if let Some(r) = exit_ring.as_mut() {
                let r = r.get_mut();
                while let Some(item) = r.next() {
                    exit_records.push(item.to_vec());
                }
            }
            for bytes in &exit_records {
                stats.records.fetch_add(1, Ordering::Relaxed);
                match event::decode(bytes) {
                    Ok(raw) => {
                        if let Some(event) = converter.convert(&raw) {
                            batch.push(event);
                        }
                    }
                    Err(err) => {
                        stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%err, "undecodable process-exit record");
                    }
                }
            }
            while let Some(item) = rb.next() {
                stats.records.fetch_add(1, Ordering::Relaxed);
                let raw = match event::decode(&item) {
                    Ok(raw) => raw,
                    Err(event::DecodeError::UnknownType(_)) => {
                        stats.unknown_types.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(err) => {
                        stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%err, "undecodable kernel record");
                        continue;
                    }
                };
                let Some(event) = converter.convert(&raw) else {
                    let unused = match raw.body {
                        RawBody::ResponseHead { .. } => &stats.responses_without_id,
                        _ => &stats.unparsed_heads,
                    };
                    unused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                drop(item);
                if batch.capacity() == 0 {
                    batch.reserve_exact(BATCH_EVENTS);
                }
                batch.push(event);
                if batch.len() >= BATCH_EVENTS && !send_batch(&tx, &mut batch, &stats) {
                    return Ok(probes);
                }
            }
            if !batch.is_empty() && !send_batch(&tx, &mut batch, &stats) {
                return Ok(probes);
            }
        }
        Ok(probes)
    }
}

/// Sends `batch` (leaving it empty), counting its events as sent or dropped. False when the
/// pipeline is gone.
fn send_batch(
    tx: &SourceSender<Vec<KernelEvent>>,
    batch: &mut Vec<KernelEvent>,
    stats: &KernelStats,
) -> bool {
    let n = batch.len() as u64;
    match tx.try_send(std::mem::take(batch)) {
        Ok(()) => {
            stats.events.fetch_add(n, Ordering::Relaxed);
            true
        }
        Err(mpsc::error::TrySendError::Full(mut back)) => {
            stats.channel_full.fetch_add(n, Ordering::Relaxed);
            // The allocation is kept for the next batch.
            back.clear();
            *batch = back;
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal_events::AgentMetrics;
    use crate::sources::channel::source_channel;

    fn event(n: u64) -> KernelEvent {
        KernelEvent {
            ts: n,
            pid: None,
            kind: KernelEventKind::Closed { conn: ConnId(n) },
        }
    }

    #[test]
    fn batch_capacity_bounds_the_queued_events() {
        assert_eq!(batch_capacity(65_536), 65_536 / BATCH_EVENTS);
        assert_eq!(batch_capacity(BATCH_EVENTS + 1), 2);
        assert_eq!(batch_capacity(0), 1);
    }

    #[test]
    fn a_full_channel_drops_the_batch_and_counts_its_events() {
        let stats = KernelStats::default();
        let (tx, mut rx) = source_channel("kernel", 1, &AgentMetrics::default());
        let mut batch: Vec<KernelEvent> = (0..3).map(event).collect();
        assert!(send_batch(&tx, &mut batch, &stats));
        assert!(batch.is_empty());
        assert_eq!(stats.events.load(Ordering::Relaxed), 3);

        batch.extend((3..5).map(event));
        assert!(send_batch(&tx, &mut batch, &stats), "full is not closed");
        assert!(batch.is_empty(), "the dropped events are gone");
        assert!(
            batch.capacity() >= 2,
            "the allocation is kept for the next batch"
        );
        assert_eq!(stats.channel_full.load(Ordering::Relaxed), 2);
        assert_eq!(stats.events.load(Ordering::Relaxed), 3);

        let got = rx.try_recv().expect("the first batch");
        assert_eq!(got, (0..3).map(event).collect::<Vec<_>>());
        drop(rx);
        batch.push(event(9));
        assert!(
            !send_batch(&tx, &mut batch, &stats),
            "closed: the reader stops"
        );
    }
}
