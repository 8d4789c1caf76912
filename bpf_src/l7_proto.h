/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * L7 capture helpers shared by the socket-tracepoint probe (l7.bpf.c) and its
 * syscall fallback (l7_syscalls.bpf.c): protocol inference from a call's first
 * bytes, where a socket call's user buffer is, how much of it to capture, and the
 * socket's addresses. Pure functions of their arguments (no knobs), so both objects
 * decide exactly alike. At the end, the maps both objects declare under the same names
 * (chunk ring, shared counters, scratch chunk), so user space reads either one alike.
 *
 * Everything reads kernel memory with CO-RE probe reads, never by direct
 * dereference: the fallback's `struct sock *` comes out of an fd walk (a scalar, not
 * a BTF pointer), and the fallback must load on kernels without BTF-typed pointer
 * loads in its program type. Costs a few helper calls more than direct loads.
 *
 * Include after vmlinux.h and the libbpf headers, once per object (it defines maps).
 */
#ifndef KSCOPE_L7_PROTO_H
#define KSCOPE_L7_PROTO_H

#include "compat.h"
#include "limits.h"
#include "abi/l4.h"
#include "abi/l7.h"

#define IPPROTO_UDP 17
#define DNS_PORT 53
/* Calls whose bytes do not tell the protocol before a socket is ignored for good. */
#define MAX_INFER_ATTEMPTS 8

/* x86-64 syscall numbers (orig_ax): the probes are x86-64 only. */
#define NR_read 0
#define NR_write 1
#define NR_readv 19
#define NR_writev 20
#define NR_sendfile 40
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_recvmmsg 299
#define NR_sendmmsg 307

/* Twice the capture bound so a length masked with READ_MASK is provably inside a
 * buffer of 2 * KSCOPE_L7_MAX_CAPTURE bytes (the verifier tracks the mask, not the clamp). */
#define READ_MASK (2 * KSCOPE_L7_MAX_CAPTURE - 1)

static __always_inline bool has_prefix(const __u8 *d, __u32 n, const char *p, __u32 plen)
{
	if (n < plen)
		return false;
	for (__u32 i = 0; i < plen; i++)
		if (d[i] != (__u8)p[i])
			return false;
	return true;
}

/* The HTTP/1 request method this head starts with (enum kscope_http_method), 0 if none. */
static __always_inline __u8 request_method(const __u8 *d, __u32 n)
{
	if (has_prefix(d, n, "GET ", 4))
		return KSCOPE_HTTP_GET;
	if (has_prefix(d, n, "POST ", 5))
		return KSCOPE_HTTP_POST;
	if (has_prefix(d, n, "PUT ", 4))
		return KSCOPE_HTTP_PUT;
	if (has_prefix(d, n, "HEAD ", 5))
		return KSCOPE_HTTP_HEAD;
	if (has_prefix(d, n, "DELETE ", 7))
		return KSCOPE_HTTP_DELETE;
	if (has_prefix(d, n, "PATCH ", 6))
		return KSCOPE_HTTP_PATCH;
	if (has_prefix(d, n, "OPTIONS ", 8))
		return KSCOPE_HTTP_OPTIONS;
	if (has_prefix(d, n, "CONNECT ", 8))
		return KSCOPE_HTTP_CONNECT;
	if (has_prefix(d, n, "TRACE ", 6))
		return KSCOPE_HTTP_TRACE;
	return 0;
}

/* 1: an HTTP/1 request starts here, 2: a response, 0: neither. */
static __always_inline int http_start(const __u8 *d, __u32 n)
{
	if (has_prefix(d, n, "HTTP/1.", 7))
		return 2;
	return request_method(d, n) ? 1 : 0;
}

static __always_inline __u32 be32(const __u8 *d)
{
	return (__u32)d[0] << 24 | (__u32)d[1] << 16 | (__u32)d[2] << 8 | d[3];
}

#define H2_PREFACE_LEN 24
#define H2_FRAME_HEADER 9
#define H2_MAX_FRAME 16384 /* SETTINGS_MAX_FRAME_SIZE's initial value: a "sane length" */

/*
 * A 9-byte HTTP/2 frame header at d[off] that follows the rules every sender must (RFC 9113 4.1,
 * 6: a known type, the stream id 0 or not as the type wants, fixed payload sizes, reserved bit
 * clear, only flags the type defines) with a length of at most H2_MAX_FRAME: the payload length
 * (~0 if not plausible). Random bytes pass with odds well under 1 in 10^4 per header; inference
 * wants two in a row.
 */
static __always_inline __u32 h2_frame(const __u8 *d, __u32 n, __u32 off)
{
	__u32 len, sid;
	__u8 type, flags, defined;
	bool zero;

	if (off > KSCOPE_L7_MAX_CAPTURE || off + H2_FRAME_HEADER > n)
		return ~0U;
	d += off & (KSCOPE_L7_MAX_CAPTURE - 1);
	len = ((__u32)d[0] << 16) | ((__u32)d[1] << 8) | d[2];
	type = d[3];
	flags = d[4];
	if (d[5] & 0x80 || len > H2_MAX_FRAME)
		return ~0U;
	sid = ((__u32)d[5] << 24) | ((__u32)d[6] << 16) | ((__u32)d[7] << 8) | d[8];
	zero = sid == 0;
	switch (type) {
	case 0: /* DATA: END_STREAM, PADDED; empty ones end a stream */
		defined = 0x09;
		if (zero || (!len && !(flags & 1)))
			return ~0U;
		break;
	case 1: /* HEADERS */
		defined = 0x2d;
		if (zero || !len)
			return ~0U;
		break;
	case 2: /* PRIORITY */
	case 3: /* RST_STREAM */
		defined = 0;
		if (zero || len != (type == 2 ? 5 : 4))
			return ~0U;
		break;
	case 4: /* SETTINGS */
		defined = 0x01;
		if (!zero || len % 6 || (flags & 1 && len))
			return ~0U;
		break;
	case 6: /* PING */
		defined = 0x01;
		if (!zero || len != 8)
			return ~0U;
		break;
	case 7: /* GOAWAY */
		defined = 0;
		if (!zero || len < 8)
			return ~0U;
		break;
	case 8: /* WINDOW_UPDATE */
		defined = 0;
		if (len != 4)
			return ~0U;
		break;
	case 9: /* CONTINUATION */
		defined = 0x04;
		if (zero || !len)
			return ~0U;
		break;
	default: /* PUSH_PROMISE (servers rarely push) and extensions: not enough to infer from */
		return ~0U;
	}
	return flags & ~defined ? ~0U : len;
}

/* HTTP/2 on a connection whose preface we missed (older than the agent): two plausible frame
 * headers in a row in one call's head, the first frame wholly inside it. */
static __always_inline bool h2_frames(const __u8 *d, __u32 n)
{
	__u32 len = h2_frame(d, n, 0);

	return len != ~0U && h2_frame(d, n, H2_FRAME_HEADER + len) != ~0U;
}

/* Role of the end that sent (egress) or received (ingress) a request. */
static __always_inline __u8 request_role(__u8 dir)
{
	return dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_CLIENT : KSCOPE_ROLE_SERVER;
}

/* HTTP/2: the client connection preface (RFC 9113 3.4), which only a client sends, or two plausible
 * frame headers in a row (a connection older than the agent; role 0, KSCOPE_ROLE_UNKNOWN: both
 * ends send frames alike, the caller asks the socket). */
static __always_inline __u8 infer_http2(const __u8 *d, __u32 n, __u8 dir, __u8 *role)
{
	if (has_prefix(d, n, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", H2_PREFACE_LEN)) {
		*role = request_role(dir);
		return KSCOPE_PROTO_HTTP2;
	}
	if (h2_frames(d, n)) {
		*role = KSCOPE_ROLE_UNKNOWN;
		return KSCOPE_PROTO_HTTP2;
	}
	return KSCOPE_PROTO_UNKNOWN;
}

/* HTTP/1: a request line or a status line, from either direction (no port involved). */
static __always_inline __u8 infer_http1(const __u8 *d, __u32 n, __u8 dir, __u8 *role)
{
	int kind = http_start(d, n);

	if (!kind)
		return KSCOPE_PROTO_UNKNOWN;
	/* a request we send or a response we read: we are the client */
	*role = (kind == 1) == (dir == KSCOPE_DIR_EGRESS) ? KSCOPE_ROLE_CLIENT : KSCOPE_ROLE_SERVER;
	return KSCOPE_PROTO_HTTP1;
}

static __always_inline bool is_digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

/* Redis: a command is a RESP array of bulk strings, "*<count>\r\n$<len>\r\n" (count < 10^7), what
 * redis-cli, redis-benchmark and every client library send, RESP2 and RESP3 alike. From the request
 * only, in either direction, at any port: a reply's first bytes ("+OK", ":1") are too common to tell.
 * The inline form (a command typed into telnet) is not inferred. */
static __always_inline __u8 infer_redis(const __u8 *d, __u32 n, __u8 dir, __u8 *role)
{
	__u32 i;

	if (n < 8 || d[0] != '*' || d[1] < '1' || d[1] > '9')
		return KSCOPE_PROTO_UNKNOWN;
	for (i = 2; i < 9; i++) {
		if (i + 4 >= n || (d[i] != '\r' && !is_digit(d[i])))
			return KSCOPE_PROTO_UNKNOWN;
		if (d[i] == '\r')
			break;
	}
	if (i == 9 || d[i + 1] != '\n' || d[i + 2] != '$' || !is_digit(d[i + 3]))
		return KSCOPE_PROTO_UNKNOWN;
	*role = request_role(dir);
	return KSCOPE_PROTO_REDIS;
}

#define MEMCACHED_PORT 11211

/* A memcached command word (with its separator) followed by a printable byte: the key, an argument.
 * Constant offsets only: a loop over the line here made the programs that inline infer() too big for
 * the verifier (each exit of the loop is a state it walks the rest of the program with). */
static __always_inline bool mc_word(const __u8 *d, __u32 n, const char *w, __u32 wlen)
{
	return n > wlen && has_prefix(d, n, w, wlen) && d[wlen] > 0x20 && d[wlen] < 0x7f;
}

/* Memcached text protocol: a command word, then its first argument. The classic commands are
 * recognised at any port; the two-letter meta commands and the admin ones only when either port is
 * 11211 (the port is the tie-breaker for short words other line protocols may use). From the request
 * only, in either direction. A wrong guess costs its parser's invalid_frames, counted. */
static __always_inline __u8 infer_memcached(const __u8 *d, __u32 n, __u8 dir, __u16 sport, __u16 dport, __u8 *role)
{
	bool known = mc_word(d, n, "get ", 4) || mc_word(d, n, "gets ", 5) || mc_word(d, n, "set ", 4) ||
		     mc_word(d, n, "add ", 4) || mc_word(d, n, "replace ", 8) || mc_word(d, n, "append ", 7) ||
		     mc_word(d, n, "prepend ", 8) || mc_word(d, n, "cas ", 4) || mc_word(d, n, "delete ", 7) ||
		     mc_word(d, n, "incr ", 5) || mc_word(d, n, "decr ", 5) || mc_word(d, n, "touch ", 6) ||
		     mc_word(d, n, "gat ", 4) || mc_word(d, n, "gats ", 5);

	if (!known && (sport == MEMCACHED_PORT || dport == MEMCACHED_PORT))
		known = mc_word(d, n, "mg ", 3) || mc_word(d, n, "ms ", 3) || mc_word(d, n, "md ", 3) ||
			mc_word(d, n, "ma ", 3) || has_prefix(d, n, "mn\r\n", 4) || has_prefix(d, n, "stats", 5) ||
			has_prefix(d, n, "version\r\n", 9) || has_prefix(d, n, "flush_all", 9);
	if (!known)
		return KSCOPE_PROTO_UNKNOWN;
	*role = request_role(dir);
	return KSCOPE_PROTO_MEMCACHED;
}

#define POSTGRES_PORT 5432
#define MYSQL_PORT 3306

/*
 * PostgreSQL if the head is one of its client messages (*role set). From any port: a
 * StartupMessage (int32 length, version 3.0) or SSLRequest/GSSENCRequest (length 8, its code), which
 * open every connection; and, for a connection older than us, a whole simple Query ('Q', int32 length,
 * text starting with a letter, NUL at its end) in the captured head. A Query longer than the head is
 * taken only on port 5432 (the tie-breaker).
 */
static __always_inline __u8 infer_postgres(const __u8 *d, __u32 n, __u8 dir, __u16 sport, __u16 dport, __u8 *role)
{
	__u32 len, code;
	__u8 c;

	if (n < 8)
		return KSCOPE_PROTO_UNKNOWN;
	len = be32(d);
	code = be32(d + 4);
	if ((len == 8 && (code == 80877103 || code == 80877104)) || (code == 196608 && len > 8 && len < 10000)) {
		*role = request_role(dir);
		return KSCOPE_PROTO_POSTGRESQL;
	}
	if (d[0] != 'Q' || d[1] != 0)
		return KSCOPE_PROTO_UNKNOWN;
	len = be32(d + 1);
	c = d[5] | 0x20; /* lower case */
	if (len < 6 || !((c >= 'a' && c <= 'z') || d[5] == '(' || d[5] == ' '))
		return KSCOPE_PROTO_UNKNOWN;
	if (len + 1 <= n) {
		if (d[len & READ_MASK] != 0)
			return KSCOPE_PROTO_UNKNOWN;
	} else if (sport != POSTGRES_PORT && dport != POSTGRES_PORT) {
		return KSCOPE_PROTO_UNKNOWN;
	}
	*role = request_role(dir);
	return KSCOPE_PROTO_POSTGRESQL;
}

/*
 * MySQL/MariaDB if the head is the server's greeting (sequence 0, protocol 10, a version that
 * starts with a digit: from any port; *role from who sent it), or, on port 3306 only (a tie-breaker:
 * four bytes and a command code say little), from a connection older than us: a command (sequence 0,
 * COM_QUERY/COM_STMT_PREPARE with a letter first, COM_STMT_EXECUTE, COM_PING) or a response's first
 * packet (sequence 1: OK, ERR or a column count).
 */
static __always_inline __u8 infer_mysql(const __u8 *d, __u32 n, __u8 dir, __u16 sport, __u16 dport, __u8 *role)
{
	__u32 len;
	__u8 c;

	if (n < 5 || d[3] > 1)
		return KSCOPE_PROTO_UNKNOWN;
	len = d[0] | (__u32)d[1] << 8 | (__u32)d[2] << 16;
	if (d[3] == 0 && d[4] == 0x0a && len >= 20 && len < 1024 && n >= 6 && d[5] >= '0' && d[5] <= '9') {
		/* the server speaks first: a greeting we send makes us the server */
		*role = dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
		return KSCOPE_PROTO_MYSQL;
	}
	if (sport != MYSQL_PORT && dport != MYSQL_PORT)
		return KSCOPE_PROTO_UNKNOWN;
	c = n >= 6 ? (d[5] | 0x20) : 0;
	if (d[3] == 0 && (((d[4] == 0x03 || d[4] == 0x16) && len >= 2 && c >= 'a' && c <= 'z') ||
			  (d[4] == 0x17 && len >= 10) || (d[4] == 0x0e && len == 1))) {
		*role = request_role(dir);
		return KSCOPE_PROTO_MYSQL;
	}
	/* a response (sequence 1: OK, ERR, a result's column count) leaving or reaching port 3306: the
	 * server reads a packet's header and payload in two calls, so its commands never tell */
	if (d[3] == 1 &&
	    ((d[4] == 0x00 && len >= 7) || (d[4] == 0xff && len >= 9) || (d[4] >= 1 && d[4] <= 250 && len == 1))) {
		if (dir == KSCOPE_DIR_EGRESS ? sport == MYSQL_PORT : dport == MYSQL_PORT) {
			*role = dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
			return KSCOPE_PROTO_MYSQL;
		}
	}
	return KSCOPE_PROTO_UNKNOWN;
}

/* Decide the protocol of a connection from one call's head; KSCOPE_PROTO_UNKNOWN if it
 * does not tell. *role is set only when a protocol is returned (0 for HTTP/2 found from frames).
 * Each TCP protocol is one line of the dispatch, tried in order. */
static __always_inline __u8 infer(const __u8 *d, __u32 n, __u8 dir, __u8 ip_proto, __u16 sport, __u16 dport,
				  __u8 *role)
{
	__u8 proto;

	if (sport == DNS_PORT || dport == DNS_PORT) {
		/* DNS header: 12 bytes (over TCP after a 2-byte length), one question */
		__u32 off = ip_proto == IPPROTO_TCP ? 2 : 0;

		if (n >= off + 12 && d[off + 4] == 0 && d[off + 5] == 1) {
			*role = sport == DNS_PORT ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
			return KSCOPE_PROTO_DNS;
		}
		return KSCOPE_PROTO_UNKNOWN;
	}
	if (ip_proto != IPPROTO_TCP)
		return KSCOPE_PROTO_UNKNOWN;
	if ((proto = infer_http2(d, n, dir, role)))
		return proto;
	if ((proto = infer_http1(d, n, dir, role)))
		return proto;
	if ((proto = infer_redis(d, n, dir, role)))
		return proto;
	if ((proto = infer_memcached(d, n, dir, sport, dport, role)))
		return proto;
	if ((proto = infer_postgres(d, n, dir, sport, dport, role)))
		return proto;
	if ((proto = infer_mysql(d, n, dir, sport, dport, role)))
		return proto;
	return KSCOPE_PROTO_UNKNOWN;
}

/* The role of a socket whose protocol did not tell it (HTTP/2 from frames): an accepted socket
 * inherits its listener's backlog, a connected one has none. CO-RE read: scalar or BTF `sk`. */
static __always_inline __u8 l7_socket_role(const struct sock *sk)
{
	return BPF_CORE_READ(sk, sk_max_ack_backlog) ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
}

/* Bytes to capture per call on a socket of `protocol`: the capture_bytes knob, but all we may
 * (KSCOPE_L7_MAX_CAPTURE) for HTTP/2 and for calls still being inferred (they may be HTTP/2). An
 * HTTP/2 call carries many frames, and HEADERS frames anywhere in it must arrive whole for HPACK
 * to stay in step; DATA payloads inside the capture are skipped in user space. */
static __always_inline __u32 l7_capture_bound(__u8 protocol, __u32 knob)
{
	return protocol == KSCOPE_PROTO_HTTP2 || protocol == KSCOPE_PROTO_UNKNOWN ? KSCOPE_L7_MAX_CAPTURE : knob;
}

/* A TLS record header: content type 20..24, version 3.x (SSL 3.0 .. TLS 1.3 framing). */
static __always_inline bool is_tls_record(const __u8 *d, __u32 n)
{
	return n >= 5 && d[0] >= 20 && d[0] <= 24 && d[1] == 3 && d[2] <= 4;
}

/* Bytes to capture of a call that moved `len` bytes from a buffer of `avail` bytes
 * (~0 when the whole call is one buffer), at most `bound` (the capture_bytes knob). */
static __always_inline __u32 l7_clamp_capture(__u64 len, __u64 avail, __u32 bound)
{
	__u64 n = len;

	if (n > avail)
		n = avail;
	if (n > bound)
		n = bound;
	if (n > KSCOPE_L7_MAX_CAPTURE)
		n = KSCOPE_L7_MAX_CAPTURE;
	return n;
}

/* Unconnected UDP: the peer is in the call's sockaddr (msg_name / sendto's and
 * recvfrom's addr). A failed read leaves the header as it was. */
static __always_inline void read_peer(struct kscope_l7_header *h, const void *uaddr)
{
	struct sockaddr_in6 sa = {};

	if (!uaddr || bpf_probe_read_user(&sa, sizeof(sa), uaddr))
		return;
	if (sa.sin6_family == AF_INET6) {
		h->dport = bpf_ntohs(sa.sin6_port);
		__builtin_memcpy(h->daddr, &sa.sin6_addr, 16);
	} else if (sa.sin6_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&sa;

		h->dport = bpf_ntohs(sin->sin_port);
		__builtin_memset(h->daddr, 0, 10);
		h->daddr[10] = h->daddr[11] = 0xff;
		*(__u32 *)&h->daddr[12] = sin->sin_addr.s_addr;
	}
}

/* A message call's iovec array (sendmsg/recvmsg and the mmsg pair), for l7_read_head to read past
 * the first buffer: vectored writers put a frame header in one iovec and its payload in the next
 * (grpc-c: an HTTP/2 HEADERS frame's 9 bytes, then its block, a few iovecs per call, hundreds
 * per write when many calls are in flight). Filled by l7_user_buffer for those calls only, read by
 * l7_read_head only when the first buffer is shorter than the capture, within one program run on
 * one CPU. readv/writev keep their first buffer: their count is the 3rd argument, which the
 * callers do not pass. The walk runs in bpf_loop (the verifier checks its step once, whatever
 * the count); the syscall fallback (l7_syscalls.bpf.c) sets L7_IOV_WALK 0: its sys_exit program
 * captures each message of an mmsg call in a loop, and even a short walk inside that loop passed
 * the verifier's 1M instructions there (E2BIG at load). */
#ifndef L7_IOV_WALK
#define L7_IOV_WALK 1
#endif
#define L7_MAX_IOV 1024 /* UIO_MAXIOV */
struct l7_vec {
	const struct iovec *iov;
	__u64 cnt;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l7_vec);
} l7_vec SEC(".maps");

/* Forget the last call's iovecs: called at the start of each program run that may read them, so a
 * call that is not a message call (readv, write ...) never walks another call's array. */
static __always_inline void l7_vec_clear(void)
{
	__u32 zero = 0;
	struct l7_vec *vec = bpf_map_lookup_elem(&l7_vec, &zero);

	if (vec)
		vec->cnt = 0;
}

/*
 * The user buffer of the current socket call, from the task's saved syscall registers
 * (x86-64: nr = orig_ax, si = 2nd argument, r8 = 5th). The registers still hold the
 * arguments at syscall exit (the kernel writes only ax), so this works from the socket
 * tracepoints and from sys_exit alike. The caller reads the registers (plain loads
 * through a BTF pt_regs pointer cost no helper call).
 *
 * Vector calls give their first iovec (*avail = its length); message calls note the array in
 * l7_vec for l7_read_head (readv/writev do not: noting theirs too pushed l7_send past the
 * verifier's complexity bound). For sendmmsg/recvmmsg
 * `mmsg_idx` picks the message of the vector (the caller knows which one it is).
 * *uaddr is the call's sockaddr (sendto/recvfrom addr, msghdr.msg_name) or 0.
 * Returns 0 when the call has no user buffer (sendfile, splice ...) or it is unreadable.
 */
static __always_inline const void *l7_user_buffer(__u64 nr, __u64 si, __u64 r8, __u32 mmsg_idx, __u64 *avail,
						  const void **uaddr)
{
	struct user_msghdr msg;
	struct iovec iov;
	struct l7_vec *vec;
	__u32 zero = 0;

	*uaddr = 0;
	*avail = ~0ULL;
	switch (nr) {
	case NR_read:
	case NR_write:
		return (const void *)si;
	case NR_sendto:
	case NR_recvfrom:
		*uaddr = (const void *)r8;
		return (const void *)si;
	case NR_readv:
	case NR_writev:
		if (bpf_probe_read_user(&iov, sizeof(iov), (void *)si))
			return 0;
		*avail = iov.iov_len;
		return iov.iov_base;
	case NR_sendmsg:
	case NR_recvmsg:
		break;
	case NR_sendmmsg:
	case NR_recvmmsg:
		si += (__u64)mmsg_idx * sizeof(struct mmsghdr);
		break;
	default:
		return 0; /* sendfile, splice, io_uring ...: no user buffer here */
	}
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)si))
		return 0;
	*uaddr = msg.msg_name;
	if (!msg.msg_iovlen || bpf_probe_read_user(&iov, sizeof(iov), msg.msg_iov))
		return 0;
	*avail = iov.iov_len;
	vec = bpf_map_lookup_elem(&l7_vec, &zero);
	if (vec) {
		vec->iov = msg.msg_iov;
		vec->cnt = msg.msg_iovlen;
	}
	return iov.iov_base;
}

/* The socket's addresses; IPv4 as ::ffff:a.b.c.d so nothing downstream branches on family.
 * CO-RE reads: works on a scalar `sk` (fd walk) as on a BTF one (tracepoint argument). */
static __always_inline void read_tuple_core(struct kscope_l7_header *h, const struct sock *sk)
{
	const struct sock_common *c = &sk->__sk_common;

	h->family = BPF_CORE_READ(c, skc_family);
	h->sport = BPF_CORE_READ(c, skc_num);
	if (!h->sport) /* unhashed while closing: inet_sport outlives skc_num */
		h->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	h->dport = bpf_ntohs(BPF_CORE_READ(c, skc_dport));
	if (h->family == AF_INET6) {
		bpf_core_read(h->saddr, 16, &c->skc_v6_rcv_saddr);
		bpf_core_read(h->daddr, 16, &c->skc_v6_daddr);
		return;
	}
	__builtin_memset(h->saddr, 0, 16);
	__builtin_memset(h->daddr, 0, 16);
	h->saddr[10] = h->saddr[11] = 0xff;
	h->daddr[10] = h->daddr[11] = 0xff;
	*(__u32 *)&h->saddr[12] = BPF_CORE_READ(c, skc_rcv_saddr);
	*(__u32 *)&h->daddr[12] = BPF_CORE_READ(c, skc_daddr);
}

/* The network namespace inode of a socket (CO-RE: skc_net is possible_net_t). */
static __always_inline __u32 sock_netns_ino(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* ---- maps both objects share: user space finds them by these names in either one ---- */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KSCOPE_L7_RING_BYTES);
} l7_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KSCOPE_L7_STATS);
	__type(key, __u32);
	__type(value, __u64);
} l7_stats SEC(".maps");

/* A chunk record being built: header, then up to capture_bytes of the call's head. */
struct chunk {
	struct kscope_l7_header hdr;
	__u8 data[2 * KSCOPE_L7_MAX_CAPTURE];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct chunk);
} l7_scratch SEC(".maps");

/* infer() on a chunk's head, as a function the verifier checks once, on its own: inlined with every
 * protocol's inference into each capture path, l7_send and l7_sys_exit passed the verifier's
 * complexity bound. Global functions take five arguments: `dir` and `ip_proto` share one, the
 * two ports the other (sport << 16 | dport). */
__attribute__((noinline)) int l7_infer(struct chunk *c, __u32 n, __u32 dir_proto, __u32 ports, __u8 *role)
{
	if (!c || !role)
		return KSCOPE_PROTO_UNKNOWN;
	if (n > KSCOPE_L7_MAX_CAPTURE)
		n = KSCOPE_L7_MAX_CAPTURE;
	return infer(c->data, n, dir_proto >> 8, dir_proto & 0xff, ports >> 16, ports & 0xffff, role);
}

/* The arguments l7_infer packs. */
static __always_inline __u8 infer_chunk(struct chunk *c, __u32 n, __u8 dir, __u8 ip_proto, __u16 sport, __u16 dport,
					__u8 *role)
{
	return l7_infer(c, n, (__u32)dir << 8 | ip_proto, (__u32)sport << 16 | dport, role);
}

/* enum kscope_l7_stat: the counter both objects keep at the same index. */
static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&l7_stats, &idx);

	if (v)
		*v += 1;
}

struct l7_iov_walk {
	__u64 iov;  /* user address of the iovec array */
	__u64 cnt;  /* its entries */
	__u32 n;    /* bytes in l7_scratch's data so far */
	__u32 want; /* bytes to capture */
};

/* One iovec after the first (bpf_loop step i reads iovec i + 1) appended to l7_scratch's data: the
 * chunk being built (every caller of l7_read_head builds it there). 1 stops the walk. */
static long l7_iov_step(__u32 i, void *arg)
{
	struct l7_iov_walk *w = arg;
	struct iovec iov;
	struct chunk *c;
	__u32 zero = 0, take, n = w->n;
	__u64 idx = (__u64)i + 1;

	if (idx >= w->cnt || n >= w->want)
		return 1;
	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c || bpf_probe_read_user(&iov, sizeof(iov), (const void *)(w->iov + idx * sizeof(iov))))
		return 1;
	take = w->want - n;
	if (take > iov.iov_len)
		take = iov.iov_len;
	/* n < want <= KSCOPE_L7_MAX_CAPTURE, so both masks keep their values; they show the verifier
	 * that n + take stays inside data (2 * KSCOPE_L7_MAX_CAPTURE) */
	if (take && bpf_probe_read_user(c->data + (n & (KSCOPE_L7_MAX_CAPTURE - 1)), take & (KSCOPE_L7_MAX_CAPTURE - 1),
					iov.iov_base))
		return 1;
	w->n = n + take;
	return 0;
}

#if L7_IOV_WALK
/* The walk past a message call's first buffer: `n` bytes are in l7_scratch's data, up to `want`
 * (<= KSCOPE_L7_MAX_CAPTURE) are wanted; returns the bytes there after it. A global function, so
 * the verifier checks it once, on its own, instead of inside every path of every caller (inlined,
 * it pushed l7_send past the verifier's 1M instructions with the summary knobs set). */
__attribute__((noinline)) __u32 l7_iov_walk(__u32 n, __u32 want)
{
	__u32 zero = 0;
	struct l7_vec *vec = bpf_map_lookup_elem(&l7_vec, &zero);
	struct l7_iov_walk w = { .n = n, .want = want };

	if (!vec || vec->cnt < 2 || want > KSCOPE_L7_MAX_CAPTURE)
		return n;
	w.iov = (__u64)vec->iov;
	w.cnt = vec->cnt; /* kept: the HTTP/2 frame walk (l7_h2.h) reads the same call's iovecs after */
	bpf_loop(w.cnt < L7_MAX_IOV ? w.cnt - 1 : L7_MAX_IOV - 1, l7_iov_step, &w, 0);
	return w.n;
}
#endif

/* Copy the head of a call's user buffer (0: none) into c->data (c: l7_scratch's chunk): the bytes
 * captured, 0 when there is no buffer or it cannot be read (counted). `len`, `avail`: as
 * l7_clamp_capture. A message call whose first buffer is shorter goes on into the next ones. */
static __always_inline __u32 l7_read_head(struct chunk *c, const void *buf, __u64 len, __u64 avail, __u32 bound)
{
	__u32 n = buf ? l7_clamp_capture(len, avail, bound) : 0;

	if (n && bpf_probe_read_user(c->data, n & READ_MASK, buf)) {
		stat_inc(KSCOPE_L7_STAT_READ_FAILED);
		return 0;
	}
#if L7_IOV_WALK
	if (n && n == avail) {
		__u32 want = l7_clamp_capture(len, ~0ULL, bound);

		if (n < want) {
			n = l7_iov_walk(n, want);
			if (n > want) /* never, but the verifier knows only what it sees here */
				n = want;
		}
	}
#endif
	return n;
}

/* Whether the calling process is the agent: `tgid` in the pid namespace (`dev`, `ino`) the agent
 * runs in (0: check nothing). Its own sockets (gRPC to the processor, OTLP out of `kscope run`)
 * would only describe kscope to itself, one more record per shipment, so they are not parsed.
 * A global function: verified once, whatever calls it. */
__attribute__((noinline)) int l7_own_call(__u64 dev, __u64 ino, __u32 tgid)
{
	struct bpf_pidns_info ns = {};

	if (!tgid || bpf_get_ns_current_pid_tgid(dev, ino, &ns, sizeof(ns)))
		return 0;
	return ns.tgid == tgid;
}

/* A call whose bytes did not tell the protocol: after MAX_INFER_ATTEMPTS of them the socket
 * is ignored for good (counted). */
static __always_inline void l7_infer_failed(__u8 *protocol, __u8 *attempts)
{
	if (++*attempts >= MAX_INFER_ATTEMPTS) {
		*protocol = KSCOPE_PROTO_IGNORED;
		stat_inc(KSCOPE_L7_STAT_IGNORED);
	}
}

/* The chunk header's fields that describe the call: `len` bytes moved, `n` of them captured,
 * from a user buffer or none (flagged and counted). The socket's fields are the caller's. */
static __always_inline void l7_chunk_call(struct chunk *c, bool has_buf, __u32 n, __u64 len, __u64 seq, __u8 dir,
					  __u8 protocol, __u8 role, __u8 ip_proto)
{
	if (!has_buf) {
		c->hdr.flags |= KSCOPE_L7_NO_BUFFER;
		stat_inc(KSCOPE_L7_STAT_NO_BUFFER);
	}
	if (n < len)
		c->hdr.flags |= KSCOPE_L7_TRUNCATED;
	c->hdr.type = KSCOPE_REC_L7;
	c->hdr.direction = dir;
	c->hdr.protocol = protocol;
	c->hdr.role = role;
	c->hdr.ip_proto = ip_proto;
	c->hdr.seq = seq;
	c->hdr.len = len;
}

#endif /* KSCOPE_L7_PROTO_H */
