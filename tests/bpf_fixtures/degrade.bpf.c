// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test-only object for the loader: one program per attach kind we use, plus hooks
 * this kernel lacks or refuses, to check that each disables only its capability. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile __u32 knob_increment = 1;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 5);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

static __always_inline void hit(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&hits, &idx);

	if (v)
		__sync_fetch_and_add(v, knob_increment);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ok_prog, struct sock *sk, int ret, int flags)
{
	hit(0);
	return 0;
}

SEC("sockops")
int sockops_prog(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		hit(1);
	return 1;
}

SEC("uprobe")
int BPF_KPROBE(uprobe_prog)
{
	hit(2);
	return 0;
}

/* An iterator without a map (attach_iter): one hit per task it visits. */
SEC("iter/task")
int task_iter_prog(struct bpf_iter__task *ctx)
{
	if (ctx->task)
		hit(4);
	return 0;
}

/* No such iterator target: the loader must see that before load too. */
SEC("iter/kscope_no_such_iterator")
int missing_iter_prog(void *ctx)
{
	hit(3);
	return 0;
}

/* No such tracepoint anywhere: the loader must see that before load. */
SEC("tp_btf/kscope_no_such_tracepoint")
int BPF_PROG(missing_prog)
{
	hit(3);
	return 0;
}

/* fentry does not load on our kernels (EPERM, docs/kernel.md): the load fails and
 * the loader must disable just this capability and retry. */
SEC("fentry/tcp_sendmsg")
int BPF_PROG(fentry_prog, struct sock *sk)
{
	hit(3);
	return 0;
}
