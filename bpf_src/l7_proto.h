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

/* A vector call's iovec array (readv/writev, sendmsg/recvmsg and the mmsg calls' message). */
struct l7_vec {
	const struct iovec *iov;
	__u64 count;
};

#define L7_GATHER_IOVS 8 /* iovecs of one call gathered into its head (the first one included) */

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

/* Role of the end that sent (egress) or received (ingress) a request. */
static __always_inline __u8 request_role(__u8 dir)
{
	return dir == KSCOPE_DIR_EGRESS ? KSCOPE_ROLE_CLIENT : KSCOPE_ROLE_SERVER;
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

/* Decide the protocol of a connection from one call's head; KSCOPE_PROTO_UNKNOWN if it
 * does not tell. *role is set only when a protocol is returned. Each TCP protocol is one
 * line of the dispatch, tried in order. */
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
	if ((proto = infer_http1(d, n, dir, role)))
		return proto;
	if ((proto = infer_redis(d, n, dir, role)))
		return proto;
	if ((proto = infer_memcached(d, n, dir, sport, dport, role)))
		return proto;
	return KSCOPE_PROTO_UNKNOWN;
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
 * (x86-64: nr = orig_ax, si = 2nd argument, dx = 3rd, r8 = 5th). The registers still hold the
 * arguments at syscall exit (the kernel writes only ax), so this works from the socket
 * tracepoints and from sys_exit alike. The caller reads the registers (plain loads
 * through a BTF pt_regs pointer cost no helper call).
 *
 * Vector calls give their first iovec (*avail = its length) and, in *vec, the iovec array the
 * rest of the call's bytes are in (l7_read_head gathers from it). For sendmmsg/recvmmsg
 * `mmsg_idx` picks the message of the vector (the caller knows which one it is).
 * *uaddr is the call's sockaddr (sendto/recvfrom addr, msghdr.msg_name) or 0.
 * Returns 0 when the call has no user buffer (sendfile, splice ...) or it is unreadable.
 */
static __always_inline const void *l7_user_buffer(__u64 nr, __u64 si, __u64 dx, __u64 r8, __u32 mmsg_idx,
						  __u64 *avail, const void **uaddr, struct l7_vec *vec)
{
	struct user_msghdr msg;
	struct iovec iov;

	*uaddr = 0;
	*avail = ~0ULL;
	vec->iov = 0;
	vec->count = 0;
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
		vec->iov = (const struct iovec *)si;
		vec->count = dx;
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
	vec->iov = msg.msg_iov;
	vec->count = msg.msg_iovlen;
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

/* After a vector call's first iovec (n bytes captured of the call's len), the next ones in order,
 * up to the capture bound: a reply written with writev/sendmsg in pieces (memcached's VALUE line,
 * the value, END; nginx's head and body) is captured as the bytes the peer reads. At most
 * L7_GATHER_IOVS buffers (bounded loop); what lies beyond is a truncation, as before. */
static __always_inline __u32 l7_gather(struct chunk *c, __u32 n, __u64 len, __u32 bound, const struct l7_vec *vec)
{
	__u64 cap = l7_clamp_capture(len, ~0ULL, bound);
	struct iovec iov;

	for (__u32 i = 1; i < L7_GATHER_IOVS; i++) {
		__u64 take;

		if (i >= vec->count || n >= cap || bpf_probe_read_user(&iov, sizeof(iov), &vec->iov[i]))
			break;
		take = iov.iov_len < cap - n ? iov.iov_len : cap - n;
		/* n < cap <= KSCOPE_L7_MAX_CAPTURE and take <= cap - n: both masks are the identity, and
		 * tell the verifier the copy stays inside the 2 * KSCOPE_L7_MAX_CAPTURE data buffer */
		if (take && bpf_probe_read_user(c->data + (n & (KSCOPE_L7_MAX_CAPTURE - 1)),
						take & (KSCOPE_L7_MAX_CAPTURE - 1), iov.iov_base))
			break;
		n += take;
	}
	return n;
}

/* Copy the head of a call's user buffer (0: none) into c->data: the bytes captured, 0 when
 * there is no buffer or it cannot be read (counted). `len`, `avail`: as l7_clamp_capture;
 * `vec` (or 0): the call's iovec array, gathered from when the first buffer is shorter. */
static __always_inline __u32 l7_read_head(struct chunk *c, const void *buf, __u64 len, __u64 avail, __u32 bound,
					  const struct l7_vec *vec)
{
	__u32 n = buf ? l7_clamp_capture(len, avail, bound) : 0;

	if (n && bpf_probe_read_user(c->data, n & READ_MASK, buf)) {
		stat_inc(KSCOPE_L7_STAT_READ_FAILED);
		return 0;
	}
	if (n && vec && vec->iov && avail < len)
		n = l7_gather(c, n, len, bound, vec);
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
