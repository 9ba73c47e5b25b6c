// SPDX-License-Identifier: GPL-2.0-only
/*
 * inferwatch: process exits and the kernel's OOM kills (contract §3.5, requests lost in flight).
 *
 *   sched_process_exit   the last thread of a process exits: its exit code (or the signal that
 *                        killed it) and its parent
 *   mark_victim          the OOM killer chose a process; its SIGKILL and exit follow
 *
 * BTF tracepoints (tp_btf), like tcp_lifecycle.bpf.c: typed arguments, no tracefs. Both fire
 * rarely (a process exit, an OOM kill), so the programs emit every whole-process exit of the
 * node and the agent keeps those of runtime processes: a few hundred exits a second cost
 * nothing next to the socket programs, and the agent need not tell the kernel which processes
 * it watches. sched_process_exit runs before the process's files are closed (do_exit: exit_mm,
 * then the tracepoint, then exit_files), so its event precedes the server-side closes of its
 * connections.
 *
 * Minimum kernel: the tp_btf tracepoints with a task_struct first argument: sched_process_exit
 * always; mark_victim since 6.8 (before, its argument was a pid: told apart by CO-RE below).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "inferwatch_events.h"

char LICENSE[] SEC("license") = "GPL";

/* Only the fields read, relocated by name against the running kernel (CO-RE). */
typedef struct {
	int counter;
} iw_atomic_t;

struct signal_struct {
	iw_atomic_t live;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	int exit_code;
	struct signal_struct *signal;
	struct task_struct *real_parent;
} __attribute__((preserve_access_index));

/* mark_victim's trace record: `uid` is there since 6.8, when the tracepoint's argument
 * became the task instead of its pid. */
struct trace_event_raw_mark_victim {
	int pid;
	__u32 uid;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} exit_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} exit_drops SEC(".maps");

static __always_inline void count_drop(void)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&exit_drops, &key);
	if (n)
		*n += 1;
}

static __always_inline void fill_header(struct iw_event_header *hdr, __u16 type, __u16 size,
					__u32 tgid)
{
	hdr->type = type;
	hdr->size = size;
	hdr->tgid = tgid;
	hdr->ts_ns = bpf_ktime_get_ns();
	hdr->conn = 0;
}

/* BPF_PROG's expansion leaves its ctx argument unused. */
#pragma clang diagnostic ignored "-Wunused-parameter"

SEC("tp_btf/sched_process_exit")
int BPF_PROG(iw_sched_process_exit, struct task_struct *p)
{
	/* The thread group is dead when its last thread exits: signal->live reached 0 just
	 * before this tracepoint. Earlier threads' exits are not the process's. */
	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	struct iw_process_exit_event *ev = bpf_ringbuf_reserve(&exit_events, sizeof(*ev), 0);
	if (!ev) {
		count_drop();
		return 0;
	}
	fill_header(&ev->hdr, IW_EVENT_PROCESS_EXIT, sizeof(*ev), (__u32)BPF_CORE_READ(p, tgid));
	ev->exit_code = (__u32)BPF_CORE_READ(p, exit_code);
	ev->ppid = (__u32)BPF_CORE_READ(p, real_parent, tgid);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tp_btf/mark_victim")
int BPF_PROG(iw_mark_victim, __u64 arg0)
{
	__u32 tgid;
	if (bpf_core_field_exists(struct trace_event_raw_mark_victim, uid)) {
		struct task_struct *task = (struct task_struct *)arg0;
		tgid = (__u32)BPF_CORE_READ(task, tgid);
	} else {
		/* Before 6.8 the argument was the victim's pid (its tgid: the OOM killer picks a
		 * process). */
		tgid = (__u32)arg0;
	}
	struct iw_oom_victim_event *ev = bpf_ringbuf_reserve(&exit_events, sizeof(*ev), 0);
	if (!ev) {
		count_drop();
		return 0;
	}
	fill_header(&ev->hdr, IW_EVENT_OOM_VICTIM, sizeof(*ev), tgid);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}
