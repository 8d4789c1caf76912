// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * L7: the heads of application messages, only for connections we parse.
 *
 * The socket tracepoints (sock_send_length / sock_recv_length) fire only for socket
 * I/O and hand over the socket; the user buffer is found through the task's saved
 * syscall registers (orig_ax = syscall number, si = buffer or iovec/msghdr): on our
 * kernel the cheapest capture, well ahead of syscall enter/exit tracepoints with an fd walk
 * (docs/kernel.md). The protocol is decided in the
 * kernel from a connection's first bytes and kept in socket-local storage: sockets we
 * do not parse cost one storage lookup per call and never reach the ring buffer.
 * OpenSSL plaintext comes from uprobes on SSL_read/SSL_write(_ex); the ciphertext
 * of those sockets is not captured.
 *
 * Plain-text HTTP/1 over TCP does not send chunks: request and response are paired here
 * (per-socket exchange state, l7_http1.h) and one fixed-size record per
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

/* One concern per header, in dependency order; this file keeps the entry points. */
#include "l7_state.h"
#include "l7_http1_record.h"
#include "l7_summary.h"
#include "l7_causal.h"
#include "l7_http1.h"
#include "l7_h2.h"
#include "l7_capture.h"
#include "l7_retire.h"

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

/* sendmmsg/recvmmsg start: which message each of the tracepoints above sees (mmsg_pos).
 * Classic syscall tracepoints fire only for their syscall: other calls pay nothing. */
SEC("tracepoint/syscalls/sys_enter_sendmmsg")
int l7_sendmmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	mmsg_enter(ctx->args[1], ctx->args[2]); /* (fd, msgvec, vlen, flags) */
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_recvmmsg")
int l7_recvmmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	mmsg_enter(ctx->args[1], ctx->args[2]);
	return 0;
}

/* ---- OpenSSL uprobes (attached per libssl file by user space) -------------------------- */

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

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(l7_destroy, struct sock *sk)
{
	struct l7_xchg *x = bpf_sk_storage_get(&l7_xchg, sk, 0, 0);

	if (!x)
		return 0;
	if (x->role == KSCOPE_ROLE_SERVER && x->state == XS_REQUEST)
		causal_server_abandon(x->start_ns, x->pid); /* a peek: at worst a context stays open */
	if (x->state == XS_REQUEST || x->state == XS_ANSWERED)
		xchg_retire(sk, x, KSCOPE_EMIT_CLOSE, 0, false);
	slots_flush(sk, x, KSCOPE_EMIT_CLOSE, 0, true);
	return 0;
}

/* ---- in-process causality: event loops refused, a task's entries gone with it (l7_causal.h) ----
 * Classic syscall tracepoints fire only for their syscall; on the exit, so a thread already
 * waiting when we attached is flagged before it handles what woke it. */

SEC("tracepoint/syscalls/sys_exit_epoll_wait")
int causal_epoll_wait(void *ctx)
{
	return causal_flag_thread();
}

SEC("tracepoint/syscalls/sys_exit_epoll_pwait")
int causal_epoll_pwait(void *ctx)
{
	return causal_flag_thread();
}

SEC("tracepoint/syscalls/sys_exit_epoll_pwait2")
int causal_epoll_pwait2(void *ctx)
{
	return causal_flag_thread();
}

/* io_uring loops wait in io_uring_enter instead (a kernel without io_uring has no such loop, and
 * no such tracepoint: its capability alone is then missing) */
SEC("tracepoint/syscalls/sys_exit_io_uring_enter")
int causal_io_uring_enter(void *ctx)
{
	return causal_flag_thread();
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(causal_exit, struct task_struct *p)
{
	if (causal)
		causal_task_exit(p);
	return 0;
}

/*
 * The sweep: user space runs it every --sweep-interval in every network namespace marked since
 * (a TCP iterator shows the sockets of the namespace it was created in; this kernel refuses map
 * iterators, see l4.bpf.c's sweep; netns_pending.h); sockets without exchange state are
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
