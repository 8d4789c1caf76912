// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L7: in-process causality (issue 18 item 2, docs/traces.md). Included once, by l7.bpf.c.
 *
 * A thread-per-request server's thread reads a request, makes its client calls, answers: the
 * calls a thread starts between a server request's first byte and its response's are that
 * request's children. Per thread, a context: the start of the server exchange it is serving,
 * open from the request's first byte (received on this thread) to the response's first byte.
 * A client exchange started on the thread while its context is open carries the context's
 * start (KSCOPE_X_PARENT, tentative); the server exchange's record says whether it is their
 * parent for sure (KSCOPE_X_PARENT_OK), decided when its response starts; the agent links only
 * children whose parent record says so.
 *
 * A thread serving several requests at once (an event loop) would give a call the wrong parent:
 * a wrong parent is worse than none, so such threads are refused, not guessed at:
 *   - a thread that calls epoll_wait/epoll_pwait/epoll_pwait2 (or io_uring_enter) is flagged for
 *     good (every event loop on Linux waits there: nginx, libuv, asyncio, Netty, Go's netpoller);
 *   - a process is flagged for good when one of its threads starts a server request while
 *     another is open on it, or answers a request another thread read (hand-offs, coroutines).
 * A flagged thread's or process's calls get no parent, and its server exchanges confirm none
 * (a flag set between a call and its parent's response still cuts the link). The flags live in
 * plain hashes (an LRU would forget a flag silently: a refused thread would become a guessed
 * one); a thread's entries go at its exit, a process's at its last thread's. A flag that cannot
 * be stored (map full) turns causality off for good, counted.
 *
 * Every function here is a global (noinline) subprogram: the verifier checks each once, alone,
 * instead of inside xchg_call's paths (which are near its complexity bound).
 */
#ifndef KSCOPE_L7_CAUSAL_H
#define KSCOPE_L7_CAUSAL_H

const volatile __u8 causal = 1; /* 0: no contexts, no parents (the agent's --no-l7-causal) */
__u32 causal_off = 0;           /* set for good when a flag could not be stored */

struct causal_ctx {
	__u64 start_ns; /* the server exchange's start (l7_xchg.start_ns): its key with the thread id */
	__u8 open;      /* its response has not started yet */
	__u8 child;     /* CHILD_ANY: client calls started inside it; CHILD_RECORDED: the sampler picked
	                 * one of them, so it must be a record too */
	__u8 _pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KSCOPE_CAUSAL_THREADS);
	__type(key, __u32); /* thread id */
	__type(value, struct causal_ctx);
} causal_ctx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KSCOPE_CAUSAL_FLAGGED);
	__type(key, __u32); /* thread id */
	__type(value, __u8);
} causal_threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KSCOPE_CAUSAL_FLAGGED);
	__type(key, __u32); /* process id (tgid) */
	__type(value, __u8);
} causal_procs SEC(".maps");

#define CHILD_ANY 1
#define CHILD_RECORDED 2

/* What causal_server_answer tells the response path. */
#define CAUSAL_PARENT_OK 1 /* the exchange is its children's parent */
#define CAUSAL_FORCE 2     /* ... and one of them will be a record: so must it */

static __always_inline void causal_flag(void *map, __u32 id, __u32 stat)
{
	__u8 one = 1;

	if (bpf_map_lookup_elem(map, &id))
		return;
	if (bpf_map_update_elem(map, &id, &one, BPF_NOEXIST) == 0) {
		stat_inc(stat);
	} else if (!bpf_map_lookup_elem(map, &id)) {
		causal_off = 1; /* a refusal we cannot remember: refuse everything from now on */
		stat_inc(KSCOPE_L7_STAT_CAUSAL_MAP_FULL);
	}
}

/* The keys by pointer: the chunk path passes its header's own ids (map memory, no stack). */
static __always_inline bool causal_refused_ids(const __u32 *tid, const __u32 *tgid)
{
	return causal_off || bpf_map_lookup_elem(&causal_threads, tid) || bpf_map_lookup_elem(&causal_procs, tgid);
}

static __always_inline bool causal_refused(__u64 id)
{
	__u32 tid = (__u32)id, tgid = id >> 32;

	return causal_refused_ids(&tid, &tgid);
}

/* An event loop's wait returned on this thread. */
__attribute__((noinline)) int causal_flag_thread(void)
{
	if (causal)
		causal_flag(&causal_threads, (__u32)bpf_get_current_pid_tgid(), KSCOPE_L7_STAT_CAUSAL_THREAD_FLAGGED);
	return 0;
}

/* A server request's first byte was read on this thread (its exchange starts at start_ns). */
__attribute__((noinline)) int causal_server_start(__u64 start_ns)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct causal_ctx fresh = { .start_ns = start_ns, .open = 1 }, *c;

	if (!causal)
		return 0;
	c = bpf_map_lookup_elem(&causal_ctx, &tid);
	if (c) {
		if (c->open) /* two server requests open on one thread: it multiplexes */
			causal_flag(&causal_procs, id >> 32, KSCOPE_L7_STAT_CAUSAL_PROC_FLAGGED);
		*c = fresh; /* only this thread writes its context (and its exit removes it) */
	} else if (bpf_map_update_elem(&causal_ctx, &tid, &fresh, BPF_ANY)) {
		stat_inc(KSCOPE_L7_STAT_CAUSAL_MAP_FULL); /* no context: its calls get no parent */
	}
	return 0;
}

/* A client request's first byte was sent on this thread: the start of the server exchange it is
 * made inside of, 0 for none. `sampled`: the sampler picked this exchange for a record of its
 * own, so its parent must be one too. Only then: a child that is a record for another reason (a
 * connection's only request, a path the kernel cannot sum) does not force its parent, or a server
 * calling out on fresh connections would never be summed (its records would pass the rate). */
__attribute__((noinline)) __u64 causal_client_start(__u32 sampled)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct causal_ctx *c;

	if (!causal)
		return 0;
	c = bpf_map_lookup_elem(&causal_ctx, &tid);
	if (!c || !c->open)
		return 0;
	if (causal_refused(id)) {
		stat_inc(KSCOPE_L7_STAT_CAUSAL_REFUSED);
		return 0;
	}
	c->child |= sampled ? CHILD_ANY | CHILD_RECORDED : CHILD_ANY;
	stat_inc(KSCOPE_L7_STAT_CAUSAL_PARENTS);
	return c->start_ns;
}

/* A client socket's chunk is sent on this thread (a protocol user space pairs: databases, caches,
 * DNS, TLS, HTTP/2): h->parent_ns is the start of the server exchange it is made inside of, 0 for
 * none, as causal_client_start's. Never forces its parent to be a record: user space cannot tell
 * here which of its calls it will sample, and forcing every parent with a database call would end
 * summing. Inlined, not a call: on l7_send's capture path a subprogram's frame passed the 512-byte
 * stack bound; the map keys are the header's own thread and process ids (fill_task's: map memory,
 * no stack). */
static __always_inline void causal_chunk_parent(struct kscope_l7_header *h)
{
	struct causal_ctx *c;

	h->parent_ns = 0;
	if (!causal)
		return;
	c = bpf_map_lookup_elem(&causal_ctx, &h->pid);
	if (!c || !c->open)
		return;
	if (causal_refused_ids(&h->pid, &h->tgid)) {
		stat_inc(KSCOPE_L7_STAT_CAUSAL_REFUSED);
		return;
	}
	c->child |= CHILD_ANY;
	stat_inc(KSCOPE_L7_STAT_CAUSAL_CHUNKS);
	h->parent_ns = c->start_ns;
}

/* The final response of the server exchange read by thread recv_tid at start_ns starts on this
 * thread: the context closes; CAUSAL_PARENT_OK if the exchange is its children's parent. */
__attribute__((noinline)) int causal_server_answer(__u64 start_ns, __u32 recv_tid)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct causal_ctx *c;
	int child;

	if (!causal)
		return 0;
	if (tid != recv_tid) {
		/* another thread answers: requests are handed over, calls may run anywhere */
		causal_flag(&causal_procs, id >> 32, KSCOPE_L7_STAT_CAUSAL_PROC_FLAGGED);
		c = bpf_map_lookup_elem(&causal_ctx, &recv_tid);
		if (c && c->start_ns == start_ns)
			c->open = 0;
		return 0;
	}
	c = bpf_map_lookup_elem(&causal_ctx, &tid);
	if (!c || c->start_ns != start_ns || !c->open)
		return 0; /* another request started on the thread meanwhile (flagged there), or no context */
	c->open = 0;
	child = c->child;
	if (!child)
		return 0;
	if (causal_refused(id)) {
		stat_inc(KSCOPE_L7_STAT_CAUSAL_UNCONFIRMED);
		return 0;
	}
	stat_inc(KSCOPE_L7_STAT_CAUSAL_CONFIRMED);
	return child & CHILD_RECORDED ? CAUSAL_PARENT_OK | CAUSAL_FORCE : CAUSAL_PARENT_OK;
}

/* The server exchange read by recv_tid at start_ns ends unanswered (its socket closed): its
 * context closes, or the thread's next request would flag the process for nothing. */
__attribute__((noinline)) int causal_server_abandon(__u64 start_ns, __u32 recv_tid)
{
	struct causal_ctx *c = bpf_map_lookup_elem(&causal_ctx, &recv_tid);

	if (c && c->start_ns == start_ns && c->open) {
		c->open = 0;
		stat_inc(KSCOPE_L7_STAT_CAUSAL_ABANDONED);
	}
	return 0;
}

/* A task exits: its thread's entries go; the process's flag with its last thread. */
static __always_inline void causal_task_exit(struct task_struct *p)
{
	__u32 tid = p->pid, tgid = p->tgid;

	bpf_map_delete_elem(&causal_ctx, &tid);
	bpf_map_delete_elem(&causal_threads, &tid);
	if (!p->signal->live.counter)
		bpf_map_delete_elem(&causal_procs, &tgid);
}

#endif /* KSCOPE_L7_CAUSAL_H */
