// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The floor of the L7 capture design, for bench/overhead.py --floor (not shipped): what any probe
 * built like bpf_src/l7.bpf.c pays per socket call before it does any work of its own. Same hooks
 * (tp_btf sock_send_length / sock_recv_length), same socket-local storage lookup, the user buffer
 * found the same way (the task's saved syscall registers, l7_user_buffer) and 16 bytes of it read;
 * nothing parsed, nothing sent. docs/kernel.md has this design alone at 0.90 of nginx's
 * throughput; the bench measures it beside the L4 probe, as the agent runs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "l7_proto.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct floor_sock {
	__u64 bytes;
	__u64 read_failed;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct floor_sock);
} floor_socks SEC(".maps");

static __always_inline void floor_io(struct sock *sk, int ret)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	struct floor_sock *st;
	const void *buf, *uaddr;
	__u64 avail;
	__u8 head[16];
	__u16 family = sk->__sk_common.skc_family;

	if (ret <= 0 || (family != AF_INET && family != AF_INET6))
		return;
	st = bpf_sk_storage_get(&floor_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	st->bytes += ret;
	buf = l7_user_buffer(regs->orig_ax, regs->si, regs->r8, 0, &avail, &uaddr);
	if (!buf || bpf_probe_read_user(head, sizeof(head), buf))
		st->read_failed++;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(floor_send, struct sock *sk, int ret, int flags)
{
	floor_io(sk, ret);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(floor_recv, struct sock *sk, int ret, int flags)
{
	if (!(flags & MSG_PEEK))
		floor_io(sk, ret);
	return 0;
}
