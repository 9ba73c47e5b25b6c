//! Tests of the identity parsers with real-world `/proc/<pid>/cgroup` lines of each format,
//! and of the reader on this machine's `/proc`.

use super::*;

const ID: &str = "4f5c1a8b9e2d3c7f6a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b";
const UID: &str = "0b6a3e5c-7d21-4f0e-9a8b-1c2d3e4f5a6b";

struct Case {
    name: &'static str,
    content: String,
    container: Option<&'static str>,
    pod: Option<&'static str>,
    runtime: Option<ContainerRuntime>,
}

fn cases() -> Vec<Case> {
    let uid_us = UID.replace('-', "_");
    vec![
        Case {
            name: "v2 systemd containerd burstable",
            content: format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_us}.slice/cri-containerd-{ID}.scope\n"
            ),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::Containerd),
        },
        Case {
            name: "v2 systemd containerd guaranteed (no qos slice)",
            content: format!(
                "0::/kubepods.slice/kubepods-pod{uid_us}.slice/cri-containerd-{ID}.scope\n"
            ),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::Containerd),
        },
        Case {
            name: "v2 systemd CRI-O besteffort",
            content: format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_us}.slice/crio-{ID}.scope\n"
            ),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::CriO),
        },
        Case {
            name: "v2 CRI-O conmon is not the container",
            content: format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_us}.slice/crio-conmon-{ID}.scope\n"
            ),
            container: None,
            pod: Some(UID),
            runtime: None,
        },
        Case {
            name: "v1 cgroupfs kubelet (containerd), hybrid hierarchy",
            content: format!(
                "12:memory:/kubepods/burstable/pod{UID}/{ID}\n\
                 11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
                 1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
                 0::/\n"
            ),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::Unknown),
        },
        Case {
            name: "v1 cgroupfs CRI-O",
            content: format!("4:devices:/kubepods/besteffort/pod{UID}/crio-{ID}\n"),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::CriO),
        },
        Case {
            name: "v1 systemd containerd",
            content: format!(
                "10:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_us}.slice/cri-containerd-{ID}.scope\n"
            ),
            container: Some(ID),
            pod: Some(UID),
            runtime: Some(ContainerRuntime::Containerd),
        },
        Case {
            name: "docker cgroupfs v1",
            content: format!("13:pids:/docker/{ID}\n12:memory:/docker/{ID}\n"),
            container: Some(ID),
            pod: None,
            runtime: Some(ContainerRuntime::Unknown),
        },
        Case {
            name: "docker systemd v2",
            content: format!("0::/system.slice/docker-{ID}.scope\n"),
            container: Some(ID),
            pod: None,
            runtime: Some(ContainerRuntime::Docker),
        },
        Case {
            name: "podman v2",
            content: format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
            ),
            container: Some(ID),
            pod: None,
            runtime: Some(ContainerRuntime::Podman),
        },
        Case {
            name: "host process, v2",
            content: "0::/system.slice/sshd.service\n".into(),
            container: None,
            pod: None,
            runtime: None,
        },
        Case {
            name: "host process, v1 with a colon in the path and garbage lines",
            content: "garbage\n5:name=systemd:/user.slice/a:b\n\n".into(),
            container: None,
            pod: None,
            runtime: None,
        },
        Case {
            name: "a short hex segment is not an id",
            content: "0::/docker/4f5c1a8b9e2d\n".into(),
            container: None,
            pod: None,
            runtime: None,
        },
    ]
}

#[test]
fn cgroup_formats() {
    for case in cases() {
        let got = parse_cgroup(&case.content);
        assert_eq!(
            got.container_id.as_deref(),
            case.container,
            "{}: container id",
            case.name
        );
        assert_eq!(got.pod_uid.as_deref(), case.pod, "{}: pod uid", case.name);
        assert_eq!(got.runtime, case.runtime, "{}: runtime", case.name);
    }
}

#[test]
fn stat_start_time_survives_odd_command_names() {
    // Fields after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime ...
    let stat = "4242 (python3 (vllm) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 50 10 0 0 20 0 \
                12 0 987654 123456789 3000 18446744073709551615";
    assert_eq!(parse_stat_start_ticks(stat), Some(987_654));
    assert_eq!(parse_stat_parent(stat), Some(1));
    assert_eq!(parse_stat_start_ticks("1 (x) S 1 2"), None, "truncated");
    assert_eq!(parse_stat_start_ticks("no parenthesis"), None);
    assert_eq!(
        parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
        Some(1_700_000_000)
    );
    assert_eq!(parse_boot_time("cpu 1 2\n"), None);
    assert_eq!(
        start_time_nanos(1_700_000_000, 250, 100),
        1_700_000_002_500_000_000
    );
}

#[test]
fn reads_this_process_and_caches_it() {
    let mut reader = ProcReader::new("/proc", 2);
    let pid = std::process::id();
    let me = reader.identity(pid).expect("own identity");
    assert_eq!(me.pid, pid);
    assert!(me.executable.is_some(), "comm is readable: {me:?}");
    let start = me.start_time.expect("start time from /proc/stat btime");
    assert!(start > 1_600_000_000_000_000_000, "plausible start {start}");
    assert!(
        reader.identity_if_new(pid).is_none(),
        "second sighting is cached"
    );
    let _ = reader.identity(1);
    let _ = reader.identity_if_new(u32::MAX);
    assert!(reader.cached() <= 2, "the cache is bounded");
    assert!(
        matches!(reader.identity(u32::MAX), Err(ProcfsError::Read { .. })),
        "a missing pid is a read error"
    );
}

/// A fake procfs root holding one process whose `stat` says it started at `start_ticks`.
fn fake_proc(name: &str, pid: u32, start_ticks: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("iw-procfs-{name}-{}", std::process::id()));
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).expect("fake /proc/<pid>");
    write_stat(&root, pid, start_ticks);
    std::fs::write(dir.join("comm"), "vllm\n").expect("comm");
    root
}

fn write_stat(root: &Path, pid: u32, start_ticks: u64) {
    // Fields 3..=21 (state .. itrealvalue), then 22: starttime.
    let stat = format!(
        "{pid} (vllm) S 1 {} {start_ticks} 0 0\n",
        ["0"; 17].join(" ")
    );
    std::fs::write(root.join(pid.to_string()).join("stat"), stat).expect("stat");
}

#[test]
fn a_cached_identity_is_trusted_for_the_recheck_interval() {
    let pid = 4242;
    let root = fake_proc("trusted", pid, 500);
    let mut reader = ProcReader::new(&root, 8).with_recheck(Duration::from_secs(3600));
    assert!(reader.identity_if_new(pid).is_some(), "first sighting");
    // Within the interval the cache answers without reading: even a gone process.
    std::fs::remove_file(root.join(pid.to_string()).join("stat")).expect("rm stat");
    assert!(reader.identity_if_new(pid).is_none(), "cached, not read");
    assert_eq!(reader.identity(pid).expect("cached").pid, pid);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_reused_pid_is_told_apart_once_the_interval_passed() {
    let pid = 4243;
    let root = fake_proc("reused", pid, 500);
    let mut reader = ProcReader::new(&root, 8).with_recheck(Duration::ZERO);
    let first = reader.identity_if_new(pid).expect("first sighting");
    assert!(
        reader.identity_if_new(pid).is_none(),
        "same start time: cached"
    );
    write_stat(&root, pid, 900);
    let second = reader
        .identity_if_new(pid)
        .expect("a new process under the same pid");
    assert_ne!(first.start_time, second.start_time);
    let _ = std::fs::remove_dir_all(&root);
}

/// A real grandchild (`sh` -> `sleep`): its lineage runs up through `sh` to this process, the
/// oldest ancestor first, each identity once.
#[test]
fn lineage_reads_the_real_ppid_chain_once() {
    use std::io::{BufRead, BufReader};
    let mut sh = std::process::Command::new("sh")
        .args(["-c", "sleep 30 & echo $!; wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    let mut line = String::new();
    BufReader::new(sh.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the grandchild's pid");
    let sleep: u32 = line.trim().parse().expect("a pid");
    let mut reader = ProcReader::new("/proc", 64);
    let lineage = reader.lineage_if_new(sleep);
    let pids: Vec<u32> = lineage.iter().map(|i| i.pid).collect();
    let n = pids.len();
    assert!(n >= 3, "sleep, sh, this test and more: {pids:?}");
    assert_eq!(
        &pids[n - 3..],
        &[std::process::id(), sh.id(), sleep],
        "oldest first"
    );
    assert_eq!(lineage[n - 1].parent_pid, Some(sh.id()));
    assert_eq!(lineage[n - 2].parent_pid, Some(std::process::id()));
    assert!(
        lineage.iter().all(|i| i.pid > 1),
        "init is not part of a lineage"
    );
    assert!(reader.lineage_if_new(sleep).is_empty(), "all cached");
    // SAFETY: kill(2) on a child this test started.
    unsafe {
        libc::kill(sleep as libc::pid_t, libc::SIGKILL);
    }
    let _ = sh.kill();
    let _ = sh.wait();
}
