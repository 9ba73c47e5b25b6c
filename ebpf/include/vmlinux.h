/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * A minimal vmlinux.h: only the kernel types the inferwatch programs touch, written by hand so
 * that the build never depends on the build host's BTF. Every struct is marked
 * preserve_access_index: clang records each field access as a CO-RE relocation, and the loader
 * (aya) rewrites the offsets against the running kernel's /sys/kernel/btf/vmlinux. Only the
 * fields used are declared; their order and the absence of the others do not matter.
 */
#ifndef __VMLINUX_H__
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
typedef unsigned long size_t;

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_SK_STORAGE = 24,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_F_NO_PREALLOC = 1,
};

enum {
	BPF_SK_STORAGE_GET_F_CREATE = 1,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

/* bpf_ringbuf_submit() flags and bpf_ringbuf_query() flags. */
enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};

enum {
	BPF_RB_AVAIL_DATA = 0,
	BPF_RB_RING_SIZE = 1,
	BPF_RB_CONS_POS = 2,
	BPF_RB_PROD_POS = 3,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

/* The user registers saved at syscall entry (x86_64), from bpf_task_pt_regs(). */
struct pt_regs {
	long unsigned int di;
	long unsigned int si;
	long unsigned int dx;
	long unsigned int orig_ax;
};

struct iovec {
	void *iov_base;
	size_t iov_len;
};

struct user_msghdr {
	struct iovec *msg_iov;
	size_t msg_iovlen;
};

struct in6_addr {
	__u8 u6_addr8[16];
};

/* The fields of the socket's common part that the programs read. In the kernel several sit in
 * anonymous unions and structs; CO-RE matches them by name through those. */
struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state; /* TCP_* */
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
};

/* The connection key is the address of this struct; the raw tracepoints' first argument. */
struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
	__u8 sk_shutdown; /* RCV_SHUTDOWN: the peer's FIN came, or the connection was reset */
	/* The socket's BPF local storage (any program's), NULL when it has none. Read directly
	 * by the programs as a cheap test before the storage helper; declared as `void *`
	 * because only its being NULL is used (CO-RE matches pointer fields of any type). */
	void *sk_bpf_storage;
};

/* A packet: the SYN a reset answers (tcp_send_reset without a socket). `head` plus the two
 * offsets locate its IP and TCP headers, read with a helper. */
struct sk_buff {
	unsigned char *head;
	__u16 transport_header;
	__u16 network_header;
};

/* Past struct sock: read with a helper (inet_sport) or through bpf_skc_to_tcp_sock(). */
struct inet_sock {
	__be16 inet_sport; /* the local port, kept after the kernel releases skc_num */
};

struct tcp_sock {
	__u32 write_seq; /* end of the data the application has written (plus SYN / FIN) */
};

#pragma clang attribute pop

#endif /* __VMLINUX_H__ */
