//! The process-exit programs (`ebpf/process_exit.bpf.c`): every whole-process exit with its
//! exit code or signal, and the OOM killer's victims (contract §3.5). A separate object with its
//! own ring buffer, loaded after the TCP programs; when it does not load the agent runs without
//! exit causes (lost requests are then found from server-side closes only).

use aya::Btf;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Ebpf, EbpfLoader};

use super::KernelError;

/// The compiled object of `ebpf/process_exit.bpf.c` (empty when built with
/// `INFERWATCH_EBPF_STUB=1`).
static PROCESS_EXIT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/process_exit.bpf.o"));

/// The programs and their BTF tracepoints. `mark_victim` is optional: without it an OOM kill
/// reads as a death by SIGKILL (`signal`).
pub const EXIT_TRACEPOINTS: &[(&str, &str, bool)] = &[
    ("iw_sched_process_exit", "sched_process_exit", true),
    ("iw_mark_victim", "mark_victim", false),
];

/// The loaded and attached exit programs. Dropping it detaches them.
pub struct ExitProbes {
    ebpf: Ebpf,
    links: Vec<BtfTracePointLinkId>,
    drops: Option<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for ExitProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitProbes")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl ExitProbes {
    /// Loads the object and attaches its programs (the optional ones when they attach).
    ///
    /// # Errors
    /// [`KernelError`] naming the step that failed for a required program.
    pub fn load() -> Result<Self, KernelError> {
        if PROCESS_EXIT.is_empty() {
            return Err(KernelError::StubObject);
        }
        let mut ebpf =
            EbpfLoader::new()
                .load(PROCESS_EXIT)
                .map_err(|source| KernelError::Load {
                    source: Box::new(source),
                })?;
        let btf = Btf::from_sys_fs().map_err(|source| KernelError::Btf {
            source: Box::new(source),
        })?;
        let mut links = Vec::new();
        for (name, tracepoint, required) in EXIT_TRACEPOINTS {
            match attach(&mut ebpf, name, tracepoint, &btf) {
                Ok(link) => links.push(link),
                Err(e) if !required => {
                    tracing::warn!(program = name, error = %e, "optional exit program not attached; OOM kills will read as SIGKILL");
                }
                Err(e) => return Err(e),
            }
        }
        let drops = ebpf
            .take_map("exit_drops")
            .and_then(|m| PerCpuArray::try_from(m).ok());
        Ok(Self { ebpf, links, drops })
    }

    /// Takes the ring buffer out of the object, for the reader task.
    pub fn take_ring_buf(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map("exit_events")
            .ok_or(KernelError::MissingMap("exit_events"))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            name: "exit_events",
            source,
        })
    }

    /// Exit events lost to a full ring buffer, summed over CPUs.
    pub fn ringbuf_drops(&self) -> u64 {
        self.drops
            .as_ref()
            .and_then(|a| a.get(&0, 0).ok())
            .map_or(0, |v| v.iter().sum())
    }
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &'static str,
    btf: &Btf,
) -> Result<BtfTracePointLinkId, KernelError> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })?;
    program
        .load(tracepoint, btf)
        .map_err(|source| KernelError::Program { name, source })?;
    program.attach().map_err(|source| KernelError::Attach {
        name,
        tracepoint: format!("tp_btf/{tracepoint}"),
        source,
    })
}
