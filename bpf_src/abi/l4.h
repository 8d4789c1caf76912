/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kscope L4 ABI: every struct that crosses from BPF to user space for the L4 probe.
 * Python mirror: node_exporter/bpf/abi.py (checked against this object's BTF by
 * tests/node_exporter/bpf/test_abi.py; never edit one without the other).
 * Only __u8..__u64, largest fields first, explicit padding; a hole fails the build.
 */
#ifndef KSCOPE_ABI_L4_H
#define KSCOPE_ABI_L4_H

#pragma clang diagnostic push
#pragma clang diagnostic error "-Wpadded"

/* First byte of every record that reaches user space. */
enum kscope_record_type {
	KSCOPE_REC_L4 = 1,
};

/* Why this record was made. */
enum kscope_l4_reason {
	KSCOPE_L4_PERIODIC = 1, /* counters changed since the last interval */
	KSCOPE_L4_CLOSE = 2,    /* the socket was destroyed: final record */
};

enum kscope_l4_role {
	KSCOPE_ROLE_UNKNOWN = 0,
	KSCOPE_ROLE_CLIENT = 1,   /* this socket called connect() */
	KSCOPE_ROLE_SERVER = 2,   /* accepted from a listener */
	KSCOPE_ROLE_LISTENER = 3, /* listen() socket */
};

enum kscope_connect_status {
	KSCOPE_CONNECT_NONE = 0,        /* not a connecting socket, or still connecting */
	KSCOPE_CONNECT_OK = 1,          /* SYN_SENT -> ESTABLISHED */
	KSCOPE_CONNECT_REFUSED = 2,     /* RST answered the SYN (ECONNREFUSED) */
	KSCOPE_CONNECT_TIMEOUT = 3,     /* the kernel gave up retransmitting the SYN (ETIMEDOUT) */
	KSCOPE_CONNECT_RESET = 4,       /* ECONNRESET while connecting */
	KSCOPE_CONNECT_UNREACHABLE = 5, /* ICMP host/net unreachable (EHOSTUNREACH, ENETUNREACH) */
	KSCOPE_CONNECT_ABORTED = 6,     /* the application closed the socket while connecting */
	KSCOPE_CONNECT_OTHER = 7,       /* any other error; sk_err is in the record's connect_errno */
};

/* Index of each per-socket counter in total[] and delta[]. */
enum kscope_l4_counter {
	KSCOPE_C_BYTES_SENT = 0,       /* bytes the application handed to the socket (sendmsg return) */
	KSCOPE_C_BYTES_RECEIVED = 1,   /* bytes the application read (recvmsg return, MSG_PEEK excluded) */
	KSCOPE_C_SENDS = 2,            /* send calls with a positive return */
	KSCOPE_C_RECVS = 3,            /* receive calls with a positive return */
	KSCOPE_C_RETRANSMITS = 4,      /* data/FIN segments retransmitted (tcp_retransmit_skb) */
	KSCOPE_C_SYN_RETRANSMITS = 5,  /* SYN retransmitted while connecting */
	KSCOPE_C_RESETS_SENT = 6,      /* RST sent on this socket */
	KSCOPE_C_RESETS_RECEIVED = 7,  /* RST received on this socket */
	KSCOPE_C_DROPS = 8,            /* packets of this socket the kernel dropped (kfree_skb) */
	KSCOPE_C_LISTEN_OVERFLOWS = 9, /* listener only: handshakes dropped, accept queue full */
	KSCOPE_L4_COUNTERS = 10,
};

/* Global self-metrics: index into the per-CPU array map `kscope_stats`. */
enum kscope_stat {
	KSCOPE_STAT_CLOSE_RB_FULL = 0,     /* final record diverted to the overflow map (ring full) */
	KSCOPE_STAT_CLOSE_LOST = 1,        /* final record lost: ring AND overflow map full */
	KSCOPE_STAT_STORAGE_FAILED = 2,    /* socket storage could not be created (memory limit) */
	KSCOPE_STAT_RST_NO_SOCKET = 3,     /* RST sent with no socket (e.g. SYN to a closed port) */
	KSCOPE_STAT_DROPS_NO_SOCKET = 4,   /* TCP drops not attributable to a tracked socket */
	KSCOPE_STAT_ITER_RETRY = 5,        /* sweep iterator deferred a socket to the next read() */
	KSCOPE_STAT_SOCKETS_TRACKED = 6,   /* sockets that got storage (monotonic) */
	KSCOPE_STAT_SEED_OWNERS_FULL = 7,  /* start: an old socket's owner not kept (map full): learned at its next send/recv */
	KSCOPE_STAT_NETNS_PENDING_FULL = 8, /* a namespace could not be marked for the sweep (map full): every one walked */
	KSCOPE_STAT_REPORT_RB_FULL = 9,     /* a busy socket's own periodic record found the ring half full: its counts wait */
	KSCOPE_STATS = 10,
};

struct kscope_l4_record {
	__u8 type;            /* enum kscope_record_type: KSCOPE_REC_L4 */
	__u8 reason;          /* enum kscope_l4_reason */
	__u8 role;            /* enum kscope_l4_role */
	__u8 connect_status;  /* enum kscope_connect_status */
	__u32 netns_ino;      /* inode of the socket's network namespace */
	__u64 sock_cookie;    /* bpf_get_socket_cookie(): unique per socket for this boot */
	__u64 cgroup_id;      /* cgroup v2 id of the owner task when first seen in process context; 0 unknown */
	__u64 start_ns;       /* CLOCK_MONOTONIC ns when kscope first saw the socket */
	__u64 ts_ns;          /* CLOCK_MONOTONIC ns when this record was made */
	__u64 connect_latency_ns; /* SYN sent -> ESTABLISHED, ns; 0 if not measured */
	__u64 total[KSCOPE_L4_COUNTERS]; /* counters since first seen, units per enum kscope_l4_counter */
	__u64 delta[KSCOPE_L4_COUNTERS]; /* change since the previous record of this socket */
	__u8 saddr[16];       /* local address, network order; IPv4 as ::ffff:a.b.c.d */
	__u8 daddr[16];       /* remote address, same form */
	__u32 tgid;           /* owner process id (0 unknown) */
	__u32 pid;            /* owner thread id (0 unknown) */
	__u32 srtt_us;        /* smoothed RTT, microseconds (kernel srtt_us >> 3) */
	__u32 segs_out;       /* segments sent (kernel tcp_sock counter, since socket creation) */
	__u32 segs_in;        /* segments received (same) */
	__u32 last_drop_reason; /* enum skb_drop_reason of the last attributed drop; 0 none */
	__u32 ack_backlog;    /* listener: connections waiting in the accept queue */
	__u32 max_ack_backlog;/* listener: accept queue limit; accepted sockets inherit it (non-zero) */
	__u32 sk_drops;       /* the kernel's own drop counter of the socket (what `ss` shows as dN); on a
			       * listener: SYNs/handshakes dropped, mostly for a full accept queue */
	__u32 rttvar_us;      /* RTT variation, microseconds (kernel mdev_us >> 2, as tcp_info) */
	__u16 sport;          /* local port, host order */
	__u16 dport;          /* remote port, host order */
	__u16 family;         /* AF_INET (2) or AF_INET6 (10): the socket's own family */
	__u8 tcp_state;       /* kernel TCP state when the record was made (TCP_ESTABLISHED = 1 ...) */
	__u8 connect_errno;   /* sk_err when a connect failed (e.g. 111 ECONNREFUSED); 0 otherwise */
	__u8 comm[16];        /* owner task name, NUL padded */
};

#pragma clang diagnostic pop

#endif /* KSCOPE_ABI_L4_H */
