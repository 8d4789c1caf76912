// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L7: HTTP/2 frames walked in the kernel (h2_compact knob). Included once, by l7.bpf.c.
 *
 * User space needs frame boundaries and the payloads of the frames that carry header blocks and
 * control (HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, GOAWAY, SETTINGS ...), never DATA
 * payloads. So a call of an HTTP/2 socket is walked frame by frame here, over all its bytes (past
 * any capture bound, across a message call's iovecs), and what leaves is the byte stream with DATA
 * payloads cut out: every frame header whole (a DATA header still tells its length), every other
 * payload whole. A chunk carries that "compact" stream (flag KSCOPE_L7_H2_FRAMES): seq and len count
 * compact bytes, so the tracker's gap and truncation rules work unchanged. A call that lies wholly
 * inside a DATA payload sends nothing.
 *
 * The walk carries, per socket (or SSL object) and direction, where it is in the current frame:
 * bytes of the payload still to come and whether they are sent, or how much of the next 9-byte
 * header it has seen (a header split across calls). When it cannot follow (no user buffer, a read
 * that failed, readv/writev past their first buffer, the step bound), the direction is out of step
 * (counted, KSCOPE_L7_STAT_H2_LOST): the compact stream skips a byte, so user space sees a gap, and
 * the walk starts again at a call whose first bytes are a plausible frame header or the client preface.
 */
#ifndef KSCOPE_L7_H2_H
#define KSCOPE_L7_H2_H

/* Sockets: only HTTP/2 ones get this storage (created when the socket is decided HTTP/2). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct h2_conn);
} l7_h2 SEC(".maps");

#define H2_WALK_STEPS 4096 /* bpf_loop steps per call: ~2 per frame, 1 per iovec */

struct h2_walk {
	__u64 iov;   /* user address of the iovec array; 0: one buffer */
	__u64 cnt;   /* its entries */
	__u64 idx;   /* the iovec being walked */
	__u64 base;  /* user address of the buffer being walked (an iovec read in place: base, then length) */
	__u64 blen;  /* its length */
	__u64 boff;  /* bytes of it walked */
	__u64 rest;  /* bytes of the call not walked yet */
	__u32 out;   /* compact bytes made by this call (copied while < KSCOPE_L7_MAX_CAPTURE) */
	__u32 left;  /* as struct h2_dir */
	__u8 copy;
	__u8 have;
	__u8 lost;
	__u8 _pad[5];
	__u8 hdr[16];
	__u8 head[H2_PREFACE_LEN]; /* an out-of-step direction's call head: a frame header or the preface? */
};

/* The walk's state lives in a per-CPU map, not on the stack: values read back from a map are unknown
 * to the verifier, so every bpf_loop step looks alike to it and the callback is checked once (from the
 * stack, the bytes made so far and the header position stayed exact, and each step was a new state). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_walk);
} l7_h2_scratch SEC(".maps");

/* Append `take` (< KSCOPE_L7_MAX_CAPTURE) user bytes at `src` to the chunk's data, as far as it has
 * room; false if the read failed. */
static __always_inline bool h2_emit(struct h2_walk *w, __u64 src, __u32 take)
{
	__u32 zero = 0, out = w->out, room;
	struct chunk *c;

	w->out = out + take;
	if (out >= KSCOPE_L7_MAX_CAPTURE)
		return true;
	room = KSCOPE_L7_MAX_CAPTURE - out;
	if (take > room)
		take = room;
	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c)
		return false;
	/* out < MAX and take < MAX: both masks keep their values and show the verifier the copy stays
	 * inside data (2 * KSCOPE_L7_MAX_CAPTURE) */
	return !take || !bpf_probe_read_user(c->data + (out & (KSCOPE_L7_MAX_CAPTURE - 1)),
					     take & (KSCOPE_L7_MAX_CAPTURE - 1), (const void *)src);
}

/* Append the whole frame header just read into w->hdr to the chunk's data (as far as it has room):
 * a copy, not a second read of user memory. */
static __always_inline bool h2_emit_header(struct h2_walk *w)
{
	__u32 zero = 0, out = w->out;
	struct chunk *c;

	w->out = out + H2_FRAME_HEADER;
	if (out > KSCOPE_L7_MAX_CAPTURE - H2_FRAME_HEADER) /* the caller checked: never */
		return false;
	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c)
		return false;
	__builtin_memcpy(c->data + (out & (KSCOPE_L7_MAX_CAPTURE - 1)), w->hdr, H2_FRAME_HEADER);
	return true;
}

/* One step: the next buffer, a header (or one byte of a split one), or a payload piece. 1 stops. */
static long h2_step(__u32 i, void *arg)
{
	__u32 zero = 0, take, len;
	struct h2_walk *w = bpf_map_lookup_elem(&l7_h2_scratch, &zero);
	__u64 avail, src;
	__u8 type;

	if (!w || !w->rest)
		return 1;
	if (w->boff >= w->blen) {
		if (!w->iov || w->idx + 1 >= w->cnt || w->idx + 1 >= L7_MAX_IOV) {
			w->lost = 1; /* bytes we cannot reach (readv/writev past their first buffer) */
			return 1;
		}
		w->idx++;
		if (bpf_probe_read_user(&w->base, 2 * sizeof(__u64), (const void *)(w->iov + w->idx * 2 * sizeof(__u64)))) {
			w->lost = 1;
			return 1;
		}
		w->boff = 0;
		return 0;
	}
	avail = w->blen - w->boff;
	if (avail > w->rest)
		avail = w->rest;
	src = w->base + w->boff;
	if (w->left) {
		take = w->left;
		if (take > avail)
			take = avail;
		if (w->copy) {
			if (take > KSCOPE_L7_MAX_CAPTURE - 1)
				take = KSCOPE_L7_MAX_CAPTURE - 1;
			if (!h2_emit(w, src, take)) {
				w->lost = 1;
				return 1;
			}
		}
		w->left -= take;
		w->boff += take;
		w->rest -= take;
		return 0;
	}
	if (!w->have && avail >= H2_FRAME_HEADER) {
		take = H2_FRAME_HEADER; /* the usual case: a whole header, read once and copied from here */
		if (bpf_probe_read_user(w->hdr, H2_FRAME_HEADER, (const void *)src)) {
			w->lost = 1;
			return 1;
		}
		if (w->out <= KSCOPE_L7_MAX_CAPTURE - H2_FRAME_HEADER ? !h2_emit_header(w) : !h2_emit(w, src, take)) {
			w->lost = 1;
			return 1;
		}
	} else {
		take = 1; /* a header split across buffers or calls: a byte a step */
		if (bpf_probe_read_user(&w->hdr[w->have & 15], 1, (const void *)src) || !h2_emit(w, src, take)) {
			w->lost = 1;
			return 1;
		}
	}
	w->boff += take;
	w->rest -= take;
	w->have += take;
	if (w->have < H2_FRAME_HEADER)
		return 0;
	w->have = 0;
	len = (__u32)w->hdr[0] << 16 | (__u32)w->hdr[1] << 8 | w->hdr[2];
	type = w->hdr[3];
	if (type > 0x10) { /* no frame type is defined past PRIORITY_UPDATE (0x10): we are out of step */
		w->lost = 1;
		return 1;
	}
	w->left = len;
	w->copy = type != 0; /* DATA: counted by its header, never sent */
	return 0;
}

/* A direction's state when the connection is decided HTTP/2 on this call: after the client preface
 * (24 bytes, sent as they are) both directions start at a frame; decided from frames, this call starts
 * at one and the other direction is out of step until a call of it starts with one. */
static __always_inline void h2_start(struct h2_conn *h, __u32 idx, bool preface)
{
	__builtin_memset(h, 0, sizeof(*h));
	if (preface) {
		h->dir[idx].left = H2_PREFACE_LEN;
		h->dir[idx].copy = 1;
	} else {
		h->dir[idx ^ 1].lost = 1;
	}
}

#define H2_WALK_FRESH 0x100   /* l7_h2_walk: this call decided the connection HTTP/2 */
#define H2_WALK_PREFACE 0x200 /* ... and it starts with the client preface */

/*
 * Walk one call of `len` bytes from `buf` (its first buffer `avail` bytes long; a message call's
 * iovecs are in l7_vec) with the connection's state `h` (`how`: the direction, H2_WALK_*), compacting
 * into l7_scratch's data. Returns the compact bytes the call makes (the chunk's len; the first
 * KSCOPE_L7_MAX_CAPTURE are in data), 0 or -1 when it has nothing to send. A global function: the
 * verifier checks it once, not inside l7_send (near its complexity bound).
 */
__attribute__((noinline)) int l7_h2_walk(struct h2_conn *h, __u64 buf, __u64 len, __u64 avail, __u32 how)
{
	__u32 zero = 0, idx = ((how & 0xff) - 1) & 1;
	struct l7_vec *vec = bpf_map_lookup_elem(&l7_vec, &zero);
	struct h2_walk *w = bpf_map_lookup_elem(&l7_h2_scratch, &zero);
	struct h2_dir *d;
	__u32 out;

	if (!h || !w)
		return -1;
	__builtin_memset(w, 0, sizeof(*w));
	w->base = buf;
	w->blen = avail < len ? avail : len;
	w->rest = len;
	if (how & H2_WALK_FRESH)
		h2_start(h, idx, how & H2_WALK_PREFACE);
	d = &h->dir[idx];
	if (vec && vec->cnt > 1 && avail < len) {
		w->iov = (__u64)vec->iov;
		w->cnt = vec->cnt;
	}
	if (d->lost) {
		/* back in step only at a call that starts with a frame header (a writer's frames do) or with
		 * the client preface (a server that wrote first: the connection was found from its frames) */
		if (!buf || w->blen < H2_FRAME_HEADER ||
		    bpf_probe_read_user(w->head, w->blen < H2_PREFACE_LEN ? H2_FRAME_HEADER : H2_PREFACE_LEN,
					(const void *)buf))
			return -1;
		d->left = 0;
		d->copy = 0;
		if (w->blen >= H2_PREFACE_LEN && has_prefix(w->head, H2_PREFACE_LEN, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
							       H2_PREFACE_LEN)) {
			d->left = H2_PREFACE_LEN;
			d->copy = 1;
		} else if (h2_frame(w->head, H2_FRAME_HEADER, 0) == ~0U) {
			return -1;
		}
		d->lost = 0;
		d->have = 0;
	}
	if (!buf) {
		w->lost = 1;
	} else {
		w->left = d->left;
		w->copy = d->copy;
		w->have = d->have;
		__builtin_memcpy(w->hdr, d->hdr, sizeof(d->hdr));
		bpf_loop(H2_WALK_STEPS, h2_step, 0, 0);
		if (w->rest)
			w->lost = 1; /* the step bound */
	}
	d->left = w->left;
	d->copy = w->copy;
	d->have = w->have;
	__builtin_memcpy(d->hdr, w->hdr, sizeof(d->hdr));
	out = w->out;
	d->cseq += out;
	if (w->lost) {
		d->lost = 1;
		d->cseq += 1; /* the next chunk's seq jumps: user space sees the gap and resyncs */
		stat_inc(KSCOPE_L7_STAT_H2_LOST);
	}
	return out;
}

/* l7_h2_walk's `how` for a call in direction `dir`; `d`: the call's head when `fresh`. */
static __always_inline __u32 h2_how(__u8 dir, bool fresh, const __u8 *d)
{
	return dir | (fresh ? H2_WALK_FRESH | (d[0] == 'P' ? H2_WALK_PREFACE : 0) : 0);
}

#endif /* KSCOPE_L7_H2_H */
