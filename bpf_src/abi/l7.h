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
	KSCOPE_REC_L7 = 2,          /* struct kscope_l7_header + payload: one send/recv call (chunk) */
	KSCOPE_REC_L7_EXCHANGE = 3, /* struct kscope_l7_exchange: one HTTP/1 request and its response */
	KSCOPE_REC_L7_SUMMARY = 4,  /* struct kscope_l7_summary: HTTP/1 exchanges of one socket, summed */
};

/* What kscope decided the connection speaks (kept per socket, decided in the kernel). */
enum kscope_l7_protocol {
	KSCOPE_PROTO_UNKNOWN = 0,
	KSCOPE_PROTO_HTTP1 = 1,
	KSCOPE_PROTO_DNS = 2,
	KSCOPE_PROTO_REDIS = 3,     /* RESP2/RESP3 */
	KSCOPE_PROTO_MEMCACHED = 4, /* text protocol, meta commands */
	KSCOPE_PROTO_POSTGRESQL = 5,
	KSCOPE_PROTO_MYSQL = 6,     /* MySQL and MariaDB */
	KSCOPE_PROTO_HTTP2 = 7,     /* cleartext (prior knowledge, upgrade-less) or TLS plaintext; chunks only */
	KSCOPE_PROTO_IGNORED = 255, /* not a protocol we parse: nothing more is captured */
};

enum kscope_l7_direction {
	KSCOPE_DIR_EGRESS = 1,  /* this process sent it */
	KSCOPE_DIR_INGRESS = 2, /* this process received it */
};

enum kscope_l7_flags {
	KSCOPE_L7_TLS = 1,       /* plaintext from the OpenSSL uprobes */
	KSCOPE_L7_TRUNCATED = 2, /* captured < len */
	KSCOPE_L7_NO_BUFFER = 4, /* the call had no user buffer to read (sendfile, splice, see STAT_MMSG_UNKNOWN) */
	KSCOPE_L7_H2_FRAMES = 8, /* HTTP/2 walked in the kernel: the bytes with DATA payloads cut out (seq, len,
	                          * captured count those compact bytes; bpf_src/l7_h2.h) */
};

enum kscope_l7_stat {
	KSCOPE_L7_STAT_RB_FULL = 0,      /* record dropped, ring full: a chunk (the parser sees a gap) or an exchange */
	KSCOPE_L7_STAT_IGNORED = 1,      /* sockets given up on (not a protocol we parse) */
	KSCOPE_L7_STAT_CAPTURED = 2,     /* chunks sent to user space */
	KSCOPE_L7_STAT_READ_FAILED = 3,  /* the user buffer could not be read */
	KSCOPE_L7_STAT_NO_BUFFER = 4,    /* calls without a user buffer (flag KSCOPE_L7_NO_BUFFER) */
	KSCOPE_L7_STAT_TLS_NO_SOCKET = 5,/* TLS plaintext whose socket was never seen (dropped) */
	KSCOPE_L7_STAT_STORAGE_FAILED = 6,
	KSCOPE_L7_STAT_EXCHANGES = 7,    /* exchange records sent to user space */
	KSCOPE_L7_STAT_FALLBACK = 8,     /* HTTP/1 sockets switched to chunks for good (pipelining) */
	KSCOPE_L7_STAT_ORPHAN_RESPONSES = 9, /* a response with no request pending (connection older than us) */
	KSCOPE_L7_STAT_LATE_CALLS = 10,  /* response calls after the sweep emitted their exchange */
	KSCOPE_L7_STAT_EXCHANGE_RB_FULL = 11, /* exchange dropped: ring buffer full */
	KSCOPE_L7_STAT_TLS_CALL_LOST = 12, /* an SSL_* call returned with no entry recorded (the bounded
	                                     * tls_calls LRU evicted it, or it began before attach): lost */
	KSCOPE_L7_STAT_SUMMARIZED = 13,  /* exchanges in the summaries sent (summed instead of a record of their own) */
	KSCOPE_L7_STAT_SUMMARIES = 14,   /* summary records sent to user space */
	KSCOPE_L7_STAT_SUMMARY_RB_FULL = 15, /* no room for a summary: a due one waits for the next sweep (an
	                                      * attempt per sweep); what is lost counts in SUMMARY_LOST */
	KSCOPE_L7_STAT_SUMMARY_LOST = 16,    /* exchanges lost with a summary the ring had no room for */
	KSCOPE_L7_STAT_SLOTS_FULL = 17,  /* summaries sent early (KSCOPE_EMIT_EVICT): every slot of the socket was taken */
	KSCOPE_L7_STAT_STOP_PENDING = 18, /* requests still waiting for their response at the final sweep (agent stopping): not sent */
	KSCOPE_L7_STAT_NETNS_PENDING_FULL = 19, /* a namespace could not be marked for the sweep (map full): every one walked */
	KSCOPE_L7_STAT_MMSG_UNKNOWN = 20, /* sendmmsg/recvmmsg messages whose place in the vector is unknown (the
	                                   * entry hook missed the call): sent without their bytes (NO_BUFFER) */
	KSCOPE_L7_STAT_OWN = 21,         /* the agent's own sockets (its shipping, its exports): not parsed */
	KSCOPE_L7_STAT_H2_LOST = 22,  /* HTTP/2 calls the kernel's frame walk could not follow (no buffer, a failed
	                               * read, readv/writev past their first buffer, its step bound, an evicted TLS
	                               * state): the direction waits for a call that starts with a frame header */
	KSCOPE_L7_STAT_UNSUMMABLE = 23, /* exchanges past the record rate sent as records, not summed: the kernel
	                                 * cannot template their path as user space would (bpf_src/l7_route.h) */
	/* In-process causality (bpf_src/l7_causal.h, docs/traces.md) */
	KSCOPE_L7_STAT_CAUSAL_PARENTS = 24,  /* client exchanges given a tentative parent (KSCOPE_X_PARENT) */
	KSCOPE_L7_STAT_CAUSAL_REFUSED = 25,  /* client exchanges started inside a server request on a thread or
	                                      * process flagged as multiplexing (or with causality off): none given */
	KSCOPE_L7_STAT_CAUSAL_CONFIRMED = 26, /* server exchanges with children confirmed (KSCOPE_X_PARENT_OK) */
	KSCOPE_L7_STAT_CAUSAL_UNCONFIRMED = 27, /* server exchanges with children not confirmed (another thread
	                                         * answered, the thread or process got flagged meanwhile) */
	KSCOPE_L7_STAT_CAUSAL_FORCED = 28,   /* server exchanges recorded past the record rate: a child was recorded */
	KSCOPE_L7_STAT_CAUSAL_THREAD_FLAGGED = 29, /* threads flagged as event loops (they called epoll_wait) */
	KSCOPE_L7_STAT_CAUSAL_PROC_FLAGGED = 30,   /* processes flagged: two server requests open on one thread,
	                                            * or one answered by another thread than the one that read it */
	KSCOPE_L7_STAT_CAUSAL_MAP_FULL = 31, /* a context or flag could not be stored: a context is not opened;
	                                      * a flag lost turns causality off for good (a wrong parent is worse) */
	KSCOPE_L7_STAT_CAUSAL_ABANDONED = 32, /* server requests closed unanswered: their context closed */
	KSCOPE_L7_STAT_PICK_OVER_BUDGET = 33, /* exchanges picked by their sequence numbers (link_pick) that the
	                                       * sampler still summed: the other end may have a record of it */
	KSCOPE_L7_STAT_CAUSAL_CHUNKS = 34, /* chunks a client sent inside a server request of its thread (protocols
	                                    * user space pairs: databases, caches, DNS, TLS, HTTP/2): parent_ns set */
	KSCOPE_L7_STAT_OFFERED = 35, /* HTTP/1 exchanges the sampler decided on, as they started (counted with
	                              * --l7-trace-ratio auto only: what the agent sets the share from) */
	KSCOPE_L7_STATS = 36,
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
	__u64 parent_ns;  /* a client's send inside a server request of its thread: that exchange's start
	                   * (l7_causal.h, tentative as an exchange's parent_start_ns); else 0 */
};

/* Bytes of a request's head copied into its exchange record (the request line and the first
 * headers; traceparent/X-Request-ID past it are not seen). Fixed: the record is fixed-size so
 * user space reads a batch as an array. Bounded further by the capture_bytes knob. */
#define KSCOPE_L7_HEAD 368 /* 384 before the TCP sequence numbers took 8 and parent_start_ns 8: the record
                            * stays 504 bytes (a 512-byte ring stride with its header, which the reader needs) */

enum kscope_http_method {
	KSCOPE_HTTP_GET = 1,
	KSCOPE_HTTP_HEAD = 2,
	KSCOPE_HTTP_POST = 3,
	KSCOPE_HTTP_PUT = 4,
	KSCOPE_HTTP_DELETE = 5,
	KSCOPE_HTTP_PATCH = 6,
	KSCOPE_HTTP_OPTIONS = 7,
	KSCOPE_HTTP_CONNECT = 8,
	KSCOPE_HTTP_TRACE = 9,
};

/* Why an exchange record was sent now. */
enum kscope_l7_emit {
	KSCOPE_EMIT_NEXT = 1,     /* the next request started on the socket (a summary: a response came after it was due) */
	KSCOPE_EMIT_CLOSE = 2,    /* the socket was destroyed */
	KSCOPE_EMIT_SWEEP = 3,    /* idle (answered) or timed out (unanswered), found by the periodic sweep */
	KSCOPE_EMIT_UPGRADE = 4,  /* 101 Switching Protocols / CONNECT 2xx: the last HTTP/1 exchange */
	KSCOPE_EMIT_FALLBACK = 5, /* the socket switched to chunks (pipelining); this one was answered */
	KSCOPE_EMIT_EVICT = 6,    /* a summary sent early: its slot was needed for another key */
};

enum kscope_l7_exchange_flags {
	KSCOPE_X_HEAD_TRUNCATED = 1, /* the request-start call moved more than head_len bytes */
	KSCOPE_X_NO_BUFFER = 2,      /* some call of the exchange had no user buffer (sendfile ...) */
	KSCOPE_X_TCP_SEQ = 4,        /* tcp_req_seq/tcp_resp_seq are set (docs/traces.md) */
	KSCOPE_X_PARENT = 8,         /* client: started inside the server request of the same thread that
	                              * started at parent_start_ns (tentative: the agent confirms it) */
	KSCOPE_X_PARENT_OK = 16,     /* server: client calls started inside it, and it is their parent: the
	                              * thread that read it answered it, nothing else started on the thread
	                              * meanwhile, neither thread nor process flagged (bpf_src/l7_causal.h) */
};

/* One HTTP/1 request/response exchange on a plain-text TCP socket, as one side saw it.
 * status 0: no (final) response was seen before the record was sent. */
struct kscope_l7_exchange {
	__u8 type;            /* KSCOPE_REC_L7_EXCHANGE */
	__u8 role;            /* enum kscope_l4_role of this socket (CLIENT: we sent the request) */
	__u8 method;          /* enum kscope_http_method */
	__u8 reason;          /* enum kscope_l7_emit */
	__u32 netns_ino;      /* the socket's network namespace inode */
	__u64 sock_cookie;    /* same id as the L4 records and chunks of this socket */
	__u64 start_ns;       /* CLOCK_MONOTONIC ns: the call carrying the request's first byte returned */
	__u64 latency_ns;     /* response first byte - request first byte (ns); 0 without a response */
	__u64 request_bytes;  /* bytes of the request (head and body) the calls moved */
	__u64 response_bytes; /* bytes of the final response (head and body); 1xx interim responses excluded */
	__u8 saddr[16];       /* local address, network order; IPv4 as ::ffff:a.b.c.d */
	__u8 daddr[16];       /* remote address, network order */
	__u32 tgid;           /* process id of the task that moved the request */
	__u32 pid;            /* its thread id */
	__u16 sport;          /* local port, host order */
	__u16 dport;          /* remote port, host order */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u16 status;         /* HTTP status of the final response, 0 if none */
	__u16 head_len;       /* valid bytes in head[] */
	__u8 flags;           /* enum kscope_l7_exchange_flags, OR-ed */
	__u8 _pad[5];
	__u8 comm[16];        /* process name */
	__u8 head[KSCOPE_L7_HEAD]; /* the request head's first head_len bytes; zero after them */
	/* Both ends of the connection see these two the same (NAT rewrites no sequence numbers), so
	 * they link the client's and the server's record of one request (docs/traces.md). Valid
	 * only with KSCOPE_X_TCP_SEQ. */
	__u32 tcp_req_seq;    /* TCP sequence number of the request's first byte (client -> server stream) */
	__u32 tcp_resp_seq;   /* server -> client stream: the next byte when the request started */
	/* With KSCOPE_X_PARENT (client): CLOCK_MONOTONIC ns start of the server exchange this thread
	 * (pid) was serving when this call started: with tgid and pid, that server record's key. */
	__u64 parent_start_ns;
};

/*
 * Summaries: under load, exchanges the sampler does not pick are summed per socket, method,
 * path and status in the socket's storage, and leave as one record per such key about once a
 * second (and at close). A summary loses the per-request detail (start time, trace headers)
 * but not one request: counts, byte sums and the latency histogram are exact. Latencies are
 * counted in buckets: bucket i holds latencies with BOUND[i-1] < latency <= BOUND[i] (ns);
 * the last bucket everything above the last bound. The bounds are the union of the
 * processor's histograms' bounds (OpenTelemetry HTTP duration, Tempo service graph), so
 * the processor re-buckets exactly.
 */
#define KSCOPE_L7_LATENCY_BOUNDS 21
#define KSCOPE_L7_LATENCY_BUCKETS (KSCOPE_L7_LATENCY_BOUNDS + 1)
#define KSCOPE_L7_LATENCY_BOUNDS_NS                                                                   \
	{                                                                                             \
		5000000ULL, 10000000ULL, 25000000ULL, 50000000ULL, 75000000ULL, 100000000ULL,           \
		200000000ULL, 250000000ULL, 400000000ULL, 500000000ULL, 750000000ULL, 800000000ULL,     \
		1000000000ULL, 1600000000ULL, 2500000000ULL, 3200000000ULL, 5000000000ULL,              \
		6400000000ULL, 7500000000ULL, 10000000000ULL, 12800000000ULL                            \
	}
/* Request-line bytes a summary keeps (method, path and what follows in the line): a request
 * whose path does not end within them is never summed (it is sent as its own record). */
#define KSCOPE_L7_SUMMARY_HEAD 128

/* Same size as struct kscope_l7_exchange, and the same fields up to comm, so both share the
 * exchange ring (fixed stride) and user space decodes the common part once. */
struct kscope_l7_summary {
	__u8 type;            /* KSCOPE_REC_L7_SUMMARY */
	__u8 role;            /* enum kscope_l4_role of this socket */
	__u8 method;          /* enum kscope_http_method */
	__u8 reason;          /* enum kscope_l7_emit: SWEEP (due) or CLOSE */
	__u32 netns_ino;
	__u64 sock_cookie;
	__u64 start_ns;       /* the first summed request's start */
	__u64 latency_ns;     /* the sum of the summed requests' latencies (ns) */
	__u64 request_bytes;  /* summed */
	__u64 response_bytes; /* summed */
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 tgid;           /* of the socket's latest request when the summary was sent */
	__u32 pid;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 status;         /* every summed exchange had this final status (never 0: unanswered ones are records) */
	__u16 head_len;       /* valid bytes in head[] */
	__u8 flags;           /* enum kscope_l7_exchange_flags of the summed exchanges, OR-ed */
	__u8 _pad[5];
	__u8 comm[16];
	__u32 count;          /* exchanges summed (>= 1) */
	__u32 _pad2;
	__u64 end_ns;         /* the last summed request's start */
	__u64 latency_min_ns;
	__u64 latency_max_ns;
	__u32 buckets[KSCOPE_L7_LATENCY_BUCKETS]; /* latency histogram, bounds above */
	__u8 head[KSCOPE_L7_SUMMARY_HEAD]; /* the first summed request's head (request line first) */
	__u8 _pad3[KSCOPE_L7_HEAD - KSCOPE_L7_SUMMARY_HEAD - 4 * KSCOPE_L7_LATENCY_BUCKETS - 32];
	__u8 _pad4[16];       /* where an exchange has its TCP sequence numbers and parent_start_ns */
};

#pragma clang diagnostic pop

#endif /* KSCOPE_ABI_L7_H */
