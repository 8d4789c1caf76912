// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: HTTP/1 heads read in the kernel and the exchange ring's records. Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_HTTP1_RECORD_H
#define KSCOPE_L7_HTTP1_RECORD_H

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
	r->tcp_req_seq = x->tcp_req_seq;
	r->tcp_resp_seq = x->tcp_resp_seq;
	r->parent_start_ns = x->parent_start_ns;
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

#endif /* KSCOPE_L7_HTTP1_RECORD_H */
