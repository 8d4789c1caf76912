// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L7 capture fallback for kernels without the socket tracepoints (sock_send_length /
 * sock_recv_length, Linux 6.3): the same chunk records as l7.bpf.c (struct
 * kscope_l7_header + head bytes in `l7_ring`, counters in `l7_stats` at the same
 * indices, the same knobs), taken at syscall exit instead.
 *
 * What each construct needs (the object as a whole: Linux >= 5.8, BTF for CO-RE):
 *  - tp_btf/sys_exit (5.5): one raw tracepoint for every syscall's exit, handed the
 *    task's saved user registers (a BTF pointer: plain loads, no helper call, which
 *    matters for the syscall number read on every syscall) and the return value. At
 *    exit the registers still hold the arguments, so l7_user_buffer() finds the buffer
 *    exactly as l7.bpf.c does, and the return value is the byte count. Filtered first
 *    thing on the syscall number. Chosen over per-syscall classic tracepoints (sys_exit_read ...: fire only
 *    for those syscalls, but carry no arguments at exit, so they need bpf_task_pt_regs,
 *    5.15, and tracefs) for reach, not speed: most kernels the fallback is for are older
 *    than 5.15. Both cost the same within noise (bench/l7_syscalls.py, bench/RESULTS.md).
 *  - BPF_MAP_TYPE_RINGBUF (5.8) with BPF_RB_NO_WAKEUP: user space drains on a timer.
 *  - fd -> socket: task->files->fdt->fd[fd] (bounds-checked against max_fds) ->
 *    S_ISSOCK(inode) -> file->private_data (struct socket) -> sk, all CO-RE probe reads:
 *    `sk` is a scalar, so bpf_sk_storage_get (5.2, needs a socket pointer the verifier
 *    knows) and bpf_get_socket_cookie cannot take it.
 *  - Per-socket state therefore lives in a BPF_MAP_TYPE_LRU_HASH (4.10) keyed by the
 *    socket inode number, not the sock address: the slab hands a freed sock's address to
 *    the next socket at once, which would then inherit an "ignored" verdict and stream
 *    offsets; inode numbers are not reused while 32 bits last. A dead socket's entry
 *    ages out of the LRU. Evictions are silent (the kernel cannot count them): inserts
 *    are counted (SYS_STAT_SOCKETS_TRACKED), so user space knows at least
 *    inserts - max_entries were evicted; an evicted live socket starts over (offsets
 *    from 0, protocol inferred again). The size is resizable by the loader (`l7_sys_socks`).
 *  - The socket cookie (join key with L4) is read from sk->__sk_common.skc_cookie. The
 *    kernel assigns it lazily, on the first bpf_get_socket_cookie/SO_COOKIE/sock_diag,
 *    and the L4 probe asks only when it makes a record (close, interval): so
 *    tp_btf/inet_sock_set_state (capability l7.cookie; bpf_get_socket_cookie on a BTF
 *    socket in tracing programs needs 5.12) asks at connect and at accept. A socket whose
 *    cookie is still 0 when its first chunk is sent (UDP, TCP older than the probe, or
 *    kernels < 5.12) gets a stand-in for its whole life, KSCOPE_L7_SYS_STANDIN_COOKIE | its
 *    inode number, counted: 0 cannot be used, every such socket would share one parser
 *    in user space (pipeline key), and bit 63 never occurs in a kernel cookie (a counter).
 *
 * Not covered: TLS plaintext (the OpenSSL uprobes live in l7.bpf.c; a TLS connection is
 * ignored at its first record), 32-bit (ia32) syscalls, io_uring, splice. sendfile
 * moves bytes without a user buffer: a chunk flagged NO_BUFFER keeps the stream offsets
 * right. sendmmsg/recvmmsg: the first MAX_MMSG messages, the rest counted.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#define L7_IOV_WALK 0 /* first iovec only: see l7_proto.h */
#include "l7_proto.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_MMSG 8             /* messages of one sendmmsg/recvmmsg captured (glibc's resolver sends 2) */
#define L7_SYS_SOCKS 65536     /* default bound of per-socket state (SyscallL7Collector socket_entries) */
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define TS_COMPAT 0x0002       /* arch/x86/include/asm/thread_info.h: an ia32 syscall is running */
#define KSCOPE_L7_SYS_STANDIN_COOKIE (1ULL << 63) /* | socket inode: no kernel cookie */

/* Runtime knobs, set by user space before load (same names as l7.bpf.c). */
const volatile __u32 capture_bytes = 1024; /* head bytes captured per call, <= KSCOPE_L7_MAX_CAPTURE */
const volatile __u32 filter_netns_ino = 0; /* 0: every network namespace */
const volatile __u32 own_tgid = 0;       /* the agent's pid in its pid namespace: its sockets are not parsed */
const volatile __u64 own_pidns_dev = 0;
const volatile __u64 own_pidns_ino = 0;

/* Counters of the fallback alone (the shared ones are in l7_stats). Python mirror:
 * node_exporter/l7/syscalls.py L7SysStat, checked against this object's BTF. */
enum kscope_l7_sys_stat {
	KSCOPE_L7_SYS_STAT_SOCKETS_TRACKED = 0, /* per-socket state entries created (LRU inserts) */
	KSCOPE_L7_SYS_STAT_NO_COOKIE = 1,       /* sockets given a stand-in cookie (none assigned yet) */
	KSCOPE_L7_SYS_STAT_MMSG_SKIPPED = 2,    /* sendmmsg/recvmmsg messages past MAX_MMSG, not captured */
	KSCOPE_L7_SYS_STATS = 3,
};

struct l7_sys_sock {
	__u64 seq[2];  /* bytes seen per direction (index direction - 1) */
	__u64 cookie;  /* sock_cookie of its chunks, fixed at the first one; 0: none sent yet */
	__u8 protocol; /* enum kscope_l7_protocol */
	__u8 attempts; /* calls whose bytes did not tell the protocol */
	__u8 role;     /* enum kscope_l4_role */
	__u8 _pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, L7_SYS_SOCKS);
	__type(key, __u64); /* socket inode number */
	__type(value, struct l7_sys_sock);
} l7_sys_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KSCOPE_L7_SYS_STATS);
	__type(key, __u32);
	__type(value, __u64);
} l7_sys_stats SEC(".maps");

const struct kscope_l7_header *__anchor_l7_header __attribute__((unused));
enum kscope_l7_stat __anchor_l7_stat __attribute__((unused));
enum kscope_l7_sys_stat __anchor_l7_sys_stat __attribute__((unused));

static __always_inline void count(void *map, __u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, &idx);

	if (v)
		*v += n;
}

/* Which way a syscall moves bytes, 0 for the syscalls we do not capture. */
static __always_inline __u8 syscall_direction(__u64 nr)
{
	switch (nr) {
	case NR_write:
	case NR_writev:
	case NR_sendto:
	case NR_sendmsg:
	case NR_sendmmsg:
	case NR_sendfile:
		return KSCOPE_DIR_EGRESS;
	case NR_read:
	case NR_readv:
	case NR_recvfrom:
	case NR_recvmsg:
	case NR_recvmmsg:
		return KSCOPE_DIR_INGRESS;
	}
	return 0;
}

/* MSG_PEEK reads leave the bytes queued: the next read returns them again. */
static __always_inline bool is_peek(struct pt_regs *regs, __u64 nr)
{
	__u64 flags = 0;

	if (nr == NR_recvfrom || nr == NR_recvmmsg)
		flags = regs->r10; /* 4th argument */
	else if (nr == NR_recvmsg)
		flags = regs->dx; /* 3rd argument */
	return flags & MSG_PEEK;
}

/* The socket behind `fd` of the current task and its inode number, or 0. Unlocked
 * reads of the fd table (a concurrent close may race): probe reads never fault, and a
 * stale answer is one wrong chunk at worst. */
static __always_inline struct sock *fd_sock(struct task_struct *task, int fd, __u64 *ino)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *file = 0;
	struct inode *inode;
	struct socket *sock;
	__u16 mode;

	if (!fdt || fd < 0 || (__u32)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	inode = BPF_CORE_READ(file, f_inode);
	mode = BPF_CORE_READ(inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK) /* files, pipes, ttys, eventfds ...: not ours */
		return 0;
	*ino = BPF_CORE_READ(inode, i_ino);
	sock = BPF_CORE_READ(file, private_data); /* sockfs: sock_alloc_file() */
	return BPF_CORE_READ(sock, sk);
}

static __always_inline void fill_task(struct kscope_l7_header *h, struct task_struct *task)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);

	h->tgid = id >> 32;
	h->pid = (__u32)id;
	/* the process's name, not the thread's: a resolver thread of dig is "isc-net-0000" */
	bpf_core_read_str(h->comm, sizeof(h->comm), &leader->comm);
	h->ts_ns = bpf_ktime_get_ns();
}

/* One message of the call: `len` bytes moved; message `idx` of a sendmmsg/recvmmsg. */
static __always_inline void capture(struct task_struct *task, struct pt_regs *regs, struct sock *sk, __u64 ino,
				    struct l7_sys_sock *st, __u32 idx, __u64 len, __u8 dir, __u8 ip_proto)
{
	struct chunk *c;
	const void *buf, *uaddr;
	__u64 avail, seq;
	__u32 zero = 0, n;

	if (st->protocol == KSCOPE_PROTO_IGNORED) /* decided by an earlier message of this call */
		return;
	seq = st->seq[dir - 1];
	st->seq[dir - 1] = seq + len;

	c = bpf_map_lookup_elem(&l7_scratch, &zero);
	if (!c)
		return;
	__builtin_memset(&c->hdr, 0, sizeof(c->hdr));
	read_tuple_core(&c->hdr, sk);
	buf = l7_user_buffer(regs->orig_ax, regs->si, regs->r8, idx, &avail, &uaddr);
	/* Unconnected UDP: the peer from the call's sockaddr. At exit a receive's sockaddr is
	 * already filled in (l7.bpf.c's tracepoint fires before the kernel copies it out). */
	if (ip_proto == IPPROTO_UDP && !c->hdr.dport)
		read_peer(&c->hdr, uaddr);
	/* the knob even for HTTP/2: a larger bound here passed the verifier's 1M instructions */
	n = l7_read_head(c, buf, len, avail, capture_bytes);
	if (st->protocol == KSCOPE_PROTO_UNKNOWN) {
		__u8 role = 0, proto;

		if (l7_own_call(own_pidns_dev, own_pidns_ino, own_tgid)) {
			st->protocol = KSCOPE_PROTO_IGNORED;
			stat_inc(KSCOPE_L7_STAT_OWN);
			return;
		}
		proto = infer_chunk(c, n, dir, ip_proto, c->hdr.sport, c->hdr.dport, &role);
		if (proto == KSCOPE_PROTO_UNKNOWN && ip_proto == IPPROTO_TCP && is_tls_record(c->data, n)) {
			/* TLS: l7.bpf.c would switch to the uprobes' plaintext; without them there is
			 * nothing to parse, so stop at once instead of after MAX_INFER_ATTEMPTS calls */
			st->protocol = KSCOPE_PROTO_IGNORED;
			stat_inc(KSCOPE_L7_STAT_IGNORED);
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
	l7_chunk_call(c, buf != 0, n, len, seq, dir, st->protocol, st->role, ip_proto);
	if (!st->cookie) {
		/* fixed for the socket's life: a cookie assigned later must not split its stream */
		st->cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
		if (!st->cookie) {
			st->cookie = KSCOPE_L7_SYS_STANDIN_COOKIE | ino;
			count(&l7_sys_stats, KSCOPE_L7_SYS_STAT_NO_COOKIE, 1);
		}
	}
	c->hdr.netns_ino = sock_netns_ino(sk);
	c->hdr.sock_cookie = st->cookie;
	c->hdr.captured = n;
	fill_task(&c->hdr, task);
	/* never blocks the application: a full ring drops the chunk (the parser sees a gap) */
	if (bpf_ringbuf_output(&l7_ring, c, sizeof(c->hdr) + (n & READ_MASK), BPF_RB_NO_WAKEUP))
		stat_inc(KSCOPE_L7_STAT_RB_FULL);
	else
		stat_inc(KSCOPE_L7_STAT_CAPTURED);
}

static __always_inline struct l7_sys_sock *sock_state(__u64 ino)
{
	struct l7_sys_sock fresh = {}, *st;
	long err;

	st = bpf_map_lookup_elem(&l7_sys_socks, &ino);
	if (st)
		return st;
	/* BPF_NOEXIST: another CPU may have created it meanwhile, keep theirs */
	err = bpf_map_update_elem(&l7_sys_socks, &ino, &fresh, BPF_NOEXIST);
	if (!err)
		count(&l7_sys_stats, KSCOPE_L7_SYS_STAT_SOCKETS_TRACKED, 1);
	st = bpf_map_lookup_elem(&l7_sys_socks, &ino);
	if (!st) /* same counter as l7.bpf.c's failed socket storage */
		stat_inc(KSCOPE_L7_STAT_STORAGE_FAILED);
	return st;
}

/* `regs` is a BTF pointer (tracepoint argument, bpf_task_pt_regs): plain loads. */
static __always_inline void on_sys_exit(struct pt_regs *regs, long ret)
{
	__u64 nr = regs->orig_ax, ino = 0, first = 0;
	struct task_struct *task;
	struct l7_sys_sock *st;
	struct sock *sk;
	__u16 family;
	__u8 dir, ip_proto;

	dir = syscall_direction(nr);
	if (!dir || ret <= 0) /* every other syscall of every task leaves here */
		return;
	if (is_peek(regs, nr))
		return;
	task = (struct task_struct *)bpf_get_current_task();
	/* ia32 syscalls have other numbers and argument registers */
	if (bpf_core_field_exists(task->thread_info.status) && (BPF_CORE_READ(task, thread_info.status) & TS_COMPAT))
		return;
	sk = fd_sock(task, (int)regs->di, &ino);
	if (!sk)
		return;
	st = bpf_map_lookup_elem(&l7_sys_socks, &ino);
	if (st && st->protocol == KSCOPE_PROTO_IGNORED)
		return; /* the common case for traffic we do not parse: one walk and one lookup */
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return; /* unix, netlink ...: checked per call, they never take an LRU entry */
	/* sk_protocol: a plain u16 since 5.6 (a bitfield before) */
	ip_proto = BPF_CORE_READ(sk, sk_protocol);
	if (ip_proto != IPPROTO_TCP && ip_proto != IPPROTO_UDP)
		return;
	if (filter_netns_ino && sock_netns_ino(sk) != filter_netns_ino)
		return;
	if (!st)
		st = sock_state(ino);
	if (!st)
		return;
	if (nr != NR_sendmmsg && nr != NR_recvmmsg) {
		capture(task, regs, sk, ino, st, 0, ret, dir, ip_proto);
		return;
	}
	/* ret is the number of messages; each one's byte count is its mmsghdr.msg_len */
	first = regs->si;
	for (__u32 i = 0; i < MAX_MMSG && i < ret; i++) {
		__u32 len = 0;
		struct mmsghdr *m = (struct mmsghdr *)first + i;

		if (bpf_probe_read_user(&len, sizeof(len), &m->msg_len))
			break;
		if (len)
			capture(task, regs, sk, ino, st, i, len, dir, ip_proto);
	}
	if (ret > MAX_MMSG)
		count(&l7_sys_stats, KSCOPE_L7_SYS_STAT_MMSG_SKIPPED, ret - MAX_MMSG);
}

/* Have the kernel assign the cookie when a TCP connection is made (both ends), before its
 * first chunk, so chunks and the L4 records carry the same one. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(l7_sys_cookie, const struct sock *sk, int oldstate, int newstate)
{
	if (newstate == TCP_SYN_SENT || newstate == TCP_ESTABLISHED)
		bpf_get_socket_cookie((void *)sk);
	return 0;
}

#ifdef L7_SYS_PER_SYSCALL_TP
/*
 * The measured alternative (bench/l7_syscalls.py builds it with -DL7_SYS_PER_SYSCALL_TP):
 * one classic tracepoint per syscall, which fires only for those syscalls but carries no
 * arguments at exit, so the registers come from bpf_task_pt_regs (5.15). Needs tracefs.
 */
#define SYS_EXIT(name)                                                                                   \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                                       \
	int l7_exit_##name(struct trace_event_raw_sys_exit *ctx)                                         \
	{                                                                                                \
		on_sys_exit((struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf()), ctx->ret); \
		return 0;                                                                                \
	}
SYS_EXIT(read)
SYS_EXIT(write)
SYS_EXIT(readv)
SYS_EXIT(writev)
SYS_EXIT(sendto)
SYS_EXIT(recvfrom)
SYS_EXIT(sendmsg)
SYS_EXIT(recvmsg)
SYS_EXIT(sendmmsg)
SYS_EXIT(recvmmsg)
SYS_EXIT(sendfile64)
#else
SEC("tp_btf/sys_exit")
int BPF_PROG(l7_sys_exit, struct pt_regs *regs, long ret)
{
	on_sys_exit(regs, ret);
	return 0;
}
#endif
