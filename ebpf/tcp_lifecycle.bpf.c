// SPDX-License-Identifier: GPL-2.0-only
/*
 * inferwatch: the TCP request lifecycle of watched servers.
 *
 * Attaches only to tracepoints (kprobes and fentry are unavailable on many hardened kernels):
 *   sock/inet_sock_set_state   handshake done on a watched port, peer FIN, TCP_CLOSE, listen()
 *   tcp/tcp_receive_reset      peer RST
 *   syscalls/sys_exit_accept*  bind (tgid, fd) to the accepted socket
 *   syscalls/sys_{enter,exit}_{read,readv,recvfrom,recvmsg}   first bytes of each request
 *   syscalls/sys_{enter,exit}_{write,writev,sendto,sendmsg}   writes after the peer left
 *   syscalls/sys_enter_close   the server closed its fd
 *
 * Filtering happens here, not in userspace: a connection is tracked only when its handshake
 * completes on a port in `watched_ports`; every socket syscall costs one hash lookup of
 * (tgid, fd) in `fds` and returns at once for anything else.
 *
 * Mapping (tgid, fd) to the socket: at accept exit, walk current->files->fdt->fd[fd] ->
 * file->private_data (struct socket) -> sk with CO-RE reads, and keep the binding if `sk` is a
 * tracked connection. That is four probe reads once per connection; the alternative (a /proc
 * scan per connection from userspace) would be racy against short connections and far dearer.
 *
 * Minimum kernel: 5.8 (BPF ring buffer), BTF for CO-RE.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "inferwatch_events.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

#define TCP_ESTABLISHED 1
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LISTEN 10


/* pending_io.kind */
#define IO_READ 1
#define IO_WRITE 2

#define MAX_CONNS 65536
#define MAX_PENDING 16384

/* Two separate words rather than one flags word: each is written by a plain store from one
 * side (syscall context or softirq), so no read-modify-write can lose the other's update and
 * no BPF atomics (kernel >= 5.12) are needed. */
struct conn_state {
	__u32 expect_head; /* the next read that starts with a method is a request head */
	__u32 peer_closed; /* the peer sent FIN or RST */
	__u32 accepted;    /* a server fd is bound to it */
	__u32 fd_closed;   /* the server closed that fd */
	__u32 sock_closed; /* the socket reached TCP_CLOSE */
	/* Server writes since the last request head: tells a response that was streaming when
	 * the peer left (> 0) from one not yet started (0), e.g. a non-streaming request whose
	 * whole body is one write at the end. Written from syscall context only. */
	__u32 writes_since_head;
	__u16 family;
	__u16 local_port;
	__u16 peer_port;
	__u16 _pad;
	__u8 local_addr[16];
	__u8 peer_addr[16];
};

struct pending_io {
	__u64 sk;
	__u64 buf;     /* user buffer of the read (first iovec for readv / recvmsg) */
	__u64 buf_len; /* its length */
	__u64 start_ns; /* when the syscall entered */
	__s32 fd;
	__u32 kind;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, IW_MAX_WATCHED_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} watched_ports SEC(".maps");

/* Tracked connections, keyed by the struct sock address. LRU: a connection whose TCP_CLOSE we
 * missed cannot pin an entry forever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, __u64);
	__type(value, struct conn_state);
} conns SEC(".maps");

/* (tgid << 32 | fd) -> struct sock address, for accepted watched connections. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, __u64);
	__type(value, __u64);
} fds SEC(".maps");

/* Syscall arguments kept from enter to exit, per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PENDING);
	__type(key, __u64);
	__type(value, struct pending_io);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024); /* resized by the loader from the config */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IW_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &which);
	if (v)
		*v += 1;
}

static __always_inline void *reserve(__u64 size)
{
	void *ev = bpf_ringbuf_reserve(&events, size, 0);
	if (!ev)
		count(IW_COUNTER_RINGBUF_DROPS);
	return ev;
}

static __always_inline void fill_header(struct iw_event_header *hdr, __u16 type, __u16 size,
					__u32 tgid, __u64 conn)
{
	hdr->type = type;
	hdr->size = size;
	hdr->tgid = tgid;
	hdr->ts_ns = bpf_ktime_get_ns();
	hdr->conn = conn;
}

static __always_inline __u32 current_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int port_watched(__u16 port)
{
	return bpf_map_lookup_elem(&watched_ports, &port) != NULL;
}

static __always_inline void emit_peer_closed(__u64 sk, __u32 how, __u32 writes_since_head)
{
	struct iw_peer_closed_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return;
	fill_header(&ev->hdr, IW_EVENT_PEER_CLOSED, sizeof(*ev), 0, sk);
	ev->how = how;
	ev->writes_since_head = writes_since_head;
	bpf_ringbuf_submit(ev, 0);
}

SEC("tracepoint/sock/inet_sock_set_state")
int iw_inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u16 protocol = BPF_CORE_READ(ctx, protocol);
	if (protocol != IPPROTO_TCP)
		return 0;

	__u64 sk = (__u64)BPF_CORE_READ(ctx, skaddr);
	int oldstate = BPF_CORE_READ(ctx, oldstate);
	int newstate = BPF_CORE_READ(ctx, newstate);
	__u16 sport = BPF_CORE_READ(ctx, sport);

	if (newstate == TCP_LISTEN) {
		/* listen() runs in process context: the current task is the server. */
		if (!port_watched(sport))
			return 0;
		struct iw_listen_event *ev = reserve(sizeof(*ev));
		if (!ev)
			return 0;
		fill_header(&ev->hdr, IW_EVENT_LISTEN, sizeof(*ev), current_tgid(), sk);
		ev->family = BPF_CORE_READ(ctx, family);
		ev->port = sport;
		ev->_pad = 0;
		bpf_ringbuf_submit(ev, 0);
		return 0;
	}

	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		/* Passive open completed (softirq context: no pid). Track it when the local port
		 * is watched; the accept() exit binds it to the server's fd. */
		if (!port_watched(sport))
			return 0;
		struct conn_state st = {};
		st.expect_head = 1;
		st.family = BPF_CORE_READ(ctx, family);
		st.local_port = sport;
		st.peer_port = BPF_CORE_READ(ctx, dport);
		if (st.family == AF_INET6) {
			bpf_probe_read_kernel(st.local_addr, 16, &ctx->saddr_v6);
			bpf_probe_read_kernel(st.peer_addr, 16, &ctx->daddr_v6);
		} else {
			bpf_probe_read_kernel(st.local_addr, 4, &ctx->saddr);
			bpf_probe_read_kernel(st.peer_addr, 4, &ctx->daddr);
		}
		if (bpf_map_update_elem(&conns, &sk, &st, BPF_ANY))
			count(IW_COUNTER_CONN_TABLE_FULL);
		return 0;
	}

	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (!st)
		return 0;

	if (newstate == TCP_CLOSE_WAIT) {
		/* The peer's FIN arrived on an established connection. */
		if (!st->peer_closed) {
			st->peer_closed = 1;
			emit_peer_closed(sk, IW_CLOSE_FIN, st->writes_since_head);
		}
		return 0;
	}

	if (newstate == TCP_CLOSE) {
		struct iw_closed_event *ev = reserve(sizeof(*ev));
		if (ev) {
			fill_header(&ev->hdr, IW_EVENT_CLOSED, sizeof(*ev), 0, sk);
			bpf_ringbuf_submit(ev, 0);
		}
		/* While the server still holds an fd, keep the entry: its writes to the dead
		 * socket (EPIPE) are writes after the peer left, and count. close() forgets it. */
		if (st->accepted && !st->fd_closed)
			st->sock_closed = 1;
		else
			bpf_map_delete_elem(&conns, &sk);
	}
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int iw_tcp_receive_reset(struct trace_event_raw_tcp_event_sk *ctx)
{
	__u64 sk = (__u64)BPF_CORE_READ(ctx, skaddr);
	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (!st || st->peer_closed)
		return 0;
	st->peer_closed = 1;
	emit_peer_closed(sk, IW_CLOSE_RST, st->writes_since_head);
	return 0;
}

/* The struct sock behind `fd` of the current task, or 0. */
static __always_inline __u64 sock_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt)
		return 0;
	unsigned int max_fds = BPF_CORE_READ(fdt, max_fds);
	if (fd < 0 || (unsigned int)fd >= max_fds)
		return 0;
	struct file **fdarr = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fdarr[fd]) || !file)
		return 0;
	struct socket *sock = BPF_CORE_READ(file, private_data);
	if (!sock)
		return 0;
	/* A non-socket file gives some other pointer here; it will not be in `conns`. */
	return (__u64)BPF_CORE_READ(sock, sk);
}

static __always_inline int on_accept_exit(long ret)
{
	if (ret < 0)
		return 0;
	int fd = (int)ret;
	__u64 sk = sock_of_fd(fd);
	if (!sk)
		return 0;
	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (!st)
		return 0;
	__u32 tgid = current_tgid();
	__u64 key = ((__u64)tgid << 32) | (__u32)fd;
	if (bpf_map_update_elem(&fds, &key, &sk, BPF_ANY))
		count(IW_COUNTER_CONN_TABLE_FULL);
	st->accepted = 1;

	struct iw_accepted_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_ACCEPTED, sizeof(*ev), tgid, sk);
	ev->fd = fd;
	ev->family = st->family;
	ev->local_port = st->local_port;
	ev->peer_port = st->peer_port;
	ev->_pad[0] = 0;
	ev->_pad[1] = 0;
	ev->_pad[2] = 0;
	__builtin_memcpy(ev->local_addr, st->local_addr, 16);
	__builtin_memcpy(ev->peer_addr, st->peer_addr, 16);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}


/* The tracked socket behind the current task's `fd`, or 0. */
static __always_inline __u64 watched_sock(int fd)
{
	__u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)fd;
	__u64 *sk = bpf_map_lookup_elem(&fds, &key);
	return sk ? *sk : 0;
}

/* Remembers a read on a connection that expects a request head. `iov` selects how `arg` is
 * read: 0 a plain buffer, 1 an iovec array, 2 a user_msghdr. */
static __always_inline int on_read_enter(struct pt_regs *regs, int iov)
{
	int fd = (int)BPF_CORE_READ(regs, di);
	__u64 sk = watched_sock(fd);
	if (!sk)
		return 0;
	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (!st || !st->expect_head)
		return 0;

	struct pending_io p = {};
	p.sk = sk;
	p.fd = fd;
	p.kind = IO_READ;
	__u64 arg = BPF_CORE_READ(regs, si);
	if (iov == 0) {
		p.buf = arg;
		p.buf_len = BPF_CORE_READ(regs, dx);
	} else {
		struct iovec *vec = (struct iovec *)arg;
		if (iov == 2) {
			struct user_msghdr msg = {};
			if (bpf_probe_read_user(&msg, sizeof(msg), (void *)arg))
				return 0;
			vec = msg.msg_iov;
		}
		struct iovec first = {};
		if (bpf_probe_read_user(&first, sizeof(first), vec))
			return 0;
		p.buf = (__u64)first.iov_base;
		p.buf_len = first.iov_len;
	}
	__u64 id = bpf_get_current_pid_tgid();
	bpf_map_update_elem(&pending, &id, &p, BPF_ANY);
	return 0;
}

/* True when `b` starts like an HTTP/1.x request line. */
static __always_inline int looks_like_request(const __u8 *b)
{
	switch (b[0]) {
	case 'G': return b[1] == 'E' && b[2] == 'T' && b[3] == ' ';
	case 'P': return (b[1] == 'O' && b[2] == 'S' && b[3] == 'T') ||
			 (b[1] == 'U' && b[2] == 'T' && b[3] == ' ') ||
			 (b[1] == 'A' && b[2] == 'T' && b[3] == 'C');
	case 'H': return b[1] == 'E' && b[2] == 'A' && b[3] == 'D';
	case 'D': return b[1] == 'E' && b[2] == 'L' && b[3] == 'E';
	case 'O': return b[1] == 'P' && b[2] == 'T' && b[3] == 'I';
	}
	return 0;
}

/* Takes the current thread's syscall remembered at enter out of `pending` into `io`; true
 * when there was one of `kind`. */
static __always_inline int take_pending(__u64 id, __u32 kind, struct pending_io *io)
{
	struct pending_io *p = bpf_map_lookup_elem(&pending, &id);
	if (!p)
		return 0;
	*io = *p;
	bpf_map_delete_elem(&pending, &id);
	return io->kind == kind;
}

static __always_inline int on_read_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io = {};
	if (!take_pending(id, IO_READ, &io) || ret <= 0)
		return 0;

	__u8 start[4] = {};
	if (bpf_probe_read_user(start, sizeof(start), (void *)io.buf))
		return 0;
	if (!looks_like_request(start))
		return 0;

	struct conn_state *st = bpf_map_lookup_elem(&conns, &io.sk);
	if (!st)
		return 0;
	/* One head per request: re-armed by the server's next write. */
	st->expect_head = 0;
	st->writes_since_head = 0;

	__u64 n = (__u64)ret;
	if (n > io.buf_len)
		n = io.buf_len;
	/* IW_HEAD_MAX - 1 so that the mask below keeps the length and proves the bound. */
	if (n > IW_HEAD_MAX - 1)
		n = IW_HEAD_MAX - 1;

	struct iw_request_head_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_REQUEST_HEAD, sizeof(*ev), id >> 32, io.sk);
	ev->fd = io.fd;
	ev->read_len = (__u64)ret;
	if (bpf_probe_read_user(ev->data, n & (IW_HEAD_MAX - 1), (void *)io.buf))
		n = 0;
	ev->len = (__u32)n;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}


static __always_inline int on_write_enter(struct pt_regs *regs)
{
	int fd = (int)BPF_CORE_READ(regs, di);
	__u64 sk = watched_sock(fd);
	if (!sk)
		return 0;
	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (!st)
		return 0;
	/* The server answers: its next read that starts with a method is a new request. */
	if (!st->expect_head)
		st->expect_head = 1;
	if (st->writes_since_head < 0xffffffff)
		st->writes_since_head++;
	if (!st->peer_closed)
		return 0;
	struct pending_io p = {};
	p.sk = sk;
	p.fd = fd;
	p.kind = IO_WRITE;
	p.start_ns = bpf_ktime_get_ns();
	__u64 id = bpf_get_current_pid_tgid();
	bpf_map_update_elem(&pending, &id, &p, BPF_ANY);
	return 0;
}

static __always_inline int on_write_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending_io io = {};
	if (!take_pending(id, IO_WRITE, &io))
		return 0;

	struct iw_write_after_peer_close_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_WRITE_AFTER_PEER_CLOSE, sizeof(*ev), id >> 32, io.sk);
	/* Stamp the write when it started: on loopback the peer's RST can close the socket
	 * (and emit CLOSED) while this write is still in the kernel, so the record may follow
	 * CLOSED in the ring, but its time says the write began before. */
	ev->hdr.ts_ns = io.start_ns;
	ev->fd = io.fd;
	ev->err = ret < 0 ? (__s32)-ret : 0;
	ev->bytes = ret > 0 ? (__u64)ret : 0;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}


static __always_inline int on_close_enter(struct pt_regs *regs)
{
	int fd = (int)BPF_CORE_READ(regs, di);
	__u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (__u32)fd;
	__u64 *skp = bpf_map_lookup_elem(&fds, &key);
	if (!skp)
		return 0;
	__u64 sk = *skp;
	bpf_map_delete_elem(&fds, &key);
	struct conn_state *st = bpf_map_lookup_elem(&conns, &sk);
	if (st) {
		if (st->sock_closed)
			bpf_map_delete_elem(&conns, &sk);
		else
			st->fd_closed = 1;
	}
	struct iw_local_closed_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_LOCAL_CLOSED, sizeof(*ev), key >> 32, sk);
	ev->fd = fd;
	ev->_pad = 0;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_READV 19
#define NR_WRITEV 20
#define NR_ACCEPT 43
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define NR_ACCEPT4 288

/*
 * The socket syscalls hang off the two raw syscall tracepoints rather than the per-syscall
 * `syscalls/sys_{enter,exit}_*` events: those build a perf trace record (copying every
 * argument) before the program runs, for each of the 15 syscalls, which cost a syscall-bound
 * server ~20% of its throughput in `cargo xtask bench kernel`. A raw tracepoint hands the
 * program the saved registers directly; one switch on the syscall number dispatches.
 */
/* BPF_PROG's wrapper takes the raw `ctx` that these bodies do not use. */
#pragma clang diagnostic ignored "-Wunused-parameter"

SEC("raw_tracepoint/sys_enter")
int BPF_PROG(iw_sys_enter, struct pt_regs *regs, long id)
{
	switch (id) {
	case NR_READ:
	case NR_RECVFROM:
		return on_read_enter(regs, 0);
	case NR_READV:
		return on_read_enter(regs, 1);
	case NR_RECVMSG:
		return on_read_enter(regs, 2);
	case NR_WRITE:
	case NR_SENDTO:
	case NR_WRITEV:
	case NR_SENDMSG:
		return on_write_enter(regs);
	case NR_CLOSE:
		return on_close_enter(regs);
	}
	return 0;
}

SEC("raw_tracepoint/sys_exit")
int BPF_PROG(iw_sys_exit, struct pt_regs *regs, long ret)
{
	long id = BPF_CORE_READ(regs, orig_ax);
	switch (id) {
	case NR_ACCEPT:
	case NR_ACCEPT4:
		return on_accept_exit(ret);
	case NR_READ:
	case NR_RECVFROM:
	case NR_READV:
	case NR_RECVMSG:
		return on_read_exit(ret);
	case NR_WRITE:
	case NR_SENDTO:
	case NR_WRITEV:
	case NR_SENDMSG:
		return on_write_exit(ret);
	}
	return 0;
}
