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

/* The role of a connection whose client-to-server message went `dir`. */
static __always_inline __u8 role_of_request(__u8 dir)
{
	return dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_CLIENT : KSCOPE_ROLE_SERVER;
}

#define POSTGRES_PORT 5432
#define MYSQL_PORT 3306

/*
 * PostgreSQL, true if the head is one of its client messages (*role set). From any port: a
 * StartupMessage (int32 length, version 3.0) or SSLRequest/GSSENCRequest (length 8, its code), which
 * open every connection; and, for a connection older than us, a whole simple Query ('Q', int32 length,
 * text starting with a letter, NUL at its end) in the captured head. A Query longer than the head is
 * taken only on port 5432 (the tie-breaker).
 */
static __always_inline bool infer_postgres(const __u8 *d, __u32 n, __u8 dir, __u16 sport, __u16 dport, __u8 *role)
{
	__u32 len, code;
	__u8 c;

	if (n < 8)
		return false;
	len = be32(d);
	code = be32(d + 4);
	if ((len == 8 && (code == 80877103 || code == 80877104)) || (code == 196608 && len > 8 && len < 10000)) {
		*role = role_of_request(dir);
		return true;
	}
	if (d[0] != 'Q' || d[1] != 0)
		return false;
	len = be32(d + 1);
	c = d[5] | 0x20; /* lower case */
	if (len < 6 || !((c >= 'a' && c <= 'z') || d[5] == '(' || d[5] == ' '))
		return false;
	if (len + 1 <= n) {
		if (d[len & READ_MASK] != 0)
			return false;
	} else if (sport != POSTGRES_PORT && dport != POSTGRES_PORT) {
		return false;
	}
	*role = role_of_request(dir);
	return true;
}

/*
 * MySQL/MariaDB, true if the head is the server's greeting (sequence 0, protocol 10, a version that
 * starts with a digit: from any port; *role from who sent it), or, on port 3306 only (a tie-breaker:
 * four bytes and a command code say little), from a connection older than us: a command (sequence 0,
 * COM_QUERY/COM_STMT_PREPARE with a letter first, COM_STMT_EXECUTE, COM_PING) or a response's first
 * packet (sequence 1: OK, ERR or a column count).
 */
static __always_inline bool infer_mysql(const __u8 *d, __u32 n, __u8 dir, __u16 sport, __u16 dport, __u8 *role)
{
	__u32 len;
	__u8 c;

	if (n < 5 || d[3] > 1)
		return false;
	len = d[0] | (__u32)d[1] << 8 | (__u32)d[2] << 16;
	if (d[3] == 0 && d[4] == 0x0a && len >= 20 && len < 1024 && n >= 6 && d[5] >= '0' && d[5] <= '9') {
		/* the server speaks first: a greeting we send makes us the server */
		*role = dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
		return true;
	}
	if (sport != MYSQL_PORT && dport != MYSQL_PORT)
		return false;
	c = n >= 6 ? (d[5] | 0x20) : 0;
	if (d[3] == 0 && (((d[4] == 0x03 || d[4] == 0x16) && len >= 2 && c >= 'a' && c <= 'z') ||
			  (d[4] == 0x17 && len >= 10) || (d[4] == 0x0e && len == 1))) {
		*role = role_of_request(dir);
		return true;
	}
	/* a response (sequence 1: OK, ERR, a result's column count) leaving or reaching port 3306: the
	 * server reads a packet's header and payload in two calls, so its commands never tell */
	if (d[3] == 1 &&
	    ((d[4] == 0x00 && len >= 7) || (d[4] == 0xff && len >= 9) || (d[4] >= 1 && d[4] <= 250 && len == 1))) {
		if (dir == KSCOPE_DIR_EGRESS ? sport == MYSQL_PORT : dport == MYSQL_PORT) {
			*role = dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
			return true;
		}
	}
	return false;
}

/* Decide the protocol of a connection from one call's head; KSCOPE_PROTO_UNKNOWN if it
 * does not tell. *role is set only when a protocol is returned. */
static __always_inline __u8 infer(const __u8 *d, __u32 n, __u8 dir, __u8 ip_proto, __u16 sport, __u16 dport,
				  __u8 *role)
{
	int kind;

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
	if (infer_postgres(d, n, dir, sport, dport, role))
		return KSCOPE_PROTO_POSTGRESQL;
	if (infer_mysql(d, n, dir, sport, dport, role))
		return KSCOPE_PROTO_MYSQL;
	kind = http_start(d, n);
	if (!kind)
		return KSCOPE_PROTO_UNKNOWN;
	/* a request we send or a response we read: we are the client */
	*role = (kind == 1) == (dir == KSCOPE_DIR_EGRESS) ? KSCOPE_ROLE_CLIENT : KSCOPE_ROLE_SERVER;
	return KSCOPE_PROTO_HTTP1;
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

/*
 * The user buffer of the current socket call, from the task's saved syscall registers
 * (x86-64: nr = orig_ax, si = 2nd argument, r8 = 5th). The registers still hold the
 * arguments at syscall exit (the kernel writes only ax), so this works from the socket
 * tracepoints and from sys_exit alike. The caller reads the registers (plain loads
 * through a BTF pt_regs pointer cost no helper call).
 *
 * Vector calls give their first iovec (*avail = its length). For sendmmsg/recvmmsg
 * `mmsg_idx` picks the message of the vector (the caller knows which one it is).
 * *uaddr is the call's sockaddr (sendto/recvfrom addr, msghdr.msg_name) or 0.
 * Returns 0 when the call has no user buffer (sendfile, splice ...) or it is unreadable.
 */
static __always_inline const void *l7_user_buffer(__u64 nr, __u64 si, __u64 r8, __u32 mmsg_idx, __u64 *avail,
						  const void **uaddr)
{
	struct user_msghdr msg;
	struct iovec iov;

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

/* enum kscope_l7_stat: the counter both objects keep at the same index. */
static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&l7_stats, &idx);

	if (v)
		*v += 1;
}

/* Copy the head of a call's user buffer (0: none) into c->data: the bytes captured, 0 when
 * there is no buffer or it cannot be read (counted). `len`, `avail`: as l7_clamp_capture. */
static __always_inline __u32 l7_read_head(struct chunk *c, const void *buf, __u64 len, __u64 avail, __u32 bound)
{
	__u32 n = buf ? l7_clamp_capture(len, avail, bound) : 0;

	if (n && bpf_probe_read_user(c->data, n & READ_MASK, buf)) {
		stat_inc(KSCOPE_L7_STAT_READ_FAILED);
		n = 0;
	}
	return n;
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
