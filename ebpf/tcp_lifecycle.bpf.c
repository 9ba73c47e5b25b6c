// SPDX-License-Identifier: GPL-2.0-only
/*
 * inferwatch: the TCP request lifecycle of watched servers.
 *
 * No syscall hooks. Attaching anything to the syscall tracepoints (per-syscall trace events or
 * the raw sys_enter/sys_exit) sets the tracing flag on every task of the node, and from then on
 * every syscall of every process takes the kernel's slow entry path: that cost a syscall-bound
 * server 18-20% of its throughput in `cargo xtask bench kernel`. Everything here hangs off raw
 * BTF tracepoints (tp_btf) that fire only for sockets:
 *
 *   inet_sock_set_state   listen(), handshake done on a watched port (Accepted), peer FIN, our
 *                         FIN (LocalClosed), TCP_CLOSE (and the mark of a reset connection)
 *   tcp_receive_reset     peer RST
 *   sock_recv_length      every socket receive that returned: a read that starts a request
 *                         (RequestHead), its bytes read from the reader's own buffer
 *   sock_send_length      every socket send that returned: writes after the peer left
 *   tcp_destroy_sock      the socket is released: LocalClosed if it was marked (no FIN sent)
 *
 * BTF tracepoints rather than the trace events of the same names: the program gets the
 * tracepoint's arguments directly, without a perf trace record built (and every address
 * copied) first; the arguments are typed, so the socket's fields are plain loads and the socket
 * can key socket-local storage; and they need no tracefs.
 *
 * A connection is watched when its socket is TCP, not a listener, and its local port is in the
 * watched set: a test of a few loads and one inlined array lookup, and the send and receive
 * programs, which run for every socket send and receive on the node, return after it for
 * anything else. The programs keep no per-connection state in the common case: what they need
 * is in the socket itself (its state, sk_shutdown, write_seq). Allocating socket storage for
 * every connection and freeing it cost more than all their other work (kernel.bpf_stats_enabled,
 * program run time per request of the kernel bench: 8.5 us with it, 5.4 us without); a
 * connection gets storage only when it closes without our FIN (a reset), to report its
 * release. Events are keyed by the struct sock address, from the handshake to the release, so
 * no (tgid, fd) mapping is needed.
 *
 * Minimum kernel: 6.3 (sock_send_length / sock_recv_length), BTF for CO-RE. x86_64 (the
 * syscall registers read in the receive program).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#include "inferwatch_events.h"

char LICENSE[] SEC("license") = "GPL";

/* Diagnostic builds for `cargo xtask bench kernel --floor` only (set through
 * INFERWATCH_EBPF_CFLAGS, never in a normal build): IW_DIAG_EMPTY makes every program return at
 * once, so the bench measures what the attachments alone cost; IW_DIAG_NO_RING runs everything
 * but writes no record, which measures the ring's share. */
#ifdef IW_DIAG_EMPTY
#define IW_DIAG_RETURN return 0
#else
#define IW_DIAG_RETURN do {} while (0)
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

#define TCP_ESTABLISHED 1
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11

#define RCV_SHUTDOWN 1


struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IW_PORT_BITMAP_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} watched_ports SEC(".maps");

/* Watched connections that reached TCP_CLOSE without our FIN (a reset, either way), awaiting
 * their release, which is then the server's close (LocalClosed). An entry's presence is the
 * mark; its value is the response's sends at the reset (IW_SENDS_UNKNOWN when not counted),
 * which the LocalClosed carries. Socket-local storage: the kernel frees it with the socket, so
 * none can leak and none needs deleting. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} release_marks SEC(".maps");

/* The response under way on a watched connection: its sends so far, and how many of its first
 * sends are still to capture (IW_RESPONSE_WRITES after each request head). */
struct iw_response_state {
	__u32 sends;
	__u8 captures_left;
	__u8 _pad[3];
};

/* The response under way on each watched connection, by socket address. An entry lives from a
 * request head (the next head starts it again) to the server's close (our FIN, or the reset),
 * when its count goes out with the LocalClosed and it is deleted; beyond
 * IW_RESPONSE_PENDING_MAX connections the least recently used is evicted (its response's count
 * is then unknown). A hash rather than socket storage: no allocation per connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, IW_RESPONSE_PENDING_MAX);
	__type(key, __u64);
	__type(value, struct iw_response_state);
} response_pending SEC(".maps");

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

/* Request heads are built here and copied into the ring at their real length (a few hundred
 * bytes, against the 2 KiB a fixed-size record would reserve), so the ring holds about four
 * times as many of them. Per CPU: a program is not preempted while it runs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct iw_request_head_event);
} head_scratch SEC(".maps");

/* Response heads are built here the same way. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct iw_response_head_event);
} response_scratch SEC(".maps");

static __always_inline void *reserve(__u64 size)
{
#ifdef IW_DIAG_NO_RING
	return 0;
#endif
	void *ev = bpf_ringbuf_reserve(&events, size, 0);
	if (!ev)
		count(IW_COUNTER_RINGBUF_DROPS);
	return ev;
}

/*
 * Publishes a reserved event. The reader is woken only once the ring is a quarter full; below
 * that it drains on its own timer (kernel.poll_interval_ms). A wakeup per event costs an
 * irq_work self-IPI, a VM exit on virtual machines: measured at ~3 us per event here, it was
 * most of the programs' cost.
 */
static __always_inline __u64 wakeup_flags(void)
{
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >=
	    bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) / 4)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline void submit(void *ev)
{
	bpf_ringbuf_submit(ev, wakeup_flags());
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

/* Bytes the server has written on the connection (tcp_sock.write_seq, mod 2^32). Compared
 * between a request head and the peer's close, it says whether the response had started. */
static __always_inline __u32 send_seq(struct sock *sock)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sock);
	return tp ? tp->write_seq : 0;
}

static __always_inline int port_watched(__u16 port)
{
	__u32 word = port >> 6;
	__u64 *bits = bpf_map_lookup_elem(&watched_ports, &word);
	return bits && (*bits & (1ULL << (port & 63)));
}

static __always_inline void emit_peer_closed(struct sock *sock, __u32 how)
{
	struct iw_peer_closed_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return;
	fill_header(&ev->hdr, IW_EVENT_PEER_CLOSED, sizeof(*ev), 0, (__u64)sock);
	ev->how = how;
	ev->send_seq = send_seq(sock);
	submit(ev);
}

static __always_inline void emit_simple(__u16 type, __u32 tgid, __u64 sk)
{
	struct iw_event_header *ev = reserve(sizeof(*ev));
	if (!ev)
		return;
	fill_header(ev, type, sizeof(*ev), tgid, sk);
	submit(ev);
}

static __always_inline int on_established(struct sock *sock, __u16 sport)
{
	__u64 sk = (__u64)sock;
	struct iw_accepted_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_ACCEPTED, sizeof(*ev), 0, sk);
	/* The socket is a typed (BTF) argument: its fields are plain loads, no read helper. */
	struct sock_common *skc = &sock->__sk_common;
	__u16 family = skc->skc_family;
	ev->family = family;
	ev->local_port = sport;
	ev->peer_port = bpf_ntohs(skc->skc_dport);
	ev->_pad = 0;
	__builtin_memset(ev->local_addr, 0, sizeof(ev->local_addr));
	__builtin_memset(ev->peer_addr, 0, sizeof(ev->peer_addr));
	if (family == AF_INET6) {
		/* Whole 16-byte fields: the helper copies them as they are (the kernel's in6_addr
		 * is a union that the local type does not spell out). */
		BPF_CORE_READ_INTO(&ev->local_addr, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&ev->peer_addr, skc, skc_v6_daddr);
	} else {
		__u32 local = skc->skc_rcv_saddr, peer = skc->skc_daddr;
		__builtin_memcpy(ev->local_addr, &local, 4);
		__builtin_memcpy(ev->peer_addr, &peer, 4);
	}
	submit(ev);
	return 0;
}

/* The local port of a TCP socket when it is watched, else 0: another protocol (SCTP, DCCP and
 * MPTCP also report state changes here; Unix and UDP sockets send and receive) or a port not
 * in the set. */
static __always_inline __u16 watched_port(struct sock *sock)
{
	if (sock->sk_protocol != IPPROTO_TCP)
		return 0;
	__u16 sport = sock->__sk_common.skc_num;
	return port_watched(sport) ? sport : 0;
}

/* A connection of a watched server: TCP, on a watched local port, not the listener. The agent
 * only ever adds ports, so a connection watched once stays watched. Connections accepted
 * before the agent started are watched from then on, without an Accepted. */
static __always_inline int watched(struct sock *sock)
{
	return sock->__sk_common.skc_state != TCP_LISTEN && watched_port(sock);
}

/* The local port of a TCP socket in its transition to TCP_CLOSE, or 0. The kernel has released
 * the port by then and zeroed skc_num; inet_sport keeps it. inet_sock lies past struct sock,
 * beyond what a typed load of the argument may reach: one read helper, once per connection. */
static __always_inline __u16 closing_local_port(struct sock *sock)
{
	if (sock->sk_protocol != IPPROTO_TCP)
		return 0;
	return bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sock, inet_sport));
}

/* A reset connection of a watched server, still held by the server. Sockets without any BPF
 * storage (nearly all) are answered by one load, without the storage helper. */
static __always_inline __u32 *release_mark(struct sock *sock)
{
	if (!sock->sk_bpf_storage)
		return 0;
	return bpf_sk_storage_get(&release_marks, sock, 0, 0);
}

/* A request head was read: the server's next sends on this connection are its response. */
static __always_inline void expect_response(struct sock *sock)
{
	__u64 sk = (__u64)sock;
	struct iw_response_state state = { .sends = 0, .captures_left = IW_RESPONSE_WRITES };
	if (bpf_map_update_elem(&response_pending, &sk, &state, BPF_ANY))
		count(IW_COUNTER_CONN_STATE_ALLOC);
}

/* The sends of the response under way on `sock` (IW_SENDS_UNKNOWN without one); the entry is
 * deleted: the server closed the connection. */
static __always_inline __u32 take_response_sends(struct sock *sock)
{
	__u64 sk = (__u64)sock;
	struct iw_response_state *state = bpf_map_lookup_elem(&response_pending, &sk);
	if (!state)
		return IW_SENDS_UNKNOWN;
	__u32 sends = state->sends;
	bpf_map_delete_elem(&response_pending, &sk);
	return sends;
}

static __always_inline void emit_local_closed(struct sock *sock, __u32 response_sends)
{
	struct iw_local_closed_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return;
	fill_header(&ev->hdr, IW_EVENT_LOCAL_CLOSED, sizeof(*ev), current_tgid(), (__u64)sock);
	ev->response_sends = response_sends;
	ev->_pad = 0;
	submit(ev);
}

/* Our FIN went out in these states: a close from them is not a reset. */
static __always_inline int after_our_fin(int state)
{
	return state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 || state == TCP_CLOSING ||
	       state == TCP_LAST_ACK || state == TCP_TIME_WAIT;
}

/* BPF_PROG's wrapper takes the raw `ctx` that these bodies do not use. */
#pragma clang diagnostic ignored "-Wunused-parameter"

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(iw_inet_sock_set_state, struct sock *sock, int oldstate, int newstate)
{
	IW_DIAG_RETURN;
	__u64 sk = (__u64)sock;

	if (newstate == TCP_LISTEN) {
		/* listen() runs in process context: the current task is the server. */
		__u16 sport = watched_port(sock);
		if (!sport)
			return 0;
		struct iw_listen_event *ev = reserve(sizeof(*ev));
		if (!ev)
			return 0;
		fill_header(&ev->hdr, IW_EVENT_LISTEN, sizeof(*ev), current_tgid(), sk);
		ev->family = BPF_CORE_READ(sock, __sk_common.skc_family);
		ev->port = sport;
		ev->_pad = 0;
		submit(ev);
		return 0;
	}

	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		/* Passive open completed (softirq context: no pid). */
		__u16 sport = watched_port(sock);
		if (!sport)
			return 0;
		return on_established(sock, sport);
	}

	/* Every other transition of an established connection of a watched server. Each of
	 * these states is entered at most once per socket, so each event is emitted once. */
	if (oldstate == TCP_SYN_RECV || oldstate == TCP_LISTEN)
		return 0;
	if (newstate == TCP_CLOSE) {
		/* By now the kernel has released the socket's port (skc_num is 0). */
		if (!port_watched(closing_local_port(sock)))
			return 0;
	} else if (!watched(sock)) {
		return 0;
	}

	switch (newstate) {
	case TCP_CLOSE_WAIT:
		/* The peer's FIN arrived on an established connection. */
		emit_peer_closed(sock, IW_CLOSE_FIN);
		break;
	case TCP_FIN_WAIT1:
	case TCP_LAST_ACK:
		/* Our FIN: close() or shutdown() by the server, in its process context. */
		emit_local_closed(sock, take_response_sends(sock));
		break;
	case TCP_CLOSE:
		emit_simple(IW_EVENT_CLOSED, 0, sk);
		/* Closed without our FIN: a RST, received or sent. The server still holds the
		 * socket (its sends to it, EPIPE, are writes after the peer left, and count), and
		 * its close will send nothing: mark the socket so that its release reports it. */
		if (!after_our_fin(oldstate)) {
			__u32 sends = take_response_sends(sock);
			__u32 *mark = bpf_sk_storage_get(&release_marks, sock, &sends,
							 BPF_SK_STORAGE_GET_F_CREATE);
			if (!mark)
				count(IW_COUNTER_CONN_STATE_ALLOC);
		}
		break;
	}
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(iw_tcp_receive_reset, struct sock *sock)
{
	IW_DIAG_RETURN;
	if (!watched(sock))
		return 0;
	/* Before the kernel acts on it: the socket is still in the state the RST found. A peer
	 * that had sent FIN was reported then; a handshake the RST ends was never Accepted. */
	__u8 state = sock->__sk_common.skc_state;
	if (state == TCP_CLOSE_WAIT || state == TCP_LAST_ACK || state == TCP_SYN_RECV)
		return 0;
	emit_peer_closed(sock, IW_CLOSE_RST);
	return 0;
}

#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10

/*
 * A reset the kernel sent. Without a socket (`sock` NULL; kernels >= 6.10 trace those, reason
 * NO_SOCKET) it answers a segment to a port nothing holds, and a SYN there is a refused
 * connection attempt: a client, or a gateway retrying, that came before the server listened
 * (a cold start) or after it went away. Softirq context, no process: tgid and conn are 0.
 * The SYN's headers are read from the packet: `head` plus the offsets the IP layer set.
 */
SEC("tp_btf/tcp_send_reset")
int BPF_PROG(iw_tcp_send_reset, const struct sock *sock, const struct sk_buff *skb)
{
	IW_DIAG_RETURN;
	if (sock || !skb)
		return 0;
	unsigned char *head = skb->head;
	__u16 th_at = skb->transport_header, nh_at = skb->network_header;
	/* Ports (0..3) and flags (13) of the TCP header. */
	__u8 th[14];
	if (bpf_probe_read_kernel(th, sizeof(th), head + th_at))
		return 0;
	if (!(th[13] & TCPHDR_SYN) || (th[13] & TCPHDR_ACK))
		return 0;
	__u16 dport = ((__u16)th[2] << 8) | th[3];
	if (!port_watched(dport))
		return 0;
	__u8 version = 0;
	if (bpf_probe_read_kernel(&version, 1, head + nh_at))
		return 0;
	version >>= 4;
	if (version != 4 && version != 6)
		return 0;
	struct iw_refused_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_REFUSED, sizeof(*ev), 0, 0);
	ev->local_port = dport;
	ev->peer_port = ((__u16)th[0] << 8) | th[1];
	ev->_pad = 0;
	__builtin_memset(ev->local_addr, 0, sizeof(ev->local_addr));
	__builtin_memset(ev->peer_addr, 0, sizeof(ev->peer_addr));
	if (version == 6) {
		/* struct ipv6hdr: saddr at 8, daddr at 24. */
		ev->family = AF_INET6;
		bpf_probe_read_kernel(ev->peer_addr, 16, head + nh_at + 8);
		bpf_probe_read_kernel(ev->local_addr, 16, head + nh_at + 24);
	} else {
		/* struct iphdr: saddr at 12, daddr at 16. */
		ev->family = AF_INET;
		bpf_probe_read_kernel(ev->peer_addr, 4, head + nh_at + 12);
		bpf_probe_read_kernel(ev->local_addr, 4, head + nh_at + 16);
	}
	submit(ev);
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

/* x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the receives whose
 * buffer the receive program knows how to find. */
#define NR_READ 0
#define NR_READV 19
#define NR_RECVFROM 45
#define NR_RECVMSG 47

/*
 * Any socket receive that returned; process context: the receiving thread. On a watched
 * connection the bytes just received are read back from the caller's buffer, found through the
 * syscall's arguments in the task's saved user registers, and a read whose first bytes start
 * like a request line is a request head. That is what a sys_exit hook would see, without
 * hooking every syscall of the node. Receives that are not one of the four syscalls (io_uring,
 * recvmmsg) report no head.
 */
SEC("tp_btf/sock_recv_length")
int BPF_PROG(iw_sock_recv_length, struct sock *sock, int ret, int flags)
{
	IW_DIAG_RETURN;
	if (ret <= 0)
		return 0;
	__u64 sk = (__u64)sock;
	if (!watched(sock))
		return 0;

	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (!regs)
		return 0;
	__u64 buf = 0, buf_len = 0;
	struct iovec first = {};
	/* Each of the four takes the fd first and the buffer (or iovec, or msghdr) second. The
	 * registers are a typed (BTF) pointer: plain loads, no read helper. */
	int fd = (int)regs->di;
	switch (regs->orig_ax) {
	case NR_READ:
	case NR_RECVFROM:
		buf = regs->si;
		buf_len = regs->dx;
		break;
	case NR_READV:
		if (bpf_probe_read_user(&first, sizeof(first), (void *)regs->si))
			return 0;
		buf = (__u64)first.iov_base;
		buf_len = first.iov_len;
		break;
	case NR_RECVMSG: {
		/* msg_iov where the kernel's BTF places it (see capture_response). */
		struct user_msghdr *msg = (struct user_msghdr *)regs->si;
		__u64 iov = 0;
		if (bpf_core_read_user(&iov, sizeof(iov), &msg->msg_iov) ||
		    bpf_probe_read_user(&first, sizeof(first), (void *)iov))
			return 0;
		buf = (__u64)first.iov_base;
		buf_len = first.iov_len;
		break;
	}
	default:
		return 0;
	}

	__u8 start[4] = {};
	/* No state says which read starts a request: each read of a watched connection is
	 * tested, 4 bytes. A request body read on its own that starts with a method and a
	 * space is tested too, and userspace then drops it unless it is a whole request line
	 * ("METHOD target HTTP/1.x"). */
	if (bpf_probe_read_user(start, sizeof(start), (void *)buf) || !looks_like_request(start))
		return 0;

	__u64 n = (__u64)ret;
	if (n > buf_len)
		n = buf_len;
	/* IW_HEAD_MAX - 1 so that the mask below keeps the length and proves the bound. */
	if (n > IW_HEAD_MAX - 1)
		n = IW_HEAD_MAX - 1;
	__u32 zero = 0;
	struct iw_request_head_event *ev = bpf_map_lookup_elem(&head_scratch, &zero);
	if (!ev)
		return 0;
	if (bpf_probe_read_user(ev->data, n & (IW_HEAD_MAX - 1), (void *)buf))
		n = 0;
	n &= IW_HEAD_MAX - 1;
	__u64 size = __builtin_offsetof(struct iw_request_head_event, data) + n;
	fill_header(&ev->hdr, IW_EVENT_REQUEST_HEAD, size, current_tgid(), sk);
	ev->fd = fd;
	ev->read_len = (__u32)ret;
	ev->send_seq = send_seq(sock);
	ev->len = (__u32)n;
	expect_response(sock);
#ifdef IW_DIAG_NO_RING
	return 0;
#endif
	if (bpf_ringbuf_output(&events, ev, size, wakeup_flags()))
		count(IW_COUNTER_RINGBUF_DROPS);
	return 0;
}

#define NR_WRITE 1
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_SENDMSG 46

/* Copies up to `avail` bytes (at most IW_RESPONSE_PART - 1) from `src` into piece `i`; returns
 * the bytes copied. */
static __always_inline __u32 read_piece(struct iw_response_head_event *ev, __u32 i, __u64 src,
					__u64 avail)
{
	if (i >= IW_RESPONSE_PARTS)
		return 0;
	__u64 n = avail;
	if (n > IW_RESPONSE_PART - 1)
		n = IW_RESPONSE_PART - 1;
	n &= IW_RESPONSE_PART - 1;
	if (!n || bpf_probe_read_user(&ev->data[i * IW_RESPONSE_PART], n, (void *)src))
		return 0;
	ev->lens[i] = (__u32)n;
	return (__u32)n;
}

/*
 * One of the first sends of a response on a watched connection: its first bytes, found through
 * the syscall's arguments like the request head's, go to the agent, which keeps only the
 * response's id and whether the send carried a token. Sends that are not one of the four
 * syscalls (sendfile, io_uring) use up a capture and report nothing.
 */
static __always_inline void capture_response(struct sock *sock, int ret)
{
	__u64 sk = (__u64)sock;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (!regs)
		return;
	__u32 zero = 0;
	struct iw_response_head_event *ev = bpf_map_lookup_elem(&response_scratch, &zero);
	if (!ev)
		return;
	__builtin_memset(ev->lens, 0, sizeof(ev->lens));
	__u64 sent = (__u64)ret, buf = 0, iov = 0, iovcnt = 0;
	switch (regs->orig_ax) {
	case NR_WRITE:
	case NR_SENDTO:
		buf = regs->si;
		if (sent > regs->dx)
			sent = regs->dx;
		break;
	case NR_WRITEV:
		iov = regs->si;
		iovcnt = regs->dx;
		break;
	case NR_SENDMSG: {
		/* The two fields, each read where the kernel's BTF places it (msg_iov at 16, after
		 * msg_name and msg_namelen): a local copy of the struct has the local, shorter
		 * layout, which the relocated offsets overrun. */
		struct user_msghdr *msg = (struct user_msghdr *)regs->si;
		if (bpf_core_read_user(&iov, sizeof(iov), &msg->msg_iov) ||
		    bpf_core_read_user(&iovcnt, sizeof(iovcnt), &msg->msg_iovlen))
			return;
		break;
	}
	default:
		return;
	}
	__u32 last = 0;
	if (buf) {
		/* One buffer: consecutive slices of it. */
		__u64 at = 0;
		for (__u32 i = 0; i < IW_RESPONSE_PARTS; i++) {
			if (at >= sent)
				break;
			__u32 got = read_piece(ev, i, buf + at, sent - at);
			if (!got)
				break;
			last = i;
			at += got;
		}
	} else {
		/* Scattered: the start of each of the first iovecs (a chunk-size line, headers
		 * and the first chunk often come as separate pieces). */
		__u64 left_bytes = sent;
		for (__u32 i = 0; i < IW_RESPONSE_PARTS; i++) {
			if (i >= iovcnt || !left_bytes)
				break;
			struct iovec v = {};
			if (bpf_probe_read_user(&v, sizeof(v), (void *)(iov + i * sizeof(v))))
				break;
			__u64 len = v.iov_len < left_bytes ? v.iov_len : left_bytes;
			if (read_piece(ev, i, (__u64)v.iov_base, len))
				last = i;
			left_bytes -= len;
		}
	}
	if (last >= IW_RESPONSE_PARTS)
		return;
	__u32 tail = ev->lens[last] & (IW_RESPONSE_PART - 1);
	if (!tail)
		return;
	__u64 size = __builtin_offsetof(struct iw_response_head_event, data) +
		     last * IW_RESPONSE_PART + tail;
	fill_header(&ev->hdr, IW_EVENT_RESPONSE_HEAD, size, current_tgid(), sk);
	ev->send_len = (__u32)ret;
	ev->_pad = 0;
#ifdef IW_DIAG_NO_RING
	return;
#endif
	if (bpf_ringbuf_output(&events, ev, size, wakeup_flags()))
		count(IW_COUNTER_RINGBUF_DROPS);
}

/* Any socket send (write, writev, send*, io_uring) that returned; process context. */
SEC("tp_btf/sock_send_length")
int BPF_PROG(iw_sock_send_length, struct sock *sock, int ret, int flags)
{
	IW_DIAG_RETURN;
	__u64 sk = (__u64)sock;
	if (watched(sock)) {
		/* While the peer is there, the response's sends are counted (a lost request's
		 * LocalClosed carries how far it got) and its first ones captured; once the peer
		 * has left each send is an event: RCV_SHUTDOWN is set by its FIN (tcp_fin) or a
		 * reset (tcp_done). */
		if (!(sock->sk_shutdown & RCV_SHUTDOWN)) {
			if (ret <= 0)
				return 0;
			/* Sockets without a response under way (no head read since the agent
			 * started) cost one failed lookup. */
			struct iw_response_state *state =
				bpf_map_lookup_elem(&response_pending, &sk);
			if (!state)
				return 0;
			__sync_fetch_and_add(&state->sends, 1);
			if (state->captures_left) {
				state->captures_left -= 1;
				capture_response(sock, ret);
			}
			return 0;
		}
	} else if (!release_mark(sock)) {
		/* Neither a watched connection nor a reset one the server still holds (after
		 * TCP_CLOSE the port test no longer works: the kernel has released the port). */
		return 0;
	}
	struct iw_write_after_peer_close_event *ev = reserve(sizeof(*ev));
	if (!ev)
		return 0;
	fill_header(&ev->hdr, IW_EVENT_WRITE_AFTER_PEER_CLOSE, sizeof(*ev), current_tgid(), sk);
	ev->err = ret < 0 ? -ret : 0;
	ev->_pad = 0;
	ev->bytes = ret > 0 ? (__u64)ret : 0;
	submit(ev);
	return 0;
}

/* The socket is released (after the server's close, or when the kernel finishes with it). */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(iw_tcp_destroy_sock, struct sock *sock)
{
	IW_DIAG_RETURN;
	/* Released without our FIN (the peer had reset it, or the server closed with unread data
	 * and the kernel sent a RST): the release is then the server's close(), in its context.
	 * The mark is not deleted: the kernel frees it with the socket (__sk_destruct). */
	__u32 *mark = release_mark(sock);
	if (mark)
		emit_local_closed(sock, *mark);
	return 0;
}
