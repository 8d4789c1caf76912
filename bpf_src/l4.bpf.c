// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L4: every TCP socket's life, counters kept in the kernel.
 *
 * Per-socket state lives in socket-local storage (freed with the socket, no table to
 * evict, and the cheapest per-call lookup on our kernel: docs/kernel.md).
 * User space never sees one event per call. It gets:
 *   - periodic records: a busy socket's own send/recv makes one per interval (report_ns) into
 *     close_ring; the sweep (the `sweep` TCP iterator, run by user space in every network namespace
 *     a socket marked since: netns_pending.h) writes one for every other socket whose counters
 *     changed (those that went quiet: far less often than once per interval);
 *   - final records: one per socket when it is destroyed, through a ring buffer
 *     drained on a timer (no wakeups), falling back to a hash map when the ring is
 *     full; both full is counted (KSCOPE_STAT_CLOSE_LOST), never silent.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "compat.h"
#include "task.h"
#include "sock.h"
#include "limits.h"
#include "netns_pending.h"
#include "abi/l4.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Runtime knobs, set by user space before load. */
const volatile __u32 filter_netns_ino = 0; /* 0: every network namespace */
/* A busy socket reports itself from its own send/recv this long after its last report (through
 * close_ring), so the sweep (a walk of each marked namespace, netns_pending.h) is only needed for
 * sockets that went quiet and can run far less often than once per interval. 0: the sweep does
 * all the reporting. */
const volatile __u64 report_ns = 0;
/* From /proc/config.gz (libbpf); 0 where the kernel's config cannot be read: ktime then. */
extern unsigned int CONFIG_HZ __kconfig __weak;

enum kscope_sock_flags {
	SF_CLOSED = 1,       /* the final record was made */
	SF_REPORTED = 2,     /* at least one record was made */
	SF_OWNER_KNOWN = 4,  /* tgid/comm/cgroup filled from process context */
};

struct sock_state {
	__u64 start_ns;
	__u64 syn_sent_ns;
	__u64 connect_latency_ns;
	__u64 cgroup_id;
	__u64 sweep_session; /* the sweep pass that last reported it (bpf_iter_meta.session_id) */
	__u64 total[KSCOPE_L4_COUNTERS];
	__u64 reported[KSCOPE_L4_COUNTERS]; /* total[] at the previous record */
	__u32 tgid;
	__u32 pid;
	__u32 last_drop_reason;
	__u8 role;
	__u8 connect_status;
	__u8 connect_errno;
	__u8 flags;
	__u8 comm[16];
	/* Last non-zero tuple: the kernel clears the local port while closing (before
	 * our final record for time-wait and unhashed sockets), so keep a copy. */
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 _pad;
	__u32 sweep_pending; /* its namespace is marked for the next sweep (netns_pending.h) */
	__u32 _pad2;
	__u64 report_at; /* report_ns: when its send/recv reports it next (0: not set yet) */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_states SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KSCOPE_CLOSE_RING_BYTES);
} close_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KSCOPE_CLOSE_OVERFLOW_ENTRIES);
	__type(key, __u64); /* socket cookie */
	__type(value, struct kscope_l4_record);
} close_overflow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KSCOPE_STATS);
	__type(key, __u32);
	__type(value, __u64);
} kscope_stats SEC(".maps");

/* Scratch for one record: too large for the 512-byte BPF stack alongside the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kscope_l4_record);
} scratch SEC(".maps");

NETNS_PENDING_MAPS(netns_pending, netns_walk_all);

/* Anchor the ABI struct in BTF even if only reached through the ring buffer. */
const struct kscope_l4_record *__anchor_l4_record __attribute__((unused));

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&kscope_stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline bool is_tracked_family(const struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;

	if (family != AF_INET && family != AF_INET6)
		return false;
	if (sk->sk_protocol != IPPROTO_TCP)
		return false;
	if (filter_netns_ino && sk->__sk_common.skc_net.net->ns.inum != filter_netns_ino)
		return false;
	return true;
}

static __always_inline void fill_owner(struct sock_state *st)
{
	__u64 id = bpf_get_current_pid_tgid();

	st->tgid = id >> 32;
	st->pid = (__u32)id;
	st->cgroup_id = bpf_get_current_cgroup_id();
	process_comm(st->comm);
	st->flags |= SF_OWNER_KNOWN;
}

/* The socket has news for the next sweep: its namespace is marked, once until the sweep has
 * seen it. Called after the change it announces; the sweep clears the flag before reading
 * the counters (both sides' atomic operations are full barriers), so a change is either in
 * that sweep's record or marks the namespace again. */
static __always_inline void touch(struct sock *sk, struct sock_state *st)
{
	if (st->sweep_pending || __sync_lock_test_and_set(&st->sweep_pending, 1))
		return;
	if (!netns_mark(&netns_pending, &netns_walk_all, sk))
		stat_inc(KSCOPE_STAT_NETNS_PENDING_FULL);
}

/* Role of a socket first seen mid-life: accepted sockets inherit the listener's
 * non-zero sk_max_ack_backlog, connected ones keep 0 (docs/kernel.md). */
static __always_inline __u8 infer_role(const struct sock *sk)
{
	if (sk->__sk_common.skc_state == TCP_LISTEN)
		return KSCOPE_ROLE_LISTENER;
	return sk->sk_max_ack_backlog ? KSCOPE_ROLE_SERVER : KSCOPE_ROLE_CLIENT;
}

/* Storage for a socket, created on first sight. */
static __always_inline struct sock_state *track(struct sock *sk)
{
	struct sock_state *st;

	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (st)
		return st;
	st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_inc(KSCOPE_STAT_STORAGE_FAILED);
		return 0;
	}
	stat_inc(KSCOPE_STAT_SOCKETS_TRACKED);
	st->start_ns = bpf_ktime_get_ns();
	st->role = infer_role(sk);
	touch(sk, st); /* never reported yet: the next sweep reports it */
	return st;
}

static __always_inline __u8 connect_status_of(int err)
{
	switch (err) {
	case 0:
		return KSCOPE_CONNECT_ABORTED;
	case ECONNREFUSED:
		return KSCOPE_CONNECT_REFUSED;
	case ETIMEDOUT:
		return KSCOPE_CONNECT_TIMEOUT;
	case ECONNRESET:
		return KSCOPE_CONNECT_RESET;
	case EHOSTUNREACH:
	case ENETUNREACH:
		return KSCOPE_CONNECT_UNREACHABLE;
	default:
		return KSCOPE_CONNECT_OTHER;
	}
}

/* Keep the tuple while the socket has one: the kernel clears ports and addresses
 * while closing, before the final record of a short or failed connection is made. */
static __always_inline void remember_tuple(struct sock_state *st, const struct sock *sk)
{
	__u8 saddr[16], daddr[16];
	__u16 sport, dport, family;

	read_tuple(saddr, daddr, &sport, &dport, &family, sk);
	if (!sport && !dport)
		return;
	__builtin_memcpy(st->saddr, saddr, 16);
	__builtin_memcpy(st->daddr, daddr, 16);
	st->sport = sport;
	st->dport = dport;
	st->family = family;
}

/* The kernel's own drop counter (sk_drops), plus the per-NUMA counters newer kernels
 * (6.18) add for busy sockets. */
static __always_inline __u32 socket_drops(const struct sock *sk)
{
	__u32 drops = sk->sk_drops.counter;

	if (bpf_core_field_exists(sk->sk_drop_counters)) {
		struct numa_drop_counters *ndc = BPF_CORE_READ(sk, sk_drop_counters);

		if (ndc)
			drops += BPF_CORE_READ(ndc, drops0.counter) + BPF_CORE_READ(ndc, drops1.counter);
	}
	return drops;
}

/* Fill a record from the socket and its state, taking the deltas since the last record.
 * Callers (iterator, close) may race on other CPUs: the exchange keeps the sum of
 * deltas equal to the total even then. */
static __always_inline void make_record(struct kscope_l4_record *rec, struct sock *sk,
					struct sock_state *st, __u8 reason)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	int i;

	rec->type = KSCOPE_REC_L4;
	rec->reason = reason;
	rec->role = st->role;
	rec->connect_status = st->connect_status;
	rec->connect_errno = st->connect_errno;
	rec->netns_ino = sk->__sk_common.skc_net.net->ns.inum;
	rec->sock_cookie = bpf_get_socket_cookie(sk);
	rec->cgroup_id = st->cgroup_id;
	rec->start_ns = st->start_ns;
	rec->ts_ns = bpf_ktime_get_ns();
	rec->connect_latency_ns = st->connect_latency_ns;
#pragma unroll
	for (i = 0; i < KSCOPE_L4_COUNTERS; i++) {
		__u64 now = st->total[i];
		__u64 prev = __sync_lock_test_and_set(&st->reported[i], now);

		if (now < prev) {
			/* another reporter already took a newer total: give it back */
			__sync_lock_test_and_set(&st->reported[i], prev);
			now = prev;
		}
		rec->total[i] = now;
		rec->delta[i] = now - prev;
	}
	read_tuple(rec->saddr, rec->daddr, &rec->sport, &rec->dport, &rec->family, sk);
	if ((rec->sport == 0 || (rec->dport == 0 && st->role != KSCOPE_ROLE_LISTENER)) && st->family) {
		__builtin_memcpy(rec->saddr, st->saddr, 16);
		__builtin_memcpy(rec->daddr, st->daddr, 16);
		rec->sport = st->sport;
		rec->dport = st->dport;
		rec->family = st->family;
	}
	rec->tgid = st->tgid;
	rec->pid = st->pid;
	if (tp) {
		rec->srtt_us = tp->srtt_us >> 3;
		rec->segs_out = tp->segs_out;
		rec->segs_in = tp->segs_in;
		rec->rttvar_us = tp->mdev_us >> 2;
	} else {
		rec->rttvar_us = 0;
		rec->srtt_us = 0;
		rec->segs_out = 0;
		rec->segs_in = 0;
	}
	rec->last_drop_reason = st->last_drop_reason;
	rec->ack_backlog = sk->sk_ack_backlog;
	rec->max_ack_backlog = sk->sk_max_ack_backlog;
	rec->sk_drops = socket_drops(sk);
	rec->tcp_state = sk->__sk_common.skc_state;
	__builtin_memcpy(rec->comm, st->comm, sizeof(rec->comm));
	st->flags |= SF_REPORTED;
}

static __always_inline void emit_final(struct sock *sk, struct sock_state *st)
{
	struct kscope_l4_record *rec;
	__u32 zero = 0;
	__u64 cookie;

	if (st->flags & SF_CLOSED)
		return;
	st->flags |= SF_CLOSED;
	rec = bpf_ringbuf_reserve(&close_ring, sizeof(*rec), 0);
	if (rec) {
		make_record(rec, sk, st, KSCOPE_L4_CLOSE);
		/* user space drains on a timer: no wakeup per record */
		bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
		return;
	}
	stat_inc(KSCOPE_STAT_CLOSE_RB_FULL);
	rec = bpf_map_lookup_elem(&scratch, &zero);
	if (!rec)
		return;
	make_record(rec, sk, st, KSCOPE_L4_CLOSE);
	cookie = rec->sock_cookie;
	if (bpf_map_update_elem(&close_overflow, &cookie, rec, BPF_NOEXIST))
		stat_inc(KSCOPE_STAT_CLOSE_LOST);
}

/* A periodic record from the socket's own call (report_ns). The ring (half) full: nothing is taken
 * (the record is made only once reserved), the counts wait for the next report or the sweep. */
static __always_inline void report(struct sock *sk, struct sock_state *st)
{
	struct kscope_l4_record *rec;

	/* half the ring stays for final records: a busy node's periodic ones, which can wait, must
	 * not crowd out the ones that cannot (those would go to the overflow map, then be lost) */
	if (bpf_ringbuf_query(&close_ring, BPF_RB_AVAIL_DATA) > bpf_ringbuf_query(&close_ring, BPF_RB_RING_SIZE) / 2) {
		stat_inc(KSCOPE_STAT_REPORT_RB_FULL);
		return;
	}
	rec = bpf_ringbuf_reserve(&close_ring, sizeof(*rec), 0);
	if (!rec) {
		stat_inc(KSCOPE_STAT_REPORT_RB_FULL);
		return;
	}
	make_record(rec, sk, st, KSCOPE_L4_PERIODIC);
	bpf_ringbuf_submit(rec, BPF_RB_NO_WAKEUP);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_set_state, struct sock *sk, int oldstate, int newstate)
{
	struct sock_state *st;

	if (!is_tracked_family(sk))
		return 0;

	switch (newstate) {
	case TCP_SYN_SENT:
		/* connect(): process context, the caller owns the socket */
		st = track(sk);
		if (!st)
			return 0;
		st->role = KSCOPE_ROLE_CLIENT;
		st->syn_sent_ns = bpf_ktime_get_ns();
		fill_owner(st);
		return 0;
	case TCP_LISTEN:
		st = track(sk);
		if (!st)
			return 0;
		st->role = KSCOPE_ROLE_LISTENER;
		fill_owner(st);
		remember_tuple(st, sk);
		return 0;
	case TCP_ESTABLISHED:
		st = track(sk);
		if (!st)
			return 0;
		if (oldstate == TCP_SYN_SENT) {
			st->role = KSCOPE_ROLE_CLIENT;
			st->connect_status = KSCOPE_CONNECT_OK;
			if (st->syn_sent_ns)
				st->connect_latency_ns = bpf_ktime_get_ns() - st->syn_sent_ns;
		} else if (oldstate == TCP_SYN_RECV) {
			/* softirq: the owner is filled by the first send/recv (accept()ing task) */
			st->role = KSCOPE_ROLE_SERVER;
		}
		remember_tuple(st, sk);
		return 0;
	case TCP_CLOSE:
		st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
		if (!st)
			return 0;
		/* last moment the tuple is intact (failed connects never had a record) */
		remember_tuple(st, sk);
		if (oldstate == TCP_SYN_SENT) {
			int err = sk->sk_err;

			st->connect_status = connect_status_of(err);
			st->connect_errno = err;
		}
		/* Not final yet: the application may still read queued data from a socket
		 * the kernel already closed (FIN received in FIN_WAIT2). tcp_destroy_sock is. */
		return 0;
	}
	return 0;
}

/* The socket's end for both the kernel and the application: the final record. */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(on_destroy_sock, struct sock *sk)
{
	struct sock_state *st;

	if (!is_tracked_family(sk))
		return 0;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (st)
		emit_final(sk, st);
	return 0;
}

static __always_inline void count_io(struct sock *sk, int ret, __u32 bytes_idx, __u32 calls_idx)
{
	struct sock_state *st;

	if (ret <= 0 || !is_tracked_family(sk))
		return;
	st = track(sk);
	if (!st)
		return;
	/* First call in process context names the owner: for accepted sockets this is
	 * the accept()ing task, for sockets older than the agent the current user. */
	if (!(st->flags & SF_OWNER_KNOWN)) {
		fill_owner(st);
		if (!st->family)
			remember_tuple(st, sk); /* a socket older than the agent */
	}
	__sync_fetch_and_add(&st->total[bytes_idx], ret);
	__sync_fetch_and_add(&st->total[calls_idx], 1);
	touch(sk, st);
	if (report_ns) {
		/* a tick's precision is plenty for a deadline, and jiffies cost a load (the coarse
		 * clock helper is refused to tracing programs) */
		__u64 now = CONFIG_HZ ? bpf_jiffies64() * (1000000000ULL / CONFIG_HZ) : bpf_ktime_get_ns();

		if (now >= st->report_at) {
			if (st->report_at)
				report(sk, st);
			st->report_at = now + report_ns;
		}
	}
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(on_send_length, struct sock *sk, int ret, int flags)
{
	count_io(sk, ret, KSCOPE_C_BYTES_SENT, KSCOPE_C_SENDS);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(on_recv_length, struct sock *sk, int ret, int flags)
{
	if (flags & MSG_PEEK)
		return 0;
	count_io(sk, ret, KSCOPE_C_BYTES_RECEIVED, KSCOPE_C_RECVS);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(on_retransmit, struct sock *sk, struct sk_buff *skb, int err)
{
	struct sock_state *st;

	if (err || !is_tracked_family(sk))
		return 0;
	st = track(sk);
	if (!st)
		return 0;
	if (sk->__sk_common.skc_state == TCP_SYN_SENT)
		__sync_fetch_and_add(&st->total[KSCOPE_C_SYN_RETRANSMITS], 1);
	else
		__sync_fetch_and_add(&st->total[KSCOPE_C_RETRANSMITS], 1);
	touch(sk, st);
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(on_send_reset, struct sock *sk, struct sk_buff *skb)
{
	struct sock_state *st = 0;

	/* sk is NULL for an RST to a closed port; bpf_sk_storage_get also refuses
	 * request and time-wait sockets, which are counted as "no socket" too. */
	if (sk && is_tracked_family(sk))
		st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st) {
		stat_inc(KSCOPE_STAT_RST_NO_SOCKET);
		return 0;
	}
	__sync_fetch_and_add(&st->total[KSCOPE_C_RESETS_SENT], 1);
	touch(sk, st);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(on_receive_reset, struct sock *sk)
{
	struct sock_state *st;

	if (!is_tracked_family(sk))
		return 0;
	st = track(sk);
	if (st) {
		__sync_fetch_and_add(&st->total[KSCOPE_C_RESETS_RECEIVED], 1);
		touch(sk, st);
	}
	return 0;
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(on_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason,
	     struct sock *rx_sk)
{
	struct sock_state *st = 0;
	struct sock *sk;

	sk = skb->sk;
	if (!sk)
		sk = rx_sk;
	if (!sk)
		return 0;
	if (!is_tracked_family(sk))
		return 0;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st) {
		stat_inc(KSCOPE_STAT_DROPS_NO_SOCKET);
		return 0;
	}
	__sync_fetch_and_add(&st->total[KSCOPE_C_DROPS], 1);
	st->last_drop_reason = reason;
	if (reason == SKB_DROP_REASON_TCP_LISTEN_OVERFLOW)
		__sync_fetch_and_add(&st->total[KSCOPE_C_LISTEN_OVERFLOWS], 1);
	touch(sk, st);
	return 0;
}

static __always_inline bool changed(const struct sock_state *st)
{
	int i;

	if (!(st->flags & SF_REPORTED))
		return true;
#pragma unroll
	for (i = 0; i < KSCOPE_L4_COUNTERS; i++)
		if (st->total[i] != st->reported[i])
			return true;
	return false;
}

/* The socket a TCP iterator shows, as a pointer the storage helpers accept (the context's is
 * trusted-or-null; after the cast it is a full TCP socket or NULL: request and time-wait
 * sockets have no storage). */
static __always_inline struct sock *iter_sock(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (!skc)
		return 0;
	return (struct sock *)bpf_skc_to_tcp_sock(skc);
}

/* The sweep: one periodic record per socket whose counters moved. Run by user space every
 * --sweep-interval in every network namespace marked since the last run (a TCP iterator shows the sockets of
 * the namespace it was created in; netns_pending.h): one read() loop each. This kernel
 * refuses map iterators (EPERM at load), and a socket reached through a task's file is an
 * untrusted pointer the storage helpers refuse, so the TCP iterator it is. The pass's session id in the socket's state makes a socket shown
 * twice (the iterator resuming a bucket) one record per pass. */
SEC("iter/tcp")
int sweep(struct bpf_iter__tcp *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	__u64 session = ctx->meta->session_id;
	struct kscope_l4_record *rec;
	struct sock_state *st;
	struct sock *sk = iter_sock(ctx);
	__u32 zero = 0;
	bool backlog;

	if (!sk)
		return 0;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (!st || (st->flags & SF_CLOSED) || st->sweep_session == session)
		return 0;
	/* seen by this sweep: what changes from now on marks the namespace again */
	__sync_lock_test_and_set(&st->sweep_pending, 0);
	/* a listener's accept queue is a gauge: report it while non-empty (and sweep again) */
	backlog = st->role == KSCOPE_ROLE_LISTENER && sk->sk_ack_backlog;
	if (backlog)
		touch(sk, st);
	if (!changed(st) && !backlog)
		return 0;
	if (seq->size - seq->count < sizeof(*rec)) {
		/* the next read() shows this socket again, in the same session */
		stat_inc(KSCOPE_STAT_ITER_RETRY);
		return KSCOPE_ITER_RETRY;
	}
	rec = bpf_map_lookup_elem(&scratch, &zero);
	if (!rec)
		return 0;
	make_record(rec, sk, st, KSCOPE_L4_PERIODIC);
	bpf_seq_write(seq, rec, sizeof(*rec));
	st->sweep_session = session;
	return 0;
}

/*
 * Sockets older than the agent, run once by user space at start, in two walks:
 *  1. seed_owners: every task's open files (any namespace; threads sharing a file table are
 *     visited once): the first task found holding each socket, keyed by its struct socket
 *     (only as a number: a socket reached this way cannot be given storage, see sweep);
 *  2. seed, in every network namespace: each TCP socket gets storage now, with its role,
 *     tuple and that owner, so listeners the agent never saw call listen() are reported, and
 *     existing connections have an owner before their next send/recv.
 * The first sweep reports each once (SF_REPORTED unset); counts start now.
 */
struct seed_owner {
	__u64 cgroup_id;
	__u32 tgid;
	__u32 pid;
	__u8 comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KSCOPE_SEED_OWNERS);
	__type(key, __u64); /* struct socket address */
	__type(value, struct seed_owner);
} seed_owners SEC(".maps");

SEC("iter/task_file")
int seed_owner(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct seed_owner owner = {};
	struct socket *sock;
	__u64 key;
	long err;

	if (!task || !file)
		return 0;
	sock = bpf_sock_from_file(file);
	/* only what the seed will look up: TCP sockets (plain loads through the untrusted pointer) */
	if (!sock || !sock->sk || !is_tracked_family(sock->sk))
		return 0;
	key = (__u64)sock;
	/* for a listener shared by forked workers: one of them (the first found) */
	owner.tgid = task->tgid;
	owner.pid = task->pid;
	owner.cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	bpf_probe_read_kernel_str(owner.comm, sizeof(owner.comm), task->group_leader->comm);
	err = bpf_map_update_elem(&seed_owners, &key, &owner, BPF_NOEXIST);
	if (err && err != -EEXIST)
		stat_inc(KSCOPE_STAT_SEED_OWNERS_FULL);
	return 0;
}

SEC("iter/tcp")
int seed(struct bpf_iter__tcp *ctx)
{
	struct sock *sk = iter_sock(ctx);
	struct seed_owner *owner;
	struct sock_state *st;
	__u64 key;

	/* TCP_CLOSE: created but never connected or listening, nothing to report yet */
	if (!sk || !is_tracked_family(sk) || sk->__sk_common.skc_state == TCP_CLOSE)
		return 0;
	st = track(sk);
	if (!st)
		return 0;
	key = (__u64)sk->sk_socket;
	if (!(st->flags & SF_OWNER_KNOWN) && key) {
		owner = bpf_map_lookup_elem(&seed_owners, &key);
		if (owner) {
			st->tgid = owner->tgid;
			st->pid = owner->pid;
			st->cgroup_id = owner->cgroup_id;
			__builtin_memcpy(st->comm, owner->comm, sizeof(st->comm));
			st->flags |= SF_OWNER_KNOWN;
		}
	}
	if (!st->family)
		remember_tuple(st, sk);
	return 0;
}

/* Keep the ABI enums in BTF (constants alone are not emitted): the ABI test reads them. */
enum kscope_record_type __anchor_record_type __attribute__((unused));
enum kscope_l4_reason __anchor_l4_reason __attribute__((unused));
enum kscope_l4_role __anchor_l4_role __attribute__((unused));
enum kscope_connect_status __anchor_connect_status __attribute__((unused));
enum kscope_l4_counter __anchor_l4_counter __attribute__((unused));
enum kscope_stat __anchor_stat __attribute__((unused));
