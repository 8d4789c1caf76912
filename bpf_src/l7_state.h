// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: runtime knobs, per-socket state, maps and the chunk path's helpers. Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_STATE_H
#define KSCOPE_L7_STATE_H

/* Runtime knobs, set by user space before load. */
const volatile __u32 capture_bytes = 1024; /* head bytes captured per call, <= KSCOPE_L7_MAX_CAPTURE */
const volatile __u32 filter_netns_ino = 0; /* 0: every network namespace */
const volatile __u32 own_tgid = 0;       /* the agent's pid in its pid namespace: its sockets are not parsed */
const volatile __u64 own_pidns_dev = 0;
const volatile __u64 own_pidns_ino = 0;
const volatile __u8 exchanges = 1;         /* 0: HTTP/1 goes through chunks as well */
const volatile __u64 idle_ns = 500000000;  /* the sweep emits an answered exchange idle this long */
const volatile __u64 unanswered_ns = 300000000000ULL; /* ... and an unanswered one this old */
/* The sampler: each CPU gives an exchange a record of its own once per record_cost_ns of
 * credit (credit accrues with time, at most one second's worth: the burst); the others are
 * summed per socket (see "Summaries"). 0: every exchange is a record. */
const volatile __u64 record_cost_ns = 0;
/* Which exchanges may be records of their own, decided alike at both ends of a connection (docs/traces.md):
 * those whose TCP sequence numbers (read alike by client and server, NAT or not) hash below this share of
 * 2^32; the others are summed. 0: every exchange may (the sampler alone decides, each end for itself). */
const volatile __u32 link_pick = 0;
/* 1: the share is the agent's, set at run time in l7_pick[0] (--l7-trace-ratio auto: a power of two it
 * lowers as the node's requests pass its record rate; 0 there: every exchange may) */
const volatile __u8 pick_auto = 0;
const volatile __u64 summary_ns = 1000000000ULL; /* the sweep sends a summary this long after its first exchange */
/* 1: sum by the raw path (method and path as sent) instead of its route template: only to
 * measure what templating in the kernel buys (bench/idpaths.py) */
const volatile __u8 summary_raw_paths = 0;

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

#define L7_SLOTS 8 /* keys summed at once per socket; a ninth key sends the least used slot's summary early */

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
	__u32 tcp_req_seq;  /* kscope_l7_exchange's, set with KSCOPE_X_TCP_SEQ in flags */
	__u32 tcp_resp_seq;
	__u64 parent_start_ns; /* kscope_l7_exchange's, set with KSCOPE_X_PARENT in flags */
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
 * 16 MiB = 32k exchanges, ~200 ms of a saturated 2-core nginx with both ends traced: room for
 * the gap a starved or collecting (GC) agent leaves between two drains, which 8 MiB was not. */
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

/* HTTP/2 frames walked in the kernel (l7_h2.h). */
const volatile __u8 h2_compact = 1; /* 0: HTTP/2 calls are captured as raw heads (4 KiB), as before */

/* One direction of one HTTP/2 connection, as the walk left it. */
struct h2_dir {
	__u64 cseq;   /* compact bytes made so far: the next chunk's seq */
	__u32 left;   /* bytes of the current frame's payload (or the client preface) still to come */
	__u8 copy;    /* those bytes are sent (anything but DATA) */
	__u8 have;    /* bytes of the next frame header seen so far (0..8), kept in hdr */
	__u8 lost;    /* out of step: wait for a call that starts with a frame header */
	__u8 hdr[9];
	__u8 _pad[1];
};

struct h2_conn {
	struct h2_dir dir[2]; /* index direction - 1 */
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
	struct h2_conn h2; /* HTTP/2 plaintext: the frame walk's place (evicted with the connection) */
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

/*
 * sendmmsg/recvmmsg: the socket tracepoints fire once per message of the vector and do not say
 * which one. The syscall's entry (l7_mmsg_enter, a classic tracepoint that fires only for these
 * two syscalls) starts the count at 0 for the calling thread; each message's tracepoint takes
 * the next index. Guessing from the vector's address and time instead went wrong for glibc's
 * resolver: it sends A and AAAA with one sendmmsg from the same stack vector for every search
 * expansion and retry (the next call, ~0.1 ms later, started at message 2, past the vector: no
 * bytes or stray ones), and a call preempted between its two messages restarted at 0 (message
 * 1 sent with message 0's bytes).
 */
struct mmsg_pos {
	__u64 base; /* the call's msgvec: a stale entry (an entry missed) does not match */
	__u32 next; /* index of the next message the tracepoints will see */
	__u32 vlen; /* messages in the vector (the syscall's vlen, at most UIO_MAXIOV) */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32); /* thread id: a thread is inside one syscall at a time */
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

#define UIO_MAXIOV 1024 /* the kernel's bound on an mmsg vector (include/uapi/linux/uio.h) */

/* The index of this tracepoint call's message in its sendmmsg/recvmmsg vector (`msgvec`), and
 * the next one to the next call; -1 when it is unknown (the entry hook missed the call: not
 * attached, or the thread's entry evicted; counted): better no bytes than another message's. */
static __always_inline int mmsg_next(__u64 msgvec)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct mmsg_pos *pos = bpf_map_lookup_elem(&mmsg_pos, &tid);
	__u32 idx;

	if (!pos || pos->base != msgvec || pos->next >= pos->vlen) {
		stat_inc(KSCOPE_L7_STAT_MMSG_UNKNOWN);
		return -1;
	}
	idx = pos->next;
	pos->next = idx + 1; /* only this thread writes its entry */
	return idx;
}

static __always_inline void mmsg_enter(__u64 msgvec, __u64 vlen)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct mmsg_pos fresh = { .base = msgvec, .vlen = vlen < UIO_MAXIOV ? vlen : UIO_MAXIOV };

	bpf_map_update_elem(&mmsg_pos, &tid, &fresh, BPF_ANY);
}

/* The user buffer of the current socket call (l7_user_buffer); 0 when it has none or its
 * place in an mmsg vector is unknown. */
static __always_inline const void *user_buffer(struct pt_regs *regs, __u64 *avail, const void **uaddr)
{
	/* bpf_task_pt_regs() gives a BTF pointer: plain loads, no probe-read helper per register */
	__u64 nr = regs->orig_ax, si = regs->si;
	int idx = 0;

	if (nr == NR_sendmmsg || nr == NR_recvmmsg) {
		idx = mmsg_next(si);
		if (idx < 0) {
			*uaddr = 0;
			*avail = 0;
			return 0;
		}
	}
	return l7_user_buffer(nr, si, regs->r8, idx, avail, uaddr);
}

/* A call that moved no bytes (a zero-length datagram) still takes its place in an mmsg vector. */
static __always_inline void mmsg_skip_empty(void)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	__u64 nr = regs->orig_ax;

	if (nr == NR_sendmmsg || nr == NR_recvmmsg)
		mmsg_next(regs->si);
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

#endif /* KSCOPE_L7_STATE_H */
