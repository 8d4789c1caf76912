// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: HTTP/1 request and response paired per socket. Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_HTTP1_H
#define KSCOPE_L7_HTTP1_H

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

/* The TCP sequence numbers both ends see for a request starting this call (helpers: before any
 * lock). The tracepoints fire after the call moved its ret bytes: the send advanced write_seq,
 * the receive copied_seq, by ret. The client's copied_seq is the server's write_seq once the
 * previous response was read whole (HTTP/1 without pipelining; pipelining takes the chunk path). */
static __always_inline void tcp_seqs(struct sock *sk, __u8 dir, int ret, __u32 *req, __u32 *resp)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	if (dir == KSCOPE_DIR_EGRESS) { /* the client sent the request */
		*req = BPF_CORE_READ(tp, write_seq) - (__u32)ret;
		*resp = BPF_CORE_READ(tp, copied_seq);
	} else { /* the server received it */
		*req = BPF_CORE_READ(tp, copied_seq) - (__u32)ret;
		*resp = BPF_CORE_READ(tp, write_seq);
	}
}

/* A request-direction call: a new request (method first) or more of the current one. */
static __always_inline bool xchg_request(struct sock *sk, struct l7_sock *st, struct l7_xchg *x, const __u8 *d,
					 __u32 n, int ret, __u64 seq, __u8 dir, bool has_buf, __u64 now)
{
	struct kscope_l7_exchange *r = 0;
	struct kscope_l7_summary *ev = 0;
	__u8 method = has_buf ? request_method(d, n) : 0, comm[16];
	__u64 id, hash = 0, parent = 0;
	__u32 req_seq, resp_seq;
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
	tcp_seqs(sk, dir, ret, &req_seq, &resp_seq);
	sampled = sample(now, req_seq, resp_seq);
	if (!sampled) {
		hash = path_hash(d, n, method);
		if (!hash)
			stat_inc(KSCOPE_L7_STAT_UNSUMMABLE);
	}
	/* in-process causality (l7_causal.h): a server request opens this thread's context, a
	 * client request started inside one takes it as its tentative parent */
	if (st->role == KSCOPE_ROLE_SERVER)
		causal_server_start(now);
	else if (st->role == KSCOPE_ROLE_CLIENT)
		parent = causal_client_start(sampled);
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
	x->flags = (n < (__u32)ret ? KSCOPE_X_HEAD_TRUNCATED : 0) | KSCOPE_X_TCP_SEQ | (parent ? KSCOPE_X_PARENT : 0);
	x->parent_start_ns = parent;
	x->tcp_req_seq = req_seq;
	x->tcp_resp_seq = resp_seq;
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
	bool filled = false, last = false, orphan = false, late = false, forced = false;
	__u64 started = 0;
	int verdict = 0;

	/* a server exchange's final response starts: is it its children's parent (l7_causal.h)?
	 * Asked before the lock (helpers), on a peek; applied under it only to that same exchange */
	if (x->role == KSCOPE_ROLE_SERVER && (status >= 200 || status == 101) && x->state == XS_REQUEST) {
		started = x->start_ns;
		verdict = causal_server_answer(started, x->pid);
	}

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
			if (verdict && x->start_ns == started) {
				x->flags |= KSCOPE_X_PARENT_OK;
				/* a recorded child's parent must be recorded, or the child's link cannot be
				 * confirmed: past the record rate it bypasses the sampler */
				if ((verdict & CAUSAL_FORCE) && !x->sampled) {
					x->sampled = 1;
					forced = true;
				}
			}
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
	if (forced)
		stat_inc(KSCOPE_L7_STAT_CAUSAL_FORCED);
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

#endif /* KSCOPE_L7_HTTP1_H */
