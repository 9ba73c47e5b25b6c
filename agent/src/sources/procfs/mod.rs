//! Process identity (contract §1.4): pid -> executable name, container id, pod uid and start time,
//! read from `/proc/<pid>/{comm,cgroup,stat}`.
//!
//! The parsers ([`parse_cgroup`], [`parse_stat_start_ticks`], [`parse_boot_time`]) are pure
//! functions; [`ProcReader`] does the reads and keeps a bounded cache keyed by pid and start
//! time, so that a reused pid is never given the previous process's identity.
//!
//! cgroup path formats understood (v1 lines `N:controllers:/path` and the v2 line `0::/path`):
//! - kubelet with the systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` (also
//!   `crio-<id>.scope`, `docker-<id>.scope`);
//! - kubelet with the cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (also
//!   `crio-<id>`);
//! - Docker: `/docker/<id>` (cgroupfs) and `/system.slice/docker-<id>.scope` (systemd);
//! - Podman: `libpod-<id>.scope`.
//!
//! CRI-O's `crio-conmon-<id>.scope` belongs to the monitor, not the container, and is ignored.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::model::{ProcessIdentity, UnixNanos};

/// Why an identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    /// A `/proc` file could not be read (the process is gone, or no permission).
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/<pid>/stat` did not have the expected fields.
    #[error("parsing {path}: no start time field")]
    Stat {
        /// The file.
        path: PathBuf,
    },
}

/// The container runtime a cgroup path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerRuntime {
    /// containerd (`cri-containerd-<id>`).
    Containerd,
    /// CRI-O (`crio-<id>`).
    CriO,
    /// Docker (`docker-<id>` or `/docker/<id>`).
    Docker,
    /// Podman (`libpod-<id>`).
    Podman,
    /// A bare 64-hex-digit segment (kubelet's cgroupfs driver): the runtime is not named.
    Unknown,
}

/// What a `/proc/<pid>/cgroup` file says about the container and pod of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The container id (64 lower-case hex digits).
    pub container_id: Option<String>,
    /// The pod uid (`8-4-4-4-12` hex, with dashes).
    pub pod_uid: Option<String>,
    /// The runtime the path names, when it names one.
    pub runtime: Option<ContainerRuntime>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container id and runtime of one path segment, if it names a container.
fn container_of_segment(segment: &str) -> Option<(String, ContainerRuntime)> {
    let base = segment.strip_suffix(".scope").unwrap_or(segment);
    if base.starts_with("crio-conmon-") {
        return None;
    }
    const PREFIXES: &[(&str, ContainerRuntime)] = &[
        ("cri-containerd-", ContainerRuntime::Containerd),
        ("crio-", ContainerRuntime::CriO),
        ("docker-", ContainerRuntime::Docker),
        ("libpod-", ContainerRuntime::Podman),
    ];
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = base.strip_prefix(prefix)
            && is_hex64(id)
        {
            return Some((id.to_ascii_lowercase(), *runtime));
        }
    }
    is_hex64(base).then(|| (base.to_ascii_lowercase(), ContainerRuntime::Unknown))
}

/// The pod uid of one path segment: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_of_segment(segment: &str) -> Option<String> {
    let candidate = if let Some(slice) = segment.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        slice.get(at + 4..)?.replace('_', "-")
    } else {
        segment.strip_prefix("pod")?.to_owned()
    };
    is_uuid(&candidate).then(|| candidate.to_ascii_lowercase())
}

/// Parses the content of `/proc/<pid>/cgroup` (v1, v2 or hybrid). The deepest segment that
/// names a container wins; lines are read in order and the first line with a container id
/// gives the answer (in a hybrid hierarchy all lines agree).
pub fn parse_cgroup(content: &str) -> CgroupIdentity {
    let mut best = CgroupIdentity::default();
    for line in content.lines() {
        // hierarchy-id:controllers:path; the path may itself contain ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let mut found = CgroupIdentity::default();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            if let Some(uid) = pod_of_segment(segment) {
                found.pod_uid = Some(uid);
            }
            if let Some((id, runtime)) = container_of_segment(segment) {
                found.container_id = Some(id);
                found.runtime = Some(runtime);
            }
        }
        if found.container_id.is_some() {
            return found;
        }
        if best.pod_uid.is_none() {
            best.pod_uid = found.pod_uid;
        }
    }
    best
}

/// The process start time from `/proc/<pid>/stat`, in clock ticks after boot (field 22). The
/// command name (field 2) may hold spaces and parentheses, so fields are counted after the
/// last `)`.
pub fn parse_stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // After ')': field 3 (state) is the first; starttime is field 22, the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The parent pid from `/proc/<pid>/stat` (field 4).
pub fn parse_stat_parent(stat: &str) -> Option<u32> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The boot time (`btime`, unix seconds) from `/proc/stat`.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Start time in unix nanos from boot time (seconds), start ticks and ticks per second.
pub fn start_time_nanos(boot_time_s: u64, start_ticks: u64, ticks_per_s: u64) -> UnixNanos {
    let tps = ticks_per_s.max(1);
    boot_time_s
        .saturating_mul(1_000_000_000)
        .saturating_add(start_ticks.saturating_mul(1_000_000_000) / tps)
}

/// The boot time in unix nanoseconds: the wall clock minus the time since boot
/// (`CLOCK_BOOTTIME`, the clock that `/proc/<pid>/stat`'s start ticks count on). `btime` in
/// `/proc/stat` is truncated to whole seconds, which would place every `t_exec` up to a second
/// early; it is only the fallback.
fn boot_time_nanos() -> Option<UnixNanos> {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the valid pointer given.
        let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
        (rc == 0).then(|| {
            u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec).unwrap_or(0)
        })
    };
    // Read close together; the two clocks advance at the same rate.
    let since_boot = read(libc::CLOCK_BOOTTIME)?;
    let wall = read(libc::CLOCK_REALTIME)?;
    wall.checked_sub(since_boot)
}

/// Reads identities from a procfs root (normally `/proc`) with a bounded cache.
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    /// Boot time, unix nanoseconds.
    boot_time_ns: Option<UnixNanos>,
    ticks_per_s: u64,
    capacity: usize,
    /// pid -> the cached identity.
    cache: HashMap<u32, Cached>,
    order: VecDeque<u32>,
    /// How long a cached identity is trusted before its pid's start time is read again.
    recheck: Duration,
}

/// A cached identity, with the start time that tells a reused pid and when it was read.
#[derive(Debug)]
struct Cached {
    start_ticks: u64,
    checked: Instant,
    identity: ProcessIdentity,
}

/// The default of [`ProcReader::with_recheck`]. Reading `/proc/<pid>/stat` costs tens of
/// microseconds for a busy multi-threaded runtime (the kernel sums every thread's times), and
/// the pipeline asks once per OTLP request: at 1k requests/s that was 2 % of the agent's CPU.
/// A pid is only reused after its process exited and the pid space wrapped, so trusting the
/// cache for a second can only mislabel the spans of that second.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// How many ancestors [`ProcReader::lineage_if_new`] reads above a process (the correlator
/// follows as many).
pub const MAX_LINEAGE: usize = 8;

impl ProcReader {
    /// A reader of `root` (e.g. `/proc`, or `/host/proc` in a container) caching up to
    /// `capacity` identities.
    pub fn new(root: impl Into<PathBuf>, capacity: usize) -> Self {
        let root = root.into();
        let boot_time_ns = boot_time_nanos().or_else(|| {
            std::fs::read_to_string(root.join("stat"))
                .ok()
                .and_then(|s| parse_boot_time(&s))
                .map(|b| b.saturating_mul(1_000_000_000))
        });
        // SAFETY: sysconf has no preconditions; it only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            root,
            boot_time_ns,
            ticks_per_s: u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100),
            capacity: capacity.max(1),
            cache: HashMap::new(),
            order: VecDeque::new(),
            recheck: RECHECK_AFTER,
        }
    }

    /// Trusts a cached identity for `recheck` before reading its pid's start time again
    /// (default [`RECHECK_AFTER`]; zero reads it on every lookup).
    pub fn with_recheck(mut self, recheck: Duration) -> Self {
        self.recheck = recheck;
        self
    }

    /// The procfs root it reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many identities are cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The identity of `pid`: cached while the pid keeps its start time, read otherwise.
    ///
    /// # Errors
    /// [`ProcfsError::Read`] when the process is gone or `/proc` is not readable,
    /// [`ProcfsError::Stat`] on a malformed stat file.
    pub fn identity(&mut self, pid: u32) -> Result<ProcessIdentity, ProcfsError> {
        Ok(self.lookup(pid)?.0)
    }

    /// The identity of `pid` when it is not cached yet (or the pid now names another process):
    /// what the pipeline forwards to the correlator as `Input::Process`. `None` when it is
    /// cached, or unreadable (gone, no permission).
    pub fn identity_if_new(&mut self, pid: u32) -> Option<ProcessIdentity> {
        match self.lookup(pid) {
            Ok((identity, true)) => Some(identity),
            Ok((_, false)) => None,
            Err(err) => {
                tracing::debug!(pid, error = %err, "no identity for process");
                None
            }
        }
    }

    /// The identities of `pid` and of its ancestors (up to [`MAX_LINEAGE`] of them, stopping
    /// below init) that are not cached yet or now name another process, the oldest ancestor
    /// first: what ties a runtime's GPU workers (vLLM's EngineCore and its workers) to the
    /// process that reads its requests. Cached ancestors are walked through (their parent is
    /// cached too); unreadable ones end the walk.
    pub fn lineage_if_new(&mut self, pid: u32) -> Vec<ProcessIdentity> {
        let mut new = Vec::new();
        let mut cur = pid;
        for _ in 0..=MAX_LINEAGE {
            let (identity, fresh) = match self.lookup(cur) {
                Ok(found) => found,
                Err(err) => {
                    tracing::debug!(pid = cur, error = %err, "no identity for process");
                    break;
                }
            };
            let parent = identity.parent_pid;
            if fresh {
                new.push(identity);
            }
            match parent {
                Some(p) if p > 1 && p != cur => cur = p,
                _ => break,
            }
        }
        new.reverse();
        new
    }

    fn lookup(&mut self, pid: u32) -> Result<(ProcessIdentity, bool), ProcfsError> {
        let now = Instant::now();
        if let Some(cached) = self.cache.get(&pid)
            && now.saturating_duration_since(cached.checked) < self.recheck
        {
            return Ok((cached.identity.clone(), false));
        }
        let dir = self.root.join(pid.to_string());
        let stat_path = dir.join("stat");
        let stat = read(&stat_path)?;
        let ticks = parse_stat_start_ticks(&stat).ok_or(ProcfsError::Stat { path: stat_path })?;
        if let Some(cached) = self.cache.get_mut(&pid)
            && cached.start_ticks == ticks
        {
            cached.checked = now;
            return Ok((cached.identity.clone(), false));
        }
        let executable = read(&dir.join("comm"))
            .ok()
            .map(|s| s.trim_end().to_owned())
            .filter(|s| !s.is_empty());
        // A process outside any container may have no readable cgroup file: not an error.
        let cgroup = read(&dir.join("cgroup"))
            .map(|s| parse_cgroup(&s))
            .unwrap_or_default();
        let identity = ProcessIdentity {
            pid,
            executable,
            container_id: cgroup.container_id,
            pod_uid: cgroup.pod_uid,
            start_time: self.boot_time_ns.map(|b| {
                b.saturating_add(ticks.saturating_mul(1_000_000_000) / self.ticks_per_s.max(1))
            }),
            parent_pid: parse_stat_parent(&stat).filter(|p| *p != 0),
        };
        let cached = Cached {
            start_ticks: ticks,
            checked: now,
            identity: identity.clone(),
        };
        if self.cache.insert(pid, cached).is_none() {
            self.order.push_back(pid);
        }
        while self.cache.len() > self.capacity {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.cache.remove(&old);
        }
        Ok((identity, true))
    }
}

fn read(path: &Path) -> Result<String, ProcfsError> {
    std::fs::read_to_string(path).map_err(|source| ProcfsError::Read {
        path: path.to_owned(),
        source,
    })
}

mod served_model;

pub use served_model::{ServedModels, served_model_name};

#[cfg(test)]
mod tests;
