// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: answered exchanges summed per socket past the record rate. Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_SUMMARY_H
#define KSCOPE_L7_SUMMARY_H

#include "l7_route.h"

/* ---- Summaries ----------------------------------------------------------------------------
 *
 * At a few µs of Python per record, one record per request cannot keep up with a saturated
 * server, and on a small node that time is taken from the application. So past the
 * sampler's rate (record_cost_ns per CPU) answered exchanges with a status below 500 are
 * summed in the socket's storage per key (method and the path's route template, l7_route.h;
 * and status): count, byte and latency sums, min/max and a latency
 * histogram (bounds in abi/l7.h). A slot leaves as one summary record on the exchange ring
 * summary_ns after its first exchange (the sweep), or at close. Metrics stay exact; only the
 * per-request detail (start time, trace headers) is sampled. 5xx, unanswered, upgraded and
 * pipelined exchanges and paths the kernel cannot template (l7_route.h) are always records.
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

/* [0]: the share of 2^32 below which an exchange's link_mix picks it, when pick_auto (the agent's) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} l7_pick SEC(".maps");

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

/* The link pick's hash: MurmurHash3's 64-bit finalizer (a keep-alive connection's numbers are an
 * arithmetic progression, which a bare multiply leaves visibly uneven), top 32 bits. User space has
 * the same function (node_exporter/l7/collector.py link_mix) for tests. */
static __always_inline __u32 link_mix(__u32 req_seq, __u32 resp_seq)
{
	__u64 x = ((__u64)req_seq << 32) | resp_seq;

	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return (__u32)(x >> 32);
}

/* Whether the exchange starting now gets a record of its own: picked by its TCP sequence numbers
 * (link_pick: both ends read the same numbers, so both make the same choice without asking each
 * other, as a trace-id ratio sampler does with a propagated id) and a token from this CPU's bucket.
 * A pick the bucket refuses is counted: only there may the ends differ. The share is the fixed knob
 * (link_pick), or with pick_auto the agent's, read from l7_pick; with neither (rodata) the verifier
 * drops the pick's code. */
static __always_inline __u32 current_pick(void)
{
	__u32 zero = 0, *p;

	if (link_pick || !pick_auto) /* rodata: the verifier keeps one branch */
		return link_pick;
	p = bpf_map_lookup_elem(&l7_pick, &zero);
	return p ? *p : 0;
}

static __always_inline bool sample(__u64 now, __u32 req_seq, __u32 resp_seq)
{
	struct sampler *s;
	__u32 zero = 0, pick = current_pick();
	__u64 credit;

	if (pick_auto)
		stat_inc(KSCOPE_L7_STAT_OFFERED);
	if (pick && link_mix(req_seq, resp_seq) >= pick)
		return false;
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
		if (pick)
			stat_inc(KSCOPE_L7_STAT_PICK_OVER_BUDGET);
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

/* The raw-path key (summary_raw_paths): a hash of the request line up to the path's end (method
 * and path, no query); 0 if the request line does not fit KSCOPE_L7_SUMMARY_HEAD captured bytes
 * (or CONNECT). Bytes past n are zero. A global function, as l7_route_hash: inlined, it pushed
 * l7_send past the verifier's complexity bound. */
__attribute__((noinline)) __u64 l7_raw_path_hash(const struct route_line *line, __u32 n, __u32 method)
{
	struct phash p = { .n = n };

	if (!line)
		return 0;
	p.d = line->b;

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

/* The key of a request for summing (l7_route.h): 0, never summed. */
static __always_inline __u64 path_hash(const __u8 *d, __u32 n, __u8 method)
{
	if (summary_raw_paths)
		return l7_raw_path_hash((const struct route_line *)d, n, method);
	return l7_route_hash((const struct route_line *)d, n, method);
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
	bool empty = true;

#pragma unroll
	for (int i = 0; i < L7_SLOTS; i++)
		empty &= !x->slots[i].count;
	return empty;
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
#pragma unroll
	for (int i = 0; i < L7_SLOTS; i++)
		slot_flush(sk, x, &x->slots[i], reason, now, all);
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

#endif /* KSCOPE_L7_SUMMARY_H */
