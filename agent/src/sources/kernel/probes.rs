//! Loading and attaching the eBPF programs. `KernelProbes` owns the `Ebpf` object and with it
//! every link: dropping it detaches all programs.

use aya::Btf;
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Ebpf, EbpfLoader};

use super::KernelError;
use super::event::raw::{
    IW_COUNTER_CONN_STATE_ALLOC, IW_COUNTER_RINGBUF_DROPS, IW_MAX_WATCHED_PORTS,
};

/// The compiled object of `ebpf/tcp_lifecycle.bpf.c` (empty when built with
/// `INFERWATCH_EBPF_STUB=1`).
static TCP_LIFECYCLE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp_lifecycle.bpf.o"));

/// The BTF tracepoint (tp_btf) programs with the tracepoint they attach to: TCP state changes
/// and resets (received, and sent for a SYN no socket took), every socket send and receive of
/// the node, and the release of TCP sockets. They
/// get the tracepoint's typed arguments without a trace record built first, and need no tracefs.
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("iw_inet_sock_set_state", "inet_sock_set_state"),
    ("iw_tcp_receive_reset", "tcp_receive_reset"),
    ("iw_tcp_send_reset", "tcp_send_reset"),
    ("iw_sock_recv_length", "sock_recv_length"),
    ("iw_sock_send_length", "sock_send_length"),
    ("iw_tcp_destroy_sock", "tcp_destroy_sock"),
];

/// How many programs the agent attaches.
pub const PROGRAM_COUNT: usize = TRACEPOINTS.len();

/// Counters the programs keep per CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Events lost because the ring buffer was full, per CPU.
    pub ringbuf_drops: Vec<u64>,
    /// Reset connections whose mark (socket storage) could not be created, per CPU: the
    /// `LocalClosed` of their release is lost.
    pub conn_state_alloc: Vec<u64>,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct KernelProbes {
    ebpf: Ebpf,
    /// The attached programs' links, by program name; empty while detached.
    links: Vec<(&'static str, BtfTracePointLinkId)>,
}

impl std::fmt::Debug for KernelProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelProbes").finish_non_exhaustive()
    }
}

impl KernelProbes {
    /// Loads the programs, attaches them all and fills the watched-port map.
    ///
    /// # Errors
    /// [`KernelError`] naming the step that failed: the object not built, the
    /// kernel refusing a program (verifier, capabilities) or an attach.
    ///
    /// Minimum kernel: 6.3 (the socket I/O tracepoints), with BTF.
    pub fn load(ports: &[u16], ring_buffer_bytes: u32) -> Result<Self, KernelError> {
        if TCP_LIFECYCLE.is_empty() {
            return Err(KernelError::StubObject);
        }
        if ports.len() > IW_MAX_WATCHED_PORTS as usize {
            return Err(KernelError::TooManyPorts {
                count: ports.len(),
                max: IW_MAX_WATCHED_PORTS as usize,
            });
        }
        raise_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("events", ring_buffer_bytes)
            .load(TCP_LIFECYCLE)
            .map_err(|source| KernelError::Load {
                source: Box::new(source),
            })?;
        let btf = Btf::from_sys_fs().map_err(|source| KernelError::Btf {
            source: Box::new(source),
        })?;
        for (name, tracepoint) in TRACEPOINTS {
            program(&mut ebpf, name)?
                .load(tracepoint, &btf)
                .map_err(|source| KernelError::Program { name, source })?;
        }
        let mut probes = Self {
            ebpf,
            links: Vec::with_capacity(TRACEPOINTS.len()),
        };
        probes.attach()?;
        for port in ports {
            probes.watch_port(*port)?;
        }
        Ok(probes)
    }

    /// Attaches every loaded program that is not attached.
    ///
    /// # Errors
    /// [`KernelError::Attach`] for the first program the kernel refused; those attached before
    /// it stay attached.
    pub fn attach(&mut self) -> Result<(), KernelError> {
        for (name, tracepoint) in TRACEPOINTS {
            if self.links.iter().any(|(linked, _)| linked == name) {
                continue;
            }
            let link =
                program(&mut self.ebpf, name)?
                    .attach()
                    .map_err(|source| KernelError::Attach {
                        name,
                        tracepoint: format!("tp_btf/{tracepoint}"),
                        source,
                    })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches every program and keeps them loaded, with their maps: [`Self::attach`] puts them
    /// back in a few syscalls. The kernel bench alternates the two to compare a loop with and
    /// without the programs, without reloading them (BTF parsing and verification) each time.
    ///
    /// # Errors
    /// [`KernelError::Detach`] for a program the kernel would not detach.
    pub fn detach(&mut self) -> Result<(), KernelError> {
        while let Some((name, link)) = self.links.pop() {
            program(&mut self.ebpf, name)?
                .detach(link)
                .map_err(|source| KernelError::Detach { name, source })?;
        }
        Ok(())
    }

    /// Adds a local port to the watched set (a bit in the kernel's port bitmap).
    pub fn watch_port(&mut self, port: u16) -> Result<(), KernelError> {
        let map_err = |source| KernelError::Map {
            name: "watched_ports",
            source,
        };
        let map = self
            .ebpf
            .map_mut("watched_ports")
            .ok_or(KernelError::MissingMap("watched_ports"))?;
        let mut bitmap: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_err)?;
        let word = u32::from(port >> 6);
        let bits = bitmap.get(&word, 0).map_err(map_err)?;
        bitmap
            .set(word, bits | (1u64 << (port & 63)), 0)
            .map_err(map_err)
    }

    /// Takes the ring buffer out of the object, for the reader task.
    pub fn take_ring_buf(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map("events")
            .ok_or(KernelError::MissingMap("events"))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            name: "events",
            source,
        })
    }

    /// Takes the per-CPU counters map out of the object, for the metrics.
    pub fn take_counters(&mut self) -> Result<CounterMap, KernelError> {
        let map = self
            .ebpf
            .take_map("counters")
            .ok_or(KernelError::MissingMap("counters"))?;
        let array = PerCpuArray::try_from(map).map_err(|source| KernelError::Map {
            name: "counters",
            source,
        })?;
        Ok(CounterMap { array })
    }
}

/// The programs' per-CPU counters (ring-buffer drops, reset connections left unmarked).
pub struct CounterMap {
    array: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for CounterMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterMap").finish_non_exhaustive()
    }
}

impl CounterMap {
    /// Reads every counter, per CPU.
    pub fn read(&self) -> Result<KernelCounters, KernelError> {
        let read = |index: u32| -> Result<Vec<u64>, KernelError> {
            let values = self
                .array
                .get(&index, 0)
                .map_err(|source| KernelError::Map {
                    name: "counters",
                    source,
                })?;
            Ok(values.iter().copied().collect())
        };
        Ok(KernelCounters {
            ringbuf_drops: read(IW_COUNTER_RINGBUF_DROPS)?,
            conn_state_alloc: read(IW_COUNTER_CONN_STATE_ALLOC)?,
        })
    }
}

/// The loaded object's program `name`, as the BTF tracepoint program it is.
fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut BtfTracePoint, KernelError> {
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use memcg accounting and
/// ignore it. Raising it can fail without CAP_SYS_RESOURCE: warn, never fail.
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "setrlimit(RLIMIT_MEMLOCK) failed; harmless on kernels >= 5.11"
        );
    }
}
