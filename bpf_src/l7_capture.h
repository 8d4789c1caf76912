// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: one socket call or one OpenSSL call captured. Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_CAPTURE_H
#define KSCOPE_L7_CAPTURE_H

/* Protocols that may switch to TLS in the middle of a connection (an in-band SSL request). */
static __always_inline bool starts_tls(__u8 protocol)
{
	return protocol == KSCOPE_PROTO_POSTGRESQL || protocol == KSCOPE_PROTO_MYSQL;
}

static __always_inline void bind_tls(struct sock *sk, struct l7_sock *st, struct tls_call *call, __u8 ip_proto)
{
	struct tls_conn fresh = {}, *conn;
	__u64 key = ssl_key(call->ssl);

	st->tls = 1;
	conn = bpf_map_lookup_elem(&tls_conns, &key);
	if (conn && conn->sock_cookie == bpf_get_socket_cookie(sk))
		return;
	/* straight into the entry: a whole chunk header on the stack for its address fields took the
	 * room l7_send's frame needs (the 512-byte bound) */
	read_tuple(fresh.saddr, fresh.daddr, &fresh.sport, &fresh.dport, &fresh.family, sk);
	fresh.sock_cookie = bpf_get_socket_cookie(sk);
	fresh.netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	fresh.role = sk->sk_max_ack_backlog ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
	if (starts_tls(st->protocol)) {
		/* an in-band upgrade: the plaintext goes on in the protocol the socket spoke (MariaDB reads a
		 * packet's 4-byte header and its payload in two SSL_read calls: neither tells on its own) */
		fresh.protocol = st->protocol;
		fresh.role = st->role;
	}
	bpf_map_update_elem(&tls_conns, &key, &fresh, BPF_ANY);
}

/* A chunk's socket fields and the call's head (the bytes captured). */
static __always_inline __u32 chunk_head(struct chunk *c, struct sock *sk, __u8 ip_proto, const void *buf,
					const void *uaddr, int ret, __u64 avail, __u8 protocol)
{
	__builtin_memset(&c->hdr, 0, sizeof(c->hdr));
	read_tuple(c->hdr.saddr, c->hdr.daddr, &c->hdr.sport, &c->hdr.dport, &c->hdr.family, sk);
	if (ip_proto == IPPROTO_UDP && !c->hdr.dport)
		read_peer(&c->hdr, uaddr);
	return l7_read_head(c, buf, ret, avail, l7_capture_bound(protocol, capture_bytes));
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

	if (family != AF_INET && family != AF_INET6)
		return;
	if (ip_proto != IPPROTO_TCP && ip_proto != IPPROTO_UDP)
		return;
	if (ret <= 0) {
		if (!ret)
			mmsg_skip_empty();
		return;
	}
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
	if (starts_tls(st->protocol)) {
		/* PostgreSQL after SSLRequest 'S', MySQL after its SSL request: ciphertext written or read by
		 * an SSL_* call from now on; its plaintext comes from the uprobes, bound to this socket here */
		tid = (__u32)bpf_get_current_pid_tgid();
		call = bpf_map_lookup_elem(&tls_calls, &tid);
		if (call) {
			bind_tls(sk, st, call, ip_proto);
			return;
		}
	}
	seq = st->seq[dir - 1];
	st->seq[dir - 1] = seq + ret;
	fresh = st->protocol == KSCOPE_PROTO_UNKNOWN;

	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c)
		return;
	l7_vec_clear();
	buf = user_buffer((struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf()), &avail, &uaddr);
	if (fresh) {
		__u8 role = 0, proto;

		if (l7_own_call(own_pidns_dev, own_pidns_ino, own_tgid)) {
			st->protocol = KSCOPE_PROTO_IGNORED;
			stat_inc(KSCOPE_L7_STAT_OWN);
			return;
		}
		n = chunk_head(c, sk, ip_proto, buf, uaddr, ret, avail, KSCOPE_PROTO_UNKNOWN);
		proto = infer_chunk(c, n, dir, ip_proto, c->hdr.sport, c->hdr.dport, &role);

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
		st->role = role ? role : l7_socket_role(sk);
		if (n > l7_capture_bound(proto, capture_bytes))
			n = l7_capture_bound(proto, capture_bytes);
	}

	/* plain-text HTTP/1 over TCP: the exchange path, from a socket's first call on (it reads the
	 * head it needs itself). One call site: xchg_call is most of the program, and inlined twice it
	 * doubled what the verifier walks (~0.3 M of its 1 M instructions once). */
	if (exchanges && st->protocol == KSCOPE_PROTO_HTTP1 && ip_proto == IPPROTO_TCP && !st->chunks &&
	    xchg_call(sk, st, c, buf, avail, ret, dir, seq))
		return;
	if (h2_compact && st->protocol == KSCOPE_PROTO_HTTP2) {
		/* the frame walk: the compact stream's bytes instead of the call's head (l7_h2.h) */
		struct h2_conn *h = bpf_sk_storage_get(&l7_h2, sk, 0, fresh ? BPF_SK_STORAGE_GET_F_CREATE : 0);
		__u32 how = h2_how(dir, fresh, c->data);
		int out;

		if (!h) {
			stat_inc(KSCOPE_L7_STAT_STORAGE_FAILED);
			return;
		}
		seq = fresh ? 0 : h->dir[(dir - 1) & 1].cseq;
		out = l7_h2_walk(h, (__u64)buf, ret, avail, how);
		if (out <= 0)
			return;
		if (!fresh)
			chunk_head(c, sk, ip_proto, 0, uaddr, ret, avail, st->protocol); /* the socket's fields */
		ret = out;
		n = out < KSCOPE_L7_MAX_CAPTURE ? out : KSCOPE_L7_MAX_CAPTURE;
	} else if (!fresh) {
		n = chunk_head(c, sk, ip_proto, buf, uaddr, ret, avail, st->protocol);
	}
	l7_chunk_call(c, buf != 0, n, ret, seq, dir, st->protocol, st->role, ip_proto);
	if (h2_compact && st->protocol == KSCOPE_PROTO_HTTP2)
		c->hdr.flags |= KSCOPE_L7_H2_FRAMES;
	c->hdr.netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	c->hdr.sock_cookie = bpf_get_socket_cookie(sk);
	fill_task(&c->hdr);
	if (dir == KSCOPE_DIR_EGRESS && st->role == KSCOPE_ROLE_CLIENT) /* else 0: chunk_head cleared the header */
		causal_chunk_parent(&c->hdr);
	submit(c, n);
}


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
	__u64 key, len = 0, seq, buf;
	bool fresh;
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
	buf = call->buf;
	fresh = conn->protocol == KSCOPE_PROTO_UNKNOWN;
	n = 0;
	if (fresh || !h2_compact || conn->protocol != KSCOPE_PROTO_HTTP2) /* the walk reads its own */
		n = l7_read_head(c, (const void *)buf, len, ~0ULL, l7_capture_bound(conn->protocol, capture_bytes));
	bpf_map_delete_elem(&tls_calls, &tid);
	if (dir == KSCOPE_DIR_EGRESS) {
		seq = conn->seq[0];
		conn->seq[0] = seq + len;
	} else {
		seq = conn->seq[1];
		conn->seq[1] = seq + len;
	}
	if (conn->protocol == KSCOPE_PROTO_UNKNOWN) {
		__u8 role = 0, proto;

		if (l7_own_call(own_pidns_dev, own_pidns_ino, own_tgid)) {
			conn->protocol = KSCOPE_PROTO_IGNORED;
			stat_inc(KSCOPE_L7_STAT_OWN);
			return;
		}
		proto = infer_chunk(c, n, dir, IPPROTO_TCP, conn->sport, conn->dport, &role);
		if (proto == KSCOPE_PROTO_UNKNOWN) {
			l7_infer_failed(&conn->protocol, &conn->attempts); /* counted like a plain socket's */
			return;
		}
		conn->protocol = proto;
		if (role) /* else (HTTP/2 from frames) the socket's, from bind_tls */
			conn->role = role;
		if (n > l7_capture_bound(proto, capture_bytes))
			n = l7_capture_bound(proto, capture_bytes);
	}
	if (h2_compact && conn->protocol == KSCOPE_PROTO_HTTP2) {
		int out;

		seq = fresh ? 0 : conn->h2.dir[(dir - 1) & 1].cseq;
		out = l7_h2_walk(&conn->h2, buf, len, ~0ULL, h2_how(dir, fresh, c->data));
		if (out <= 0)
			return;
		len = out;
		n = out < KSCOPE_L7_MAX_CAPTURE ? out : KSCOPE_L7_MAX_CAPTURE;
	}
	__builtin_memset(&c->hdr, 0, sizeof(c->hdr));
	l7_chunk_call(c, true, n, len, seq, dir, conn->protocol, conn->role, IPPROTO_TCP);
	c->hdr.flags |= KSCOPE_L7_TLS;
	if (h2_compact && conn->protocol == KSCOPE_PROTO_HTTP2)
		c->hdr.flags |= KSCOPE_L7_H2_FRAMES;
	c->hdr.netns_ino = conn->netns_ino;
	c->hdr.sock_cookie = conn->sock_cookie;
	__builtin_memcpy(c->hdr.saddr, conn->saddr, 16);
	__builtin_memcpy(c->hdr.daddr, conn->daddr, 16);
	c->hdr.sport = conn->sport;
	c->hdr.dport = conn->dport;
	c->hdr.family = conn->family;
	fill_task(&c->hdr);
	if (dir == KSCOPE_DIR_EGRESS && conn->role == KSCOPE_ROLE_CLIENT)
		causal_chunk_parent(&c->hdr);
	submit(c, n);
}

#endif /* KSCOPE_L7_CAPTURE_H */
