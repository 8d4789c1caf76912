// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L7: the heads of application messages, only for connections we parse.
 *
 * The socket tracepoints (sock_send_length / sock_recv_length) fire only for socket
 * I/O and hand over the socket; the user buffer is found through the task's saved
 * syscall registers (orig_ax = syscall number, si = buffer or iovec/msghdr). Measured
 * on our kernel (shared/KERNEL.md) that kept 90% of nginx's throughput where syscall
 * enter/exit tracepoints with an fd walk kept 78%. The protocol is decided in the
 * kernel from a connection's first bytes and kept in socket-local storage: sockets we
 * do not parse cost one storage lookup per call and never reach the ring buffer.
 * OpenSSL plaintext comes from uprobes on SSL_read/SSL_write(_ex); the ciphertext
 * of those sockets is not captured.
 *
 * Plain-text HTTP/1 over TCP does not send chunks: request and response are paired here
 * (per-socket exchange state, see "HTTP/1 exchanges" below) and one fixed-size record per
 * exchange and side leaves on its own ring. DNS, TLS plaintext and HTTP/1 sockets that
 * pipeline (which the pairing cannot follow) send chunks, one per call, as before.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "limits.h"
#include "netns_pending.h"
#include "l7_proto.h"
#include "task.h"
#include "sock.h" /* read_tuple: direct loads on the tracepoint's BTF socket, cheaper than read_tuple_core */

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_MMSG 64

/* Runtime knobs, set by user space before load. */
const volatile __u32 capture_bytes = 1024; /* head bytes captured per call, <= KSCOPE_L7_MAX_CAPTURE */
const volatile __u32 filter_netns_ino = 0; /* 0: every network namespace */
const volatile __u8 exchanges = 1;         /* 0: HTTP/1 goes through chunks as well */
const volatile __u64 idle_ns = 500000000;  /* the sweep emits an answered exchange idle this long */
const volatile __u64 unanswered_ns = 300000000000ULL; /* ... and an unanswered one this old */
/* The sampler: each CPU gives an exchange a record of its own once per record_cost_ns of
 * credit (credit accrues with time, at most one second's worth: the burst); the others are
 * summed per socket (see "Summaries"). 0: every exchange is a record. */
const volatile __u64 record_cost_ns = 0;
const volatile __u64 summary_ns = 1000000000ULL; /* the sweep sends a summary this long after its first exchange */

struct l7_sock {
	__u64 seq[2];   /* bytes seen per direction (index direction - 1) */
	__u8 protocol;  /* enum kscope_l7_protocol */
	__u8 attempts;  /* calls whose bytes did not tell the protocol */
	__u8 role;      /* enum kscope_l4_role */
	__u8 tls;       /* ciphertext: the plaintext comes from the uprobes */
	__u8 chunks;    /* HTTP/1 that the exchange path cannot follow (pipelining): chunks for good */
	__u8 _pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct l7_sock);
} l7_socks SEC(".maps");

/*
 * HTTP/1 exchange state, only for plain-text TCP sockets decided HTTP/1 (a separate map so
 * the sockets we ignore keep their small l7_sock). Written by the socket's own calls, read
 * and retired by the destroy hook and by the periodic sweep (an iterator run by user space
 * on another CPU): every access holds the spin lock, and no helper is called under it, so
 * records are filled from the locked copy and the socket fields are read before locking.
 */
enum xstate {
	XS_NONE = 0,     /* no exchange in flight */
	XS_REQUEST = 1,  /* request seen, waiting for its final response */
	XS_ANSWERED = 2, /* final response seen; emitted by the next request, close or sweep */
	XS_EMITTED = 3,  /* the sweep sent it: later response bytes are late (counted) */
};

/* Exchanges of one socket with the same request line up to the path's end (method and path)
 * and the same status, summed; count 0: free. */
struct l7_slot {
	__u64 path_hash;
	__u64 first_ns; /* the first summed request's start */
	__u64 last_ns;  /* the last summed request's start */
	__u64 lat_sum;
	__u64 lat_min;
	__u64 lat_max;
	__u64 req_bytes;
	__u64 resp_bytes;
	__u32 count;
	__u16 status;
	__u16 head_len;
	__u8 method;
	__u8 flags;
	__u8 _pad[6];
	__u32 buckets[KSCOPE_L7_LATENCY_BUCKETS];
	__u8 head[KSCOPE_L7_SUMMARY_HEAD];
};

#define L7_SLOTS 4 /* keys summed at once per socket; a fifth key sends the least used slot's summary early */

struct l7_xchg {
	struct bpf_spin_lock lock;
	__u8 state;  /* enum xstate */
	__u8 method; /* enum kscope_http_method */
	__u8 flags;  /* enum kscope_l7_exchange_flags */
	__u8 role;   /* enum kscope_l4_role, copied from l7_sock (the sweep reads only this map) */
	__u64 req_seq; /* stream offset of the request's first byte (the fallback re-sends its head) */
	__u64 start_ns;
	__u64 resp_ns;
	__u64 last_ns; /* the exchange's latest call: the sweep emits answered exchanges idle past idle_ns */
	__u64 req_bytes;
	__u64 resp_bytes;
	__u32 tgid;
	__u32 pid;
	__u16 status;
	__u16 head_len;
	__u8 sampled; /* the sampler picked this exchange (or summaries are off): a record of its own */
	__u8 cur;     /* which head[] is this exchange's (see xchg_call) */
	__u8 _pad1[2];
	__u64 path_hash; /* of this request's line up to its path's end; 0: not summable */
	__u64 swept; /* the sweep pass that last met it (bpf_iter_meta.session_id); only the sweep uses it */
	__u8 comm[16];
	__u16 head_fill[2]; /* bytes of each head[] that may be non-zero (zero after them) */
	__u32 marked; /* its namespace is marked for the next sweep (netns_pending.h); under the lock */
	/* Two heads: a request is read into the one the current exchange does not use, which
	 * becomes current when the request is taken (xchg_request, under the lock). The current
	 * head may still be sent or summed (by the next request, the sweep or close) until then;
	 * this way it is never copied: a 384-byte memset and copy per request were ~1/3 of the
	 * exchange path's cost (BPF stats, keep-alive nginx). */
	__u8 head[2][KSCOPE_L7_HEAD];
	struct l7_slot slots[L7_SLOTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct l7_xchg);
} l7_xchg SEC(".maps");

NETNS_PENDING_MAPS(l7_netns_pending, l7_netns_walk_all);

_Static_assert(sizeof(struct kscope_l7_exchange) % 8 == 0, "ring records are 8-byte aligned: keep the stride exact");

/* Exchange records only: every record the same size, so user space reads a batch as one
 * contiguous block (the data area is mapped twice) at a fixed stride, without a header walk.
 * 16 MiB = 32k exchanges: ~200 ms of a saturated 2-core nginx (both ends traced) between
 * two drains, the gap a starved or collecting (GC) agent was measured to leave at 8 MiB. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KSCOPE_L7_XRING_BYTES);
} l7_xring SEC(".maps");

/* ---- OpenSSL: what a thread is doing inside SSL_read/SSL_write, and each SSL's socket ---- */

struct tls_call {
	__u64 ssl;
	__u64 buf;
	__u64 ex_len_ptr; /* SSL_*_ex: where the byte count is written; 0 otherwise */
	__u8 direction;
	__u8 _pad[7];
};

struct tls_conn {
	__u64 sock_cookie;
	__u64 seq[2];
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 netns_ino;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 protocol; /* of the plaintext */
	__u8 attempts;
	__u8 role;
	__u8 _pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* thread id */
	__type(value, struct tls_call);
} tls_calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* SSL * (per process: tgid << 48 ^ pointer would collide less, see ssl_key) */
	__type(value, struct tls_conn);
} tls_conns SEC(".maps");

/* sendmmsg/recvmmsg: which message of the vector this call of the tracepoint is. */
struct mmsg_pos {
	__u64 base;
	__u64 ts_ns;
	__u32 idx;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct mmsg_pos);
} mmsg_pos SEC(".maps");

const struct kscope_l7_header *__anchor_l7_header __attribute__((unused));
enum kscope_l7_record_type __anchor_l7_record_type __attribute__((unused));
enum kscope_l7_protocol __anchor_l7_protocol __attribute__((unused));
enum kscope_l7_direction __anchor_l7_direction __attribute__((unused));
enum kscope_l7_flags __anchor_l7_flags __attribute__((unused));
enum kscope_l7_stat __anchor_l7_stat __attribute__((unused));
const struct kscope_l7_exchange *__anchor_l7_exchange __attribute__((unused));
const struct kscope_l7_summary *__anchor_l7_summary __attribute__((unused));
enum kscope_http_method __anchor_http_method __attribute__((unused));
enum kscope_l7_emit __anchor_l7_emit __attribute__((unused));
enum kscope_l7_exchange_flags __anchor_l7_exchange_flags __attribute__((unused));

static __always_inline __u64 ssl_key(__u64 ssl)
{
	/* the same SSL * value in two processes is two connections */
	return ssl ^ ((__u64)(bpf_get_current_pid_tgid() >> 32) << 48);
}

/* The user buffer of the current socket call (l7_user_buffer). sendmmsg/recvmmsg fire the
 * tracepoint once per message: which message of the vector this is, is tracked per thread. */
static __always_inline const void *user_buffer(struct pt_regs *regs, __u64 *avail, const void **uaddr)
{
	/* bpf_task_pt_regs() gives a BTF pointer: plain loads, no probe-read helper per register */
	__u64 nr = regs->orig_ax, si = regs->si;
	__u32 idx = 0;

	if (nr == NR_sendmmsg || nr == NR_recvmmsg) {
		__u32 tid = (__u32)bpf_get_current_pid_tgid();
		__u64 now = bpf_ktime_get_ns();
		struct mmsg_pos *pos = bpf_map_lookup_elem(&mmsg_pos, &tid);
		struct mmsg_pos fresh = { .base = si, .ts_ns = now };

		/* consecutive calls of the tracepoint within one syscall walk the vector */
		if (pos && pos->base == si && now - pos->ts_ns < 1000000 && pos->idx + 1 < MAX_MMSG)
			idx = pos->idx + 1;
		fresh.idx = idx;
		bpf_map_update_elem(&mmsg_pos, &tid, &fresh, BPF_ANY);
	}
	return l7_user_buffer(nr, si, regs->r8, idx, avail, uaddr);
}

static __always_inline void fill_task(struct kscope_l7_header *h)
{
	__u64 id = bpf_get_current_pid_tgid();

	h->tgid = id >> 32;
	h->pid = (__u32)id;
	process_comm(h->comm);
	h->ts_ns = bpf_ktime_get_ns();
}

static __always_inline void submit(struct chunk *c, __u32 n)
{
	__u64 size;

	/* clang knows n <= capture bound and drops the mask; the verifier may not: keep it */
	asm volatile("" : "+r"(n));
	size = sizeof(c->hdr) + (n & READ_MASK);
	c->hdr.captured = n;
	if (bpf_ringbuf_output(&l7_ring, c, size, BPF_RB_NO_WAKEUP))
		stat_inc(KSCOPE_L7_STAT_RB_FULL);
	else
		stat_inc(KSCOPE_L7_STAT_CAPTURED);
}

/* ---- HTTP/1 exchanges: request and response paired in the kernel ----------------------
 *
 * For plain-text TCP sockets decided HTTP/1 the calls update the socket's exchange state
 * and one fixed-size record per request/response leaves when the exchange is over (next
 * request, socket destroyed, or found idle by the sweep) instead of one chunk per call:
 * on loopback that is 2 records per request instead of 4, none per body call, and user
 * space reads fixed-size records instead of running a stream parser.
 */

#define STATUS_HEAD 12 /* "HTTP/1.1 200" */

/* The status of a response starting here, 0 if this is not a status line. */
static __always_inline __u16 response_status(const __u8 *d, __u32 n)
{
	__u8 a, b, c;

	if (n < STATUS_HEAD || !has_prefix(d, n, "HTTP/1.", 7) || (d[7] != '0' && d[7] != '1') || d[8] != ' ')
		return 0;
	a = d[9] - '0';
	b = d[10] - '0';
	c = d[11] - '0';
	if (a < 1 || a > 9 || b > 9 || c > 9)
		return 0;
	return a * 100 + b * 10 + c;
}

/* Several requests in one call (pipelining): a second end of head in the captured bytes.
 * bpf_loop over 8-byte words (a plain loop is unrolled by the verifier into too many states
 * once inlined in both call sites): a word without a '\n' costs one SWAR test; only where
 * one is does each '\n' get compared with "\r\n\r\n" (one u32 load). Bytes past n are zero. */
#define CRLFCRLF 0x0a0d0a0d /* "\r\n\r\n" read as a little-endian u32 */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

struct scan {
	const __u8 *d;
	__u32 n;
	__u32 ends;
};

static long scan_step(__u32 k, void *arg)
{
	struct scan *s = arg;
	const __u8 *d = s->d;
	__u32 base = k * 8;
	__u64 t;

	if (base >= KSCOPE_L7_HEAD || base >= s->n)
		return 1;
	t = *(const __u64 *)(d + base) ^ (ONES * '\n'); /* zero bytes where d has '\n' */
	if (!((t - ONES) & ~t & HIGHS))
		return 0;
#pragma unroll
	for (int j = 0; j < 8; j++) {
		__u32 i = base + j; /* where the pattern's last byte would be */

		if (i >= s->n)
			return 1;
		if (i >= 3 && *(const __u32 *)(d + i - 3) == CRLFCRLF && ++s->ends > 1)
			return 1;
	}
	return 0;
}

static __always_inline bool several_requests(const __u8 *d, __u32 n)
{
	struct scan s = { .d = d, .n = n };

	bpf_loop(KSCOPE_L7_HEAD / 8, scan_step, &s, 0);
	return s.ends > 1;
}

_Static_assert(sizeof(struct kscope_l7_summary) == sizeof(struct kscope_l7_exchange) &&
		       __builtin_offsetof(struct kscope_l7_summary, comm) ==
			       __builtin_offsetof(struct kscope_l7_exchange, comm),
	       "a summary is an exchange record's size with its prefix (xring_reserve fills both)");

/* A slot on the exchange ring for an exchange or a summary record, socket fields filled (helpers:
 * before any lock); 0 when the ring is full (the caller counts). */
static __always_inline struct kscope_l7_exchange *xring_reserve(struct sock *sk, __u8 type)
{
	struct kscope_l7_exchange *r = bpf_ringbuf_reserve(&l7_xring, sizeof(*r), 0);

	if (!r)
		return 0;
	r->type = type;
	read_tuple(r->saddr, r->daddr, &r->sport, &r->dport, &r->family, sk);
	r->netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	r->sock_cookie = bpf_get_socket_cookie(sk);
	return r;
}

static __always_inline struct kscope_l7_exchange *xrec_reserve(struct sock *sk)
{
	struct kscope_l7_exchange *r = xring_reserve(sk, KSCOPE_REC_L7_EXCHANGE);

	if (!r) {
		stat_inc(KSCOPE_L7_STAT_RB_FULL);
		stat_inc(KSCOPE_L7_STAT_EXCHANGE_RB_FULL);
	}
	return r;
}

/* Copy the exchange into its record: called with x->lock held (no helpers). */
static __always_inline void xrec_fill(struct kscope_l7_exchange *r, const struct l7_xchg *x, __u8 reason)
{
	bool answered = x->status != 0;

	r->role = x->role;
	r->method = x->method;
	r->reason = reason;
	r->start_ns = x->start_ns;
	r->latency_ns = answered ? x->resp_ns - x->start_ns : 0;
	r->request_bytes = x->req_bytes;
	r->response_bytes = answered ? x->resp_bytes : 0;
	r->tgid = x->tgid;
	r->pid = x->pid;
	r->status = x->status;
	r->head_len = x->head_len;
	r->flags = x->flags;
	__builtin_memset(r->_pad, 0, sizeof(r->_pad));
	__builtin_memcpy(r->comm, x->comm, sizeof(r->comm));
	__builtin_memcpy(r->head, x->head[x->cur & 1], sizeof(r->head));
}

static __always_inline void xrec_send(struct kscope_l7_exchange *r, bool filled)
{
	if (!r)
		return;
	if (filled) {
		bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
		stat_inc(KSCOPE_L7_STAT_EXCHANGES);
	} else {
		bpf_ringbuf_discard(r, BPF_RB_NO_WAKEUP);
	}
}

/* ---- Summaries ----------------------------------------------------------------------------
 *
 * At a few µs of Python per record, one record per request cannot keep up with a saturated
 * server, and on a small node that time is taken from the application. So past the
 * sampler's rate (record_cost_ns per CPU) answered exchanges with a status below 500 are
 * summed in the socket's storage per key (request line up to the path's end, i.e. method and
 * path without query; and status): count, byte and latency sums, min/max and a latency
 * histogram (bounds in abi/l7.h). A slot leaves as one summary record on the exchange ring
 * summary_ns after its first exchange (the sweep), or at close. Metrics stay exact; only the
 * per-request detail (start time, trace headers) is sampled. 5xx, unanswered, upgraded and
 * pipelined exchanges and paths longer than KSCOPE_L7_SUMMARY_HEAD are always records.
 */

struct sampler {
	__u64 credit_ns;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sampler);
} l7_sampler SEC(".maps");

/* [0] != 0: the next sweep is the last (user space stopped capture and is about to exit): it
 * sends every answered exchange, idle or not, and every summary, due or not */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} l7_sweep_ctl SEC(".maps");

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&l7_stats, &idx);

	if (v)
		*v += n;
}

/* Whether the exchange starting now gets a record of its own (a token from this CPU's bucket). */
static __always_inline bool sample(__u64 now)
{
	struct sampler *s;
	__u32 zero = 0;
	__u64 credit;

	if (!record_cost_ns)
		return true;
	s = bpf_map_lookup_elem(&l7_sampler, &zero);
	if (!s)
		return true;
	credit = s->credit_ns + (now - s->last_ns);
	if (credit > 1000000000ULL)
		credit = 1000000000ULL; /* the burst: one second's worth */
	s->last_ns = now;
	if (credit < record_cost_ns) {
		s->credit_ns = credit;
		return false;
	}
	s->credit_ns = credit - record_cost_ns;
	return true;
}

/* The high bit of each byte of t that is zero (exact: no false positives from borrows). */
static __always_inline __u64 zero_bytes(__u64 t)
{
	__u64 y = (t & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL;

	return ~(y | t | 0x7f7f7f7f7f7f7f7fULL);
}

#define HASH_MUL 0x9e3779b97f4a7c15ULL
#define VERSION_TAIL 10 /* " HTTP/1.1\r" after the path, minus the path end's own byte */

struct phash {
	const __u8 *d;
	__u32 n;
	__u32 start; /* the path's first byte (after the method's space) */
	__u32 end;   /* where the path ends (' ', '?' or '#'); 0: not found */
	__u32 _pad;
	__u64 h;
};

/* One 8-byte word of the request line: hashed whole, or up to the path's end if it is here. */
static long phash_step(__u32 k, void *arg)
{
	struct phash *p = arg;
	__u32 base = k * 8, j;
	__u64 w, m, low;

	if (base >= KSCOPE_L7_SUMMARY_HEAD || base >= p->n)
		return 1;
	w = *(const __u64 *)(p->d + base);
	m = zero_bytes(w ^ (ONES * ' ')) | zero_bytes(w ^ (ONES * '?')) | zero_bytes(w ^ (ONES * '#'));
	if (base + 8 <= p->start)
		m = 0;
	else if (base < p->start)
		m &= ~0ULL << ((p->start - base) * 8); /* the method's space is not the end */
	if (!m) {
		p->h = (p->h ^ w) * HASH_MUL;
		p->h ^= p->h >> 29;
		return 0;
	}
	low = m & -m; /* 0x80 << 8j: the first end is byte j of the word */
	j = 0;
	if (low >> 32) {
		j = 4;
		low >>= 32;
	}
	if (low >> 16) {
		j += 2;
		low >>= 16;
	}
	if (low >> 8)
		j += 1;
	if (base + j >= p->n)
		return 1; /* zero bytes past the capture are not an end (and never match) */
	/* the summary keeps the head's first KSCOPE_L7_SUMMARY_HEAD bytes: the whole request line
	 * (" HTTP/1.1\r" after the path) must be in them, and captured, for user space to read it */
	if (base + j + VERSION_TAIL > KSCOPE_L7_SUMMARY_HEAD || base + j + VERSION_TAIL > p->n)
		return 1;
	if (j)
		p->h = (p->h ^ (w & ((1ULL << (j * 8)) - 1))) * HASH_MUL;
	p->end = base + j;
	return 1;
}

/* The key of a request for summing: a hash of its line up to the path's end (method and
 * path, no query); 0 if the request line does not fit KSCOPE_L7_SUMMARY_HEAD captured bytes
 * (or CONNECT): such a request is never summed. Bytes past n are zero. */
static __always_inline __u64 path_hash(const __u8 *d, __u32 n, __u8 method)
{
	struct phash p = { .d = d, .n = n };

	switch (method) {
	case KSCOPE_HTTP_GET:
	case KSCOPE_HTTP_PUT:
		p.start = 4;
		break;
	case KSCOPE_HTTP_HEAD:
	case KSCOPE_HTTP_POST:
		p.start = 5;
		break;
	case KSCOPE_HTTP_PATCH:
	case KSCOPE_HTTP_TRACE:
		p.start = 6;
		break;
	case KSCOPE_HTTP_DELETE:
		p.start = 7;
		break;
	case KSCOPE_HTTP_OPTIONS:
		p.start = 8;
		break;
	default:
		return 0;
	}
	bpf_loop(KSCOPE_L7_SUMMARY_HEAD / 8, phash_step, &p, 0);
	if (!p.end)
		return 0;
	p.h = (p.h ^ p.end) * HASH_MUL;
	return (p.h ^ (p.h >> 32)) | 1;
}

static __always_inline __u32 latency_bucket(__u64 ns)
{
	const __u64 bounds[KSCOPE_L7_LATENCY_BOUNDS] = KSCOPE_L7_LATENCY_BOUNDS_NS;

#pragma unroll
	for (int i = 0; i < KSCOPE_L7_LATENCY_BOUNDS; i++)
		if (ns <= bounds[i])
			return i;
	return KSCOPE_L7_LATENCY_BOUNDS;
}

/* Unlocked peeks, by the socket's own calls or by close/sweep: whether the answered exchange
 * x holds is to be summed, and whether a slot can take it. Kept under the lock: only the
 * socket's own calls fill slots; the sweep and close only empty them or sum this very
 * exchange (which then is no longer answered and is left alone). */
static __always_inline bool wants_summary(const struct l7_xchg *x)
{
	return !x->sampled && x->path_hash && x->status >= 200 && x->status < 500;
}

static __always_inline bool slot_free(const struct l7_xchg *x)
{
#pragma unroll
	for (int i = 0; i < L7_SLOTS; i++)
		if (!x->slots[i].count ||
		    (x->slots[i].path_hash == x->path_hash && x->slots[i].status == x->status))
			return true;
	return false;
}

static __always_inline bool slots_empty(const struct l7_xchg *x)
{
	return !x->slots[0].count && !x->slots[1].count && !x->slots[2].count && !x->slots[3].count;
}

/* Sum the answered exchange into its key's slot, or a free one: x->lock held (no helpers).
 * false: every slot holds another key. */
static __always_inline bool slot_fold(struct l7_xchg *x)
{
	struct l7_slot *s = 0;
	__u64 lat = x->resp_ns - x->start_ns;
	__u32 b = latency_bucket(lat);

#pragma unroll
	for (int i = 0; i < L7_SLOTS; i++)
		if (!s && x->slots[i].count && x->slots[i].path_hash == x->path_hash &&
		    x->slots[i].status == x->status)
			s = &x->slots[i];
	if (!s) {
#pragma unroll
		for (int i = 0; i < L7_SLOTS; i++)
			if (!s && !x->slots[i].count)
				s = &x->slots[i];
		if (!s)
			return false;
		s->path_hash = x->path_hash;
		s->status = x->status;
		s->method = x->method;
		s->head_len = x->head_len < KSCOPE_L7_SUMMARY_HEAD ? x->head_len : KSCOPE_L7_SUMMARY_HEAD;
		s->first_ns = x->start_ns;
		s->lat_sum = 0;
		s->lat_min = lat;
		s->lat_max = lat;
		s->req_bytes = 0;
		s->resp_bytes = 0;
		s->flags = 0;
		__builtin_memset(s->buckets, 0, sizeof(s->buckets));
		__builtin_memcpy(s->head, x->head[x->cur & 1], sizeof(s->head));
	}
	s->count++;
	s->last_ns = x->start_ns;
	s->lat_sum += lat;
	if (lat < s->lat_min)
		s->lat_min = lat;
	if (lat > s->lat_max)
		s->lat_max = lat;
	s->req_bytes += x->req_bytes;
	s->resp_bytes += x->resp_bytes;
	s->flags |= x->flags;
	if (b < KSCOPE_L7_LATENCY_BUCKETS)
		s->buckets[b]++;
	return true;
}

static __always_inline struct kscope_l7_summary *summary_reserve(struct sock *sk)
{
	struct kscope_l7_summary *r = (struct kscope_l7_summary *)xring_reserve(sk, KSCOPE_REC_L7_SUMMARY);

	/* not RB_FULL ("a record dropped"): a due summary stays in its slot for the next sweep; what
	 * is really lost (at close, or the request that needed an evicted slot) counts in SUMMARY_LOST */
	if (!r)
		stat_inc(KSCOPE_L7_STAT_SUMMARY_RB_FULL);
	return r;
}

/* Copy a slot into its record: x->lock held. */
static __always_inline void summary_fill(struct kscope_l7_summary *r, const struct l7_xchg *x,
					 const struct l7_slot *s, __u8 reason)
{
	r->role = x->role;
	r->method = s->method;
	r->reason = reason;
	r->start_ns = s->first_ns;
	r->latency_ns = s->lat_sum;
	r->request_bytes = s->req_bytes;
	r->response_bytes = s->resp_bytes;
	r->tgid = x->tgid;
	r->pid = x->pid;
	r->status = s->status;
	r->head_len = s->head_len;
	r->flags = s->flags;
	__builtin_memset(r->_pad, 0, sizeof(r->_pad));
	__builtin_memcpy(r->comm, x->comm, sizeof(r->comm));
	r->count = s->count;
	r->_pad2 = 0;
	r->end_ns = s->last_ns;
	r->latency_min_ns = s->lat_min;
	r->latency_max_ns = s->lat_max;
	__builtin_memcpy(r->buckets, s->buckets, sizeof(r->buckets));
	__builtin_memcpy(r->head, s->head, sizeof(r->head));
	__builtin_memset(r->_pad3, 0, sizeof(r->_pad3));
}

/* Every slot holds another key: the least used one's summary goes now (into r, reserved before
 * the lock) and frees it. Least used, not oldest: with more keys than slots in turn on one
 * connection, evicting the oldest would send a summary per request; this way the busiest keys
 * keep their slots and only the rest take turns in one. x->lock held. */
static __always_inline bool slot_evict(struct kscope_l7_summary *r, struct l7_xchg *x)
{
	struct l7_slot *old = &x->slots[0];

#pragma unroll
	for (int i = 1; i < L7_SLOTS; i++)
		if (x->slots[i].count < old->count ||
		    (x->slots[i].count == old->count && x->slots[i].first_ns < old->first_ns))
			old = &x->slots[i];
	if (!old->count)
		return false; /* a slot became free after all (the sweep sent it): nothing to evict */
	summary_fill(r, x, old, KSCOPE_EMIT_EVICT);
	old->count = 0;
	return true;
}

/* Whether a slot holds requests whose summary is due (its first request summary_ns ago). */
static __always_inline bool slot_is_due(const struct l7_slot *s, __u64 now)
{
	return s->count && now - s->first_ns >= summary_ns;
}

/* Send slot i's summary if due (all: whatever its age). A full ring leaves it for the next
 * sweep; at close (all) its requests are lost, counted. */
static __always_inline void slot_flush(struct sock *sk, struct l7_xchg *x, struct l7_slot *s, __u8 reason,
				       __u64 now, bool all)
{
	struct kscope_l7_summary *r;
	bool filled = false;
	__u32 lost = 0, sent;

	if (!s->count || (!all && !slot_is_due(s, now)))
		return;
	r = summary_reserve(sk);
	bpf_spin_lock(&x->lock);
	if (s->count && (all || slot_is_due(s, now))) {
		if (r) {
			summary_fill(r, x, s, reason);
			filled = true;
			s->count = 0;
		} else if (all) {
			lost = s->count;
			s->count = 0;
		}
	}
	bpf_spin_unlock(&x->lock);
	if (r) {
		if (filled) {
			/* counted as they leave, not one by one as they are summed (a counter per request
			 * was a measurable part of the exchange path) */
			sent = r->count;
			bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
			stat_inc(KSCOPE_L7_STAT_SUMMARIES);
			stat_add(KSCOPE_L7_STAT_SUMMARIZED, sent);
		} else {
			bpf_ringbuf_discard(r, BPF_RB_NO_WAKEUP);
		}
	}
	if (lost)
		stat_add(KSCOPE_L7_STAT_SUMMARY_LOST, lost);
}

static __always_inline void slots_flush(struct sock *sk, struct l7_xchg *x, __u8 reason, __u64 now, bool all)
{
	slot_flush(sk, x, &x->slots[0], reason, now, all);
	slot_flush(sk, x, &x->slots[1], reason, now, all);
	slot_flush(sk, x, &x->slots[2], reason, now, all);
	slot_flush(sk, x, &x->slots[3], reason, now, all);
}

/* An unlocked peek: whether a slot's summary is due (slot_flush decides again under the lock). */
static __always_inline bool slot_due(const struct l7_xchg *x, __u64 now)
{
	bool due = false;

#pragma unroll
	for (int i = 0; i < L7_SLOTS; i++)
		due |= slot_is_due(&x->slots[i], now);
	return due;
}

/* After the lock: send or give back the summary slot_evict was given. */
static __always_inline void evict_send(struct kscope_l7_summary *ev, bool evicted)
{
	if (!ev)
		return;
	if (evicted) {
		__u32 n = ev->count;

		bpf_ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
		stat_inc(KSCOPE_L7_STAT_SUMMARIES);
		stat_add(KSCOPE_L7_STAT_SUMMARIZED, n);
		stat_inc(KSCOPE_L7_STAT_SLOTS_FULL);
	} else {
		bpf_ringbuf_discard(ev, BPF_RB_NO_WAKEUP);
	}
}

/* A synthetic chunk: the head of a request the exchange path holds, for the chunk parser
 * that takes over the socket (see xchg_fallback). Fixed size: captured says how much is valid. */
struct xchunk {
	struct kscope_l7_header hdr;
	__u8 data[KSCOPE_L7_HEAD];
};

/*
 * The exchange path cannot be right for this socket (pipelining): chunks from now on, for
 * good. What it holds is handed over so nothing is lost: an answered exchange as its
 * record, a request still waiting as a chunk of its head at its stream offset (its length
 * says how many bytes followed, so the parser skips the body and pairs the response that
 * comes next as a chunk). The triggering call then goes through the chunk path too.
 */
static __always_inline void xchg_fallback(struct sock *sk, struct l7_sock *st, struct l7_xchg *x, __u8 req_dir)
{
	struct kscope_l7_exchange *r = 0;
	struct xchunk *q = 0;
	bool filled = false;
	__u8 state = x->state; /* unlocked peek: rechecked under the lock */

	st->chunks = 1;
	stat_inc(KSCOPE_L7_STAT_FALLBACK);
	if (state == XS_ANSWERED) {
		r = xrec_reserve(sk);
	} else if (state == XS_REQUEST) {
		q = bpf_ringbuf_reserve(&l7_ring, sizeof(*q), 0);
		if (!q) {
			stat_inc(KSCOPE_L7_STAT_RB_FULL);
			return;
		}
		__builtin_memset(&q->hdr, 0, sizeof(q->hdr));
		q->hdr.type = KSCOPE_REC_L7;
		q->hdr.direction = req_dir;
		q->hdr.protocol = KSCOPE_PROTO_HTTP1;
		q->hdr.role = st->role;
		q->hdr.ip_proto = IPPROTO_TCP;
		q->hdr.netns_ino = sk->__sk_common.skc_net.net->ns.inum;
		q->hdr.sock_cookie = bpf_get_socket_cookie(sk);
		read_tuple(q->hdr.saddr, q->hdr.daddr, &q->hdr.sport, &q->hdr.dport, &q->hdr.family, sk);
	}
	bpf_spin_lock(&x->lock);
	if (r && x->state == XS_ANSWERED) {
		xrec_fill(r, x, KSCOPE_EMIT_FALLBACK);
		filled = true;
	} else if (q && x->state == XS_REQUEST) {
		q->hdr.ts_ns = x->start_ns;
		q->hdr.seq = x->req_seq;
		q->hdr.len = x->req_bytes;
		q->hdr.captured = x->head_len;
		q->hdr.flags = x->req_bytes > x->head_len ? KSCOPE_L7_TRUNCATED : 0;
		q->hdr.tgid = x->tgid;
		q->hdr.pid = x->pid;
		__builtin_memcpy(q->hdr.comm, x->comm, sizeof(q->hdr.comm));
		__builtin_memcpy(q->data, x->head[x->cur & 1], sizeof(q->data));
		filled = true;
	}
	x->state = XS_NONE;
	bpf_spin_unlock(&x->lock);
	if (q) {
		if (filled) {
			bpf_ringbuf_submit(q, BPF_RB_NO_WAKEUP);
			stat_inc(KSCOPE_L7_STAT_CAPTURED);
		} else {
			bpf_ringbuf_discard(q, BPF_RB_NO_WAKEUP);
		}
	}
	xrec_send(r, filled);
}

/* A request-direction call: a new request (method first) or more of the current one. */
static __always_inline bool xchg_request(struct sock *sk, struct l7_sock *st, struct l7_xchg *x, const __u8 *d,
					 __u32 n, int ret, __u64 seq, __u8 dir, bool has_buf, __u64 now)
{
	struct kscope_l7_exchange *r = 0;
	struct kscope_l7_summary *ev = 0;
	__u8 method = has_buf ? request_method(d, n) : 0, comm[16];
	__u64 id, hash = 0;
	bool filled = false, fresh_comm, sampled, fold = false, fold_failed = false, evicted = false, mark;

	if (!method) {
		/* a body (or bytes of a request older than us): counted into the current request */
		bpf_spin_lock(&x->lock);
		if (x->state == XS_REQUEST) {
			x->req_bytes += ret;
			x->last_ns = now;
			if (!has_buf)
				x->flags |= KSCOPE_X_NO_BUFFER;
		}
		bpf_spin_unlock(&x->lock);
		return true;
	}
	/* the previous request still waits for its response, or several requests in one call */
	if (x->state == XS_REQUEST || several_requests(d, n)) {
		xchg_fallback(sk, st, x, dir);
		return false;
	}
	if (x->state == XS_ANSWERED) {
		/* the previous exchange is over: summed, or a record of its own */
		fold = wants_summary(x);
		if (!fold)
			r = xrec_reserve(sk);
		else if (!slot_free(x))
			ev = summary_reserve(sk);
	}
	sampled = sample(now);
	if (!sampled)
		hash = path_hash(d, n, method);
	id = bpf_get_current_pid_tgid();
	/* the process name is read once per process on this socket (a string helper per request
	 * measurably added to every request on a keep-alive connection) */
	fresh_comm = (__u32)(id >> 32) != x->tgid || !x->comm[0];
	if (fresh_comm)
		process_comm(comm);
	bpf_spin_lock(&x->lock);
	if (x->state == XS_ANSWERED) {
		if (r) {
			xrec_fill(r, x, KSCOPE_EMIT_NEXT);
			filled = true;
		} else if (fold) {
			if (ev)
				evicted = slot_evict(ev, x);
			fold_failed = !slot_fold(x);
		}
	}
	x->state = XS_REQUEST;
	x->sampled = sampled;
	x->path_hash = hash;
	x->method = method;
	x->flags = n < (__u32)ret ? KSCOPE_X_HEAD_TRUNCATED : 0;
	x->req_seq = seq;
	x->start_ns = now;
	x->last_ns = now;
	x->resp_ns = 0;
	x->req_bytes = ret;
	x->resp_bytes = 0;
	x->status = 0;
	x->tgid = id >> 32;
	x->pid = (__u32)id;
	x->head_len = n;
	if (fresh_comm)
		__builtin_memcpy(x->comm, comm, sizeof(x->comm));
	x->cur ^= 1; /* d is the other head (xchg_call): this request's from now on */
	/* the sweep has something to do on this socket until it finds nothing (it clears the flag
	 * under the same lock): its namespace is marked once, not per request */
	mark = !x->marked;
	x->marked = 1;
	bpf_spin_unlock(&x->lock);
	if (mark && !netns_mark(&l7_netns_pending, &l7_netns_walk_all, sk))
		stat_inc(KSCOPE_L7_STAT_NETNS_PENDING_FULL);
	xrec_send(r, filled);
	evict_send(ev, evicted);
	if (fold_failed)
		stat_inc(KSCOPE_L7_STAT_SUMMARY_LOST);
	return true;
}

/* A response-direction call: the status line of the (final) response, or more of it. */
static __always_inline void xchg_response(struct sock *sk, struct l7_sock *st, struct l7_xchg *x, const __u8 *d,
					  __u32 n, int ret, bool has_buf, __u64 now)
{
	struct kscope_l7_exchange *r = 0;
	__u16 status = has_buf ? response_status(d, n) : 0;
	bool filled = false, last = false, orphan = false, late = false;

	/* 101, or a CONNECT tunnel: the exchange ends now and so does HTTP/1 on this socket */
	if (status == 101 || (status >= 200 && status < 300 && x->method == KSCOPE_HTTP_CONNECT))
		r = xrec_reserve(sk);
	bpf_spin_lock(&x->lock);
	if (status) {
		if (x->state != XS_REQUEST) {
			orphan = true; /* no request pending: older than us, or pipelining we did not see */
		} else if (status >= 200 || status == 101) {
			/* 1xx other than 101 (100 Continue, 103) is not the final response: keep waiting */
			x->status = status;
			x->resp_ns = now;
			x->resp_bytes = ret;
			x->last_ns = now;
			x->state = XS_ANSWERED;
			if (status == 101 || (status < 300 && x->method == KSCOPE_HTTP_CONNECT)) {
				last = true;
				if (r) {
					xrec_fill(r, x, KSCOPE_EMIT_UPGRADE);
					filled = true;
				}
				x->state = XS_NONE;
			}
		}
	} else if (x->state == XS_ANSWERED) {
		x->resp_bytes += ret;
		x->last_ns = now;
		if (!has_buf)
			x->flags |= KSCOPE_X_NO_BUFFER;
	} else if (x->state == XS_EMITTED) {
		late = true;
	}
	bpf_spin_unlock(&x->lock);
	xrec_send(r, filled);
	/* a busy socket sends its due summaries itself: the sweep (a walk of the whole namespace) is
	 * only for the sockets that went quiet, and runs far less often. Here, not with the next
	 * request: the response path is the one the verifier walks cheaply (~1 s more at load there) */
	if (status && slot_due(x, now))
		slots_flush(sk, x, KSCOPE_EMIT_NEXT, now, false);
	if (last)
		st->protocol = KSCOPE_PROTO_IGNORED; /* upgraded: not HTTP/1 any more, stop looking */
	if (orphan)
		stat_inc(KSCOPE_L7_STAT_ORPHAN_RESPONSES);
	if (late)
		stat_inc(KSCOPE_L7_STAT_LATE_CALLS);
}

/* One call of a socket on the exchange path. false: it goes through the chunk path instead. */
static __always_inline bool xchg_call(struct sock *sk, struct l7_sock *st, struct chunk *c, const void *buf,
				      __u64 avail, int ret, __u8 dir, __u64 seq)
{
	struct l7_xchg *x = bpf_sk_storage_get(&l7_xchg, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	bool req_dir = (st->role == KSCOPE_ROLE_CLIENT) == (dir == KSCOPE_DIR_EGRESS);
	__u64 n = ret, now = bpf_ktime_get_ns();
	__u8 *d, nxt;

	if (!x) {
		stat_inc(KSCOPE_L7_STAT_STORAGE_FAILED);
		st->chunks = 1;
		return false;
	}
	x->role = st->role; /* set by the socket's own calls only, before the sweep can see a state */
	if (n > avail)
		n = avail;
	/* Each direction reads on its own: one read for both (destination chosen before it) made the
	 * verifier walk both bounds through the rest of the program and l7_send past its 1M
	 * instructions (E2BIG) at some capture sizes. */
	if (!req_dir) {
		if (n > STATUS_HEAD)
			n = STATUS_HEAD; /* the status line's start is all a response tells us */
		if (buf && n && bpf_probe_read_user(c->data, n & READ_MASK, buf)) {
			stat_inc(KSCOPE_L7_STAT_READ_FAILED);
			buf = 0;
		}
		if (!buf) {
			n = 0;
			stat_inc(KSCOPE_L7_STAT_NO_BUFFER);
		}
		xchg_response(sk, st, x, c->data, n, ret, buf != 0, now);
		return true;
	}
	/* the head goes straight into the head the current exchange does not use (see struct
	 * l7_xchg), zero after it: records carry the whole fixed area. Only a longer head read there
	 * before needs clearing (rare: a connection's requests tend to be alike). */
	nxt = (x->cur ^ 1) & 1;
	d = x->head[nxt];
	if (n > KSCOPE_L7_HEAD)
		n = KSCOPE_L7_HEAD;
	if (n > capture_bytes)
		n = capture_bytes;
	if (x->head_fill[nxt] > n)
		__builtin_memset(d, 0, KSCOPE_L7_HEAD);
	if (buf && n && bpf_probe_read_user(d, n, buf)) {
		stat_inc(KSCOPE_L7_STAT_READ_FAILED); /* the helper zeroed the n bytes */
		buf = 0;
	}
	x->head_fill[nxt] = n;
	if (!buf) {
		n = 0;
		stat_inc(KSCOPE_L7_STAT_NO_BUFFER);
	}
	return xchg_request(sk, st, x, d, n, ret, seq, dir, buf != 0, now);
}

/* Inside SSL_read/SSL_write: remember which socket this SSL object uses. */
static __always_inline void bind_tls(struct sock *sk, struct l7_sock *st, struct tls_call *call, __u8 ip_proto)
{
	struct tls_conn fresh = {}, *conn;
	struct kscope_l7_header h = {};
	__u64 key = ssl_key(call->ssl);

	st->tls = 1;
	conn = bpf_map_lookup_elem(&tls_conns, &key);
	if (conn && conn->sock_cookie == bpf_get_socket_cookie(sk))
		return;
	read_tuple(h.saddr, h.daddr, &h.sport, &h.dport, &h.family, sk);
	fresh.sock_cookie = bpf_get_socket_cookie(sk);
	fresh.netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	__builtin_memcpy(fresh.saddr, h.saddr, 16);
	__builtin_memcpy(fresh.daddr, h.daddr, 16);
	fresh.sport = h.sport;
	fresh.dport = h.dport;
	fresh.family = h.family;
	fresh.role = sk->sk_max_ack_backlog ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
	bpf_map_update_elem(&tls_conns, &key, &fresh, BPF_ANY);
}

/* A chunk's socket fields and the call's head (the bytes captured). */
static __always_inline __u32 chunk_head(struct chunk *c, struct sock *sk, __u8 ip_proto, const void *buf,
					const void *uaddr, int ret, __u64 avail)
{
	__builtin_memset(&c->hdr, 0, sizeof(c->hdr));
	read_tuple(c->hdr.saddr, c->hdr.daddr, &c->hdr.sport, &c->hdr.dport, &c->hdr.family, sk);
	if (ip_proto == IPPROTO_UDP && !c->hdr.dport)
		read_peer(&c->hdr, uaddr);
	return l7_read_head(c, buf, ret, avail, capture_bytes);
}

static __always_inline void on_io(struct sock *sk, int ret, __u8 dir)
{
	struct l7_sock *st;
	struct chunk *c;
	struct tls_call *call;
	const void *buf, *uaddr;
	__u64 avail, seq;
	__u32 zero = 0, n = 0, tid;
	__u16 family = sk->__sk_common.skc_family;
	__u8 ip_proto = sk->sk_protocol;
	bool fresh;

	if (ret <= 0 || (family != AF_INET && family != AF_INET6))
		return;
	if (ip_proto != IPPROTO_TCP && ip_proto != IPPROTO_UDP)
		return;
	if (filter_netns_ino && sk->__sk_common.skc_net.net->ns.inum != filter_netns_ino)
		return;
	st = bpf_sk_storage_get(&l7_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_inc(KSCOPE_L7_STAT_STORAGE_FAILED);
		return;
	}
	if (st->protocol == KSCOPE_PROTO_IGNORED)
		return; /* the common case for traffic we do not parse: one lookup */
	if (st->tls) {
		/* ciphertext: note which socket the SSL object in use writes to, capture nothing */
		tid = (__u32)bpf_get_current_pid_tgid();
		call = bpf_map_lookup_elem(&tls_calls, &tid);
		if (call)
			bind_tls(sk, st, call, ip_proto);
		return;
	}
	seq = st->seq[dir - 1];
	st->seq[dir - 1] = seq + ret;
	fresh = st->protocol == KSCOPE_PROTO_UNKNOWN;

	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c)
		return;
	buf = user_buffer((struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf()), &avail, &uaddr);
	if (fresh) {
		__u8 role = 0, proto;

		n = chunk_head(c, sk, ip_proto, buf, uaddr, ret, avail);
		proto = infer(c->data, n, dir, ip_proto, c->hdr.sport, c->hdr.dport, &role);

		if (proto == KSCOPE_PROTO_UNKNOWN && ip_proto == IPPROTO_TCP && is_tls_record(c->data, n)) {
			/* TLS: from now on only the uprobes' plaintext counts */
			st->tls = 1;
			tid = (__u32)bpf_get_current_pid_tgid();
			call = bpf_map_lookup_elem(&tls_calls, &tid);
			if (call)
				bind_tls(sk, st, call, ip_proto);
			return;
		}
		if (proto == KSCOPE_PROTO_UNKNOWN) {
			l7_infer_failed(&st->protocol, &st->attempts);
			return;
		}
		st->protocol = proto;
		st->role = role;
	}
	/* plain-text HTTP/1 over TCP: the exchange path, from a socket's first call on (it reads the
	 * head it needs itself). One call site: xchg_call is most of the program, and inlined twice it
	 * doubled what the verifier walks (~0.3 M of its 1 M instructions once). */
	if (exchanges && st->protocol == KSCOPE_PROTO_HTTP1 && ip_proto == IPPROTO_TCP && !st->chunks &&
	    xchg_call(sk, st, c, buf, avail, ret, dir, seq))
		return;
	if (!fresh)
		n = chunk_head(c, sk, ip_proto, buf, uaddr, ret, avail);
	l7_chunk_call(c, buf != 0, n, ret, seq, dir, st->protocol, st->role, ip_proto);
	c->hdr.netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	c->hdr.sock_cookie = bpf_get_socket_cookie(sk);
	fill_task(&c->hdr);
	submit(c, n);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(l7_send, struct sock *sk, int ret, int flags)
{
	on_io(sk, ret, KSCOPE_DIR_EGRESS);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(l7_recv, struct sock *sk, int ret, int flags)
{
	if (!(flags & MSG_PEEK))
		on_io(sk, ret, KSCOPE_DIR_INGRESS);
	return 0;
}

/* ---- OpenSSL uprobes (attached per libssl file by user space) -------------------------- */

static __always_inline void tls_enter(__u64 ssl, __u64 buf, __u64 ex_len_ptr, __u8 dir)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct tls_call call = { .ssl = ssl, .buf = buf, .ex_len_ptr = ex_len_ptr, .direction = dir };

	bpf_map_update_elem(&tls_calls, &tid, &call, BPF_ANY);
}

static __always_inline void tls_exit(int ret) /* SSL_* return an int */
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid(), zero = 0, n;
	struct tls_call *call = bpf_map_lookup_elem(&tls_calls, &tid);
	struct tls_conn *conn;
	struct chunk *c;
	__u64 key, len = 0, seq;
	__u8 dir;

	if (!call) {
		stat_inc(KSCOPE_L7_STAT_TLS_CALL_LOST);
		return;
	}
	if (call->ex_len_ptr) {
		if (ret == 1)
			bpf_probe_read_user(&len, sizeof(len), (void *)call->ex_len_ptr);
	} else if (ret > 0) {
		len = ret;
	}
	key = ssl_key(call->ssl);
	dir = call->direction;
	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	conn = bpf_map_lookup_elem(&tls_conns, &key);
	if (!len || !c || !conn || dir < 1 || dir > 2) {
		if (len && !conn)
			stat_inc(KSCOPE_L7_STAT_TLS_NO_SOCKET);
		bpf_map_delete_elem(&tls_calls, &tid);
		return;
	}
	if (conn->protocol == KSCOPE_PROTO_IGNORED) {
		bpf_map_delete_elem(&tls_calls, &tid);
		return;
	}
	n = l7_read_head(c, (const void *)call->buf, len, ~0ULL, capture_bytes);
	bpf_map_delete_elem(&tls_calls, &tid);
	if (dir == KSCOPE_DIR_EGRESS) {
		seq = conn->seq[0];
		conn->seq[0] = seq + len;
	} else {
		seq = conn->seq[1];
		conn->seq[1] = seq + len;
	}
	if (conn->protocol == KSCOPE_PROTO_UNKNOWN) {
		__u8 role = 0, proto = infer(c->data, n, dir, IPPROTO_TCP, conn->sport, conn->dport, &role);

		if (proto == KSCOPE_PROTO_UNKNOWN) {
			l7_infer_failed(&conn->protocol, &conn->attempts); /* counted like a plain socket's */
			return;
		}
		conn->protocol = proto;
		conn->role = role;
	}
	__builtin_memset(&c->hdr, 0, sizeof(c->hdr));
	l7_chunk_call(c, true, n, len, seq, dir, conn->protocol, conn->role, IPPROTO_TCP);
	c->hdr.flags |= KSCOPE_L7_TLS;
	c->hdr.netns_ino = conn->netns_ino;
	c->hdr.sock_cookie = conn->sock_cookie;
	__builtin_memcpy(c->hdr.saddr, conn->saddr, 16);
	__builtin_memcpy(c->hdr.daddr, conn->daddr, 16);
	c->hdr.sport = conn->sport;
	c->hdr.dport = conn->dport;
	c->hdr.family = conn->family;
	fill_task(&c->hdr);
	submit(c, n);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, const void *buf, int num)
{
	tls_enter((__u64)ssl, (__u64)buf, 0, KSCOPE_DIR_EGRESS);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf, int num)
{
	tls_enter((__u64)ssl, (__u64)buf, 0, KSCOPE_DIR_INGRESS);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	tls_enter((__u64)ssl, (__u64)buf, (__u64)written, KSCOPE_DIR_EGRESS);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	tls_enter((__u64)ssl, (__u64)buf, (__u64)readbytes, KSCOPE_DIR_INGRESS);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_exit, long ret)
{
	tls_exit(ret);
	return 0;
}

/*
 * The same probes as uprobe_multi links (Linux 6.6+), loaded only where the kernel has them:
 * one entry link over the four functions, told apart by the link's cookie, and one return
 * link. A perf-event uprobe link costs an RCU grace period (~0.1 s) to destroy, so eight of
 * them per libssl file made the agent's exit take ~0.9 s per file; two multi links take
 * ~0.07 s. ssl_exit_multi is a copy of ssl_exit because a program loaded for uprobe_multi
 * links cannot be attached through a perf event: the perf-event path, the fallback when a
 * multi attach fails, keeps the programs above. The sections are libbpf 1.3's names; the
 * loader (node_exporter/bpf/loader.py) handles them itself for libbpf 1.1. Cookies are enum kscope_tls_fn
 * (node_exporter/l7/tls.py PROBES is in this order; a test checks it against the BTF).
 */
enum kscope_tls_fn {
	KSCOPE_TLS_FN_WRITE = 0,
	KSCOPE_TLS_FN_READ = 1,
	KSCOPE_TLS_FN_WRITE_EX = 2,
	KSCOPE_TLS_FN_READ_EX = 3,
};
enum kscope_tls_fn __anchor_tls_fn __attribute__((unused));

SEC("uprobe.multi")
int BPF_KPROBE(ssl_enter, void *ssl, void *buf, size_t num, size_t *ex_len)
{
	switch (bpf_get_attach_cookie(ctx)) {
	case KSCOPE_TLS_FN_WRITE:
		tls_enter((__u64)ssl, (__u64)buf, 0, KSCOPE_DIR_EGRESS);
		break;
	case KSCOPE_TLS_FN_READ:
		tls_enter((__u64)ssl, (__u64)buf, 0, KSCOPE_DIR_INGRESS);
		break;
	case KSCOPE_TLS_FN_WRITE_EX:
		tls_enter((__u64)ssl, (__u64)buf, (__u64)ex_len, KSCOPE_DIR_EGRESS);
		break;
	case KSCOPE_TLS_FN_READ_EX:
		tls_enter((__u64)ssl, (__u64)buf, (__u64)ex_len, KSCOPE_DIR_INGRESS);
		break;
	}
	return 0;
}

SEC("uretprobe.multi")
int BPF_KRETPROBE(ssl_exit_multi, long ret)
{
	tls_exit(ret);
	return 0;
}

/* ---- exchanges that no next request ends: closed sockets and idle keep-alive ------------ */

/* Whether the sweep sends the exchange now: answered and idle (final: the agent's last sweep,
 * capture stopped: any answered one), or unanswered too long. */
static __always_inline bool xchg_due(const struct l7_xchg *x, __u64 now, bool final)
{
	return (x->state == XS_ANSWERED && (final || now - x->last_ns >= idle_ns)) ||
	       (x->state == XS_REQUEST && now - x->start_ns >= unanswered_ns);
}

/* Emit the exchange if it is still due under the lock (closed, or xchg_due); the record slot is
 * taken before. */
static __always_inline void xchg_retire(struct sock *sk, struct l7_xchg *x, __u8 reason, __u64 now, bool final)
{
	struct kscope_l7_exchange *r = 0;
	struct kscope_l7_summary *ev = 0;
	bool filled = false, fold = x->state == XS_ANSWERED && wants_summary(x);
	bool fold_failed = false, evicted = false;

	/* a socket closing after its only request (Connection: close): a summary of one would cost
	 * user space more than the record, and sums nothing */
	if (reason == KSCOPE_EMIT_CLOSE && slots_empty(x))
		fold = false;

	if (!fold) {
		r = xrec_reserve(sk);
		if (!r)
			return;
	} else if (!slot_free(x)) {
		ev = summary_reserve(sk);
	}
	bpf_spin_lock(&x->lock);
	if (x->state == XS_REQUEST || x->state == XS_ANSWERED) {
		if (reason == KSCOPE_EMIT_CLOSE || xchg_due(x, now, final)) {
			if (r) {
				xrec_fill(r, x, reason);
				filled = true;
				x->state = reason == KSCOPE_EMIT_CLOSE ? XS_NONE : XS_EMITTED;
			} else if (x->state == XS_ANSWERED) {
				if (ev)
					evicted = slot_evict(ev, x);
				fold_failed = !slot_fold(x);
				x->state = reason == KSCOPE_EMIT_CLOSE ? XS_NONE : XS_EMITTED;
			}
		}
	}
	bpf_spin_unlock(&x->lock);
	xrec_send(r, filled);
	evict_send(ev, evicted);
	if (fold_failed)
		stat_inc(KSCOPE_L7_STAT_SUMMARY_LOST);
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(l7_destroy, struct sock *sk)
{
	struct l7_xchg *x = bpf_sk_storage_get(&l7_xchg, sk, 0, 0);

	if (!x)
		return 0;
	if (x->state == XS_REQUEST || x->state == XS_ANSWERED)
		xchg_retire(sk, x, KSCOPE_EMIT_CLOSE, 0, false);
	slots_flush(sk, x, KSCOPE_EMIT_CLOSE, 0, true);
	return 0;
}

/*
 * The sweep: user space runs it every --sweep-interval in every network namespace marked since
 * (a TCP iterator shows the sockets of the namespace it was created in; this kernel refuses map
 * iterators, see l4.bpf.c's flush; netns_pending.h); sockets without exchange state are
 * skipped at one storage lookup. An answered exchange idle for idle_ns is sent (the last request of an idle keep-alive
 * connection would otherwise wait for the next one or the close); an unanswered one after
 * unanswered_ns. The pass's session id makes a socket shown twice (the iterator resuming a
 * bucket) one visit. The socket's own CPU may be updating the same exchange: the unlocked peek
 * only avoids reserving a slot for nothing, the decision is taken again under the lock.
 * Records go to the ring like every other, nothing to the seq file.
 */
SEC("iter/tcp")
int sweep(struct bpf_iter__tcp *ctx)
{
	__u64 session = ctx->meta->session_id;
	struct sock_common *skc = ctx->sk_common;
	struct l7_xchg *x;
	struct sock *sk;
	__u32 zero = 0, *ctl;
	bool final, pending;
	__u64 now;

	if (!skc)
		return 0;
	/* a full TCP socket (request and time-wait sockets have no storage), as a pointer the
	 * storage helper accepts */
	sk = (struct sock *)bpf_skc_to_tcp_sock(skc);
	if (!sk)
		return 0;
	x = bpf_sk_storage_get(&l7_xchg, sk, 0, 0);
	if (!x || x->swept == session)
		return 0;
	x->swept = session;
	ctl = bpf_map_lookup_elem(&l7_sweep_ctl, &zero);
	final = ctl && *ctl;
	now = bpf_ktime_get_ns();
	if (xchg_due(x, now, final)) /* an unlocked peek: xchg_retire decides again under the lock */
		xchg_retire(sk, x, KSCOPE_EMIT_SWEEP, now, final);
	else if (final && x->state == XS_REQUEST)
		stat_inc(KSCOPE_L7_STAT_STOP_PENDING); /* its response may still come: neither sent nor lost */
	if (!slots_empty(x))
		slots_flush(sk, x, KSCOPE_EMIT_SWEEP, now, final);
	/* anything left (not due yet, or no room in the ring) needs a later sweep: the namespace is
	 * marked again; nothing left: the socket's next request marks it (see xchg_request) */
	bpf_spin_lock(&x->lock);
	pending = x->state == XS_REQUEST || x->state == XS_ANSWERED || !slots_empty(x);
	x->marked = pending;
	bpf_spin_unlock(&x->lock);
	if (pending && !netns_mark(&l7_netns_pending, &l7_netns_walk_all, sk))
		stat_inc(KSCOPE_L7_STAT_NETNS_PENDING_FULL);
	return 0;
}
