/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kscope L7 ABI: payload heads of connections whose protocol we parse.
 * Python mirror: node_exporter/bpf/abi.py (checked against BTF by tests/node_exporter/bpf/test_abi.py).
 */
#ifndef KSCOPE_ABI_L7_H
#define KSCOPE_ABI_L7_H

#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

#define KSCOPE_L7_MAX_CAPTURE 4096 /* hard bound of captured bytes per call (power of two) */

enum kscope_l7_record_type {
	KSCOPE_REC_L7 = 2,
};

/* What kscope decided the connection speaks (kept per socket, decided in the kernel). */
enum kscope_l7_protocol {
	KSCOPE_PROTO_UNKNOWN = 0,
	KSCOPE_PROTO_HTTP1 = 1,
	KSCOPE_PROTO_DNS = 2,
	KSCOPE_PROTO_IGNORED = 255, /* not a protocol we parse: nothing more is captured */
};

enum kscope_l7_direction {
	KSCOPE_DIR_EGRESS = 1,  /* this process sent it */
	KSCOPE_DIR_INGRESS = 2, /* this process received it */
};

enum kscope_l7_flags {
	KSCOPE_L7_TLS = 1,       /* plaintext from the OpenSSL uprobes */
	KSCOPE_L7_TRUNCATED = 2, /* captured < len */
	KSCOPE_L7_NO_BUFFER = 4, /* the call had no user buffer to read (sendfile, splice, mmsg past the first) */
};

enum kscope_l7_stat {
	KSCOPE_L7_STAT_RB_FULL = 0,      /* chunk dropped: ring buffer full (the parser sees a gap) */
	KSCOPE_L7_STAT_IGNORED = 1,      /* sockets given up on (not a protocol we parse) */
	KSCOPE_L7_STAT_CAPTURED = 2,     /* chunks sent to user space */
	KSCOPE_L7_STAT_READ_FAILED = 3,  /* the user buffer could not be read */
	KSCOPE_L7_STAT_NO_BUFFER = 4,    /* calls without a user buffer (flag KSCOPE_L7_NO_BUFFER) */
	KSCOPE_L7_STAT_TLS_NO_SOCKET = 5,/* TLS plaintext whose socket was never seen (dropped) */
	KSCOPE_L7_STAT_STORAGE_FAILED = 6,
	KSCOPE_L7_STATS = 7,
};

/* Followed by `captured` payload bytes. */
struct kscope_l7_header {
	__u8 type;        /* KSCOPE_REC_L7 */
	__u8 direction;   /* enum kscope_l7_direction */
	__u8 protocol;    /* enum kscope_l7_protocol */
	__u8 flags;       /* enum kscope_l7_flags, OR-ed */
	__u32 netns_ino;  /* the socket's network namespace inode */
	__u64 sock_cookie;/* same id as the L4 records of this socket */
	__u64 ts_ns;      /* CLOCK_MONOTONIC ns when the call returned */
	__u64 seq;        /* stream offset (bytes) of this chunk's first byte in this direction */
	__u8 saddr[16];   /* local address, network order; IPv4 as ::ffff:a.b.c.d */
	__u8 daddr[16];   /* remote address (for unconnected UDP: the datagram's peer) */
	__u32 tgid;       /* process id */
	__u32 pid;        /* thread id */
	__u32 len;        /* bytes the call moved */
	__u32 captured;   /* payload bytes that follow */
	__u16 sport;      /* local port, host order */
	__u16 dport;      /* remote port, host order */
	__u16 family;     /* AF_INET or AF_INET6 */
	__u8 role;        /* enum kscope_l4_role as decided for this connection */
	__u8 ip_proto;    /* 6 TCP, 17 UDP */
	__u8 comm[16];    /* task name */
};

#pragma clang diagnostic pop

#endif /* KSCOPE_ABI_L7_H */
