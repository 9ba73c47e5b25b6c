/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The one definition of every event the kernel programs send to the agent.
 *
 * Rules (see shared/STYLE.md, rule 5):
 *   - every event starts with `struct iw_event_header`;
 *   - fixed-width fields only, explicit padding, no `bool`;
 *   - type ids live in ranges per concern and are never reused:
 *       100..=199  TCP socket lifecycle (sock / tcp tracepoints)
 *       200..=299  HTTP payload on a watched connection (socket I/O tracepoints)
 *   - the agent reads this file through bindgen (agent/build.rs) and asserts sizes and offsets,
 *     so a change here that the Rust side does not follow fails the build.
 *
 * This header is included both by the BPF programs (with vmlinux.h types) and by bindgen
 * (with the host's <linux/types.h>), so it only uses the __u8..__u64 / __s32 types.
 */
#ifndef INFERWATCH_EVENTS_H
#define INFERWATCH_EVENTS_H

/* Bytes of the first read of an HTTP request copied to userspace. The agent parses only the
 * request line and allow-listed headers out of them and drops the rest. Power of two: the
 * BPF side masks the length with IW_HEAD_MAX - 1 to keep the verifier happy. */
#define IW_HEAD_MAX 2048

/* The server's first response bytes after each request head, for the response's own id (SPEC
 * section 2, rule 3): the first IW_RESPONSE_WRITES sends after a head are captured, each as up
 * to IW_RESPONSE_PARTS pieces (the send's first iovecs, or consecutive slices of its one
 * buffer) of up to IW_RESPONSE_PART - 1 bytes. The agent keeps only the id and drops the rest.
 * Power of two: the BPF side masks each length with IW_RESPONSE_PART - 1. */
#define IW_RESPONSE_PART 256
#define IW_RESPONSE_PARTS 4
#define IW_RESPONSE_WRITES 2
/* Most watched connections with a response under way at once (LRU beyond it). */
#define IW_RESPONSE_PENDING_MAX 16384

/* Upper bound on watched local ports (a configuration limit). */
#define IW_MAX_WATCHED_PORTS 64

/* The watched-port bitmap: 65536 bits in 64-bit words. */
#define IW_PORT_BITMAP_WORDS 1024

enum iw_event_type {
	IW_EVENT_LISTEN = 100,
	IW_EVENT_ACCEPTED = 101,
	IW_EVENT_PEER_CLOSED = 102,
	IW_EVENT_LOCAL_CLOSED = 103,
	IW_EVENT_CLOSED = 104,
	IW_EVENT_REFUSED = 105,

	IW_EVENT_REQUEST_HEAD = 200,
	IW_EVENT_WRITE_AFTER_PEER_CLOSE = 201,
	IW_EVENT_RESPONSE_HEAD = 202,
};

/* How the peer left. */
enum iw_close_how {
	IW_CLOSE_FIN = 1,
	IW_CLOSE_RST = 2,
};

/* Index of the per-CPU counters in the `iw_counters` map. */
enum iw_counter {
	IW_COUNTER_RINGBUF_DROPS = 0,   /* bpf_ringbuf_reserve failed: ring buffer full */
	IW_COUNTER_CONN_STATE_ALLOC = 1, /* a connection's state (socket storage) could not be created: a reset connection's LocalClosed, or (no room to note a request head) its response bytes, are lost */
	IW_COUNTER_MAX = 2,
};

struct iw_event_header {
	__u16 type;   /* enum iw_event_type */
	__u16 size;   /* size of the whole event in bytes, header included */
	__u32 tgid;   /* process id of the current task; 0 in softirq context (peer-side events) */
	__u64 ts_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 conn;   /* kernel address of the struct sock: the connection key */
};

/* A socket started listening on a watched port (process context: the listen() caller). */
struct iw_listen_event {
	struct iw_event_header hdr;
	__u16 family; /* AF_INET or AF_INET6 */
	__u16 port;   /* host byte order */
	__u32 _pad;
};

/* A connection to a watched port completed its handshake (SYN_RECV -> ESTABLISHED, softirq
 * context: tgid 0). The server's accept() may come later; the connection is keyed by its
 * socket from here on. Addresses are as the tracepoint gives them (network order bytes); IPv4
 * uses the first 4 bytes of the 16. */
struct iw_accepted_event {
	struct iw_event_header hdr;
	__u16 family;
	__u16 local_port; /* host byte order */
	__u16 peer_port;  /* host byte order */
	__u16 _pad;
	__u8 local_addr[16];
	__u8 peer_addr[16];
};

/* A read on a watched connection whose bytes start like an HTTP/1.x request line: the first
 * read of each request (also the second and later requests of a keep-alive connection).
 * Process context: the reading thread's tgid, the read's time. The record is variable-length:
 * it ends after data[len] (hdr.size = offsetof(data) + len), not at data[IW_HEAD_MAX]. */
struct iw_request_head_event {
	struct iw_event_header hdr;
	__s32 fd;       /* the reader's fd of the socket (the read's first argument) */
	__u32 len;      /* bytes valid in data[] */
	__u32 read_len; /* what the read returned */
	__u32 send_seq; /* the socket's write_seq: bytes the server had written, mod 2^32 */
	__u8 data[IW_HEAD_MAX];
};

/* The peer sent FIN (socket entered CLOSE_WAIT) or RST while the connection was open. */
struct iw_peer_closed_event {
	struct iw_event_header hdr;
	__u32 how;      /* enum iw_close_how */
	__u32 send_seq; /* the socket's write_seq then: equal to the last head's when the
			 * response had not started */
};

/* The server's first sends after a request head on a watched connection (IW_RESPONSE_WRITES of
 * them; write, writev, sendto, sendmsg), process context: the sender's tgid. Piece i holds
 * lens[i] bytes at data[i * IW_RESPONSE_PART]; the pieces, in order, are the start of what the
 * send wrote. The record is variable-length: it ends after the last non-empty piece
 * (hdr.size = offsetof(data) + last * IW_RESPONSE_PART + lens[last]). */
struct iw_response_head_event {
	struct iw_event_header hdr;
	__u32 lens[IW_RESPONSE_PARTS]; /* bytes valid in each piece */
	__u32 send_len;                /* what the send returned */
	__u32 _pad;
	__u8 data[IW_RESPONSE_PARTS * IW_RESPONSE_PART];
};

/* The server sent on a connection whose peer had already left (any send: write, writev,
 * send, sendto, sendmsg; stamped when the send returned). */
struct iw_write_after_peer_close_event {
	struct iw_event_header hdr;
	__s32 err;   /* errno of the send (positive), 0 when it succeeded */
	__u32 _pad;
	__u64 bytes; /* bytes the send accepted (0 when it failed) */
};

/* A count the kernel did not keep (no request head noted on the connection, or its entry was
 * evicted). */
#define IW_SENDS_UNKNOWN 0xffffffffu

/* The server closed its side: it sent FIN (close() or shutdown()), or released a socket the peer
 * had already reset (its close()). Process context in both: the closing task's tgid. */
struct iw_local_closed_event {
	struct iw_event_header hdr;
	__u32 response_sends; /* successful sends since the last request head while the peer was
			       * there (the response so far), or IW_SENDS_UNKNOWN */
	__u32 _pad;
};

/* The socket reached TCP_CLOSE: the kernel forgets the connection. */
struct iw_closed_event {
	struct iw_event_header hdr;
};

/* A connection attempt to a watched port that no socket took: the kernel answered its SYN with
 * a reset (tcp_send_reset without a socket, reason NO_SOCKET: nothing listened there yet, or
 * any more). Softirq context: tgid 0; hdr.conn is 0 (there is no socket). Same address layout
 * as iw_accepted_event. */
struct iw_refused_event {
	struct iw_event_header hdr;
	__u16 family;
	__u16 local_port; /* host byte order: the watched port */
	__u16 peer_port;  /* host byte order */
	__u16 _pad;
	__u8 local_addr[16];
	__u8 peer_addr[16];
};

/* ---- 300..=399: process lifecycle (ebpf/process_exit.bpf.c, sched and oom tracepoints) ----
 * Its own enum so that the TCP and HTTP ranges above stay as they are. */
enum iw_process_event_type {
	IW_EVENT_PROCESS_EXIT = 300,
	IW_EVENT_OOM_VICTIM = 301,
};

/* A process ended: its last thread exited (sched_process_exit with the thread group dead).
 * hdr.tgid is the process, hdr.conn is 0. */
struct iw_process_exit_event {
	struct iw_event_header hdr;
	__u32 exit_code; /* wait status as the parent sees it: (code & 0xff) << 8 for exit(code), the
			  * signal number (| 0x80 with a core dump) for a death by signal */
	__u32 ppid;      /* the parent's tgid (real_parent) */
};

/* The kernel's OOM killer chose a victim (oom/mark_victim); its SIGKILL and exit follow.
 * hdr.tgid is the victim, hdr.conn is 0. */
struct iw_oom_victim_event {
	struct iw_event_header hdr;
};

#endif /* INFERWATCH_EVENTS_H */
