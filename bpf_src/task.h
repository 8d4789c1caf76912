/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
#ifndef KSCOPE_TASK_H
#define KSCOPE_TASK_H

/* The process's name (its main thread's comm), not the current thread's: a resolver
 * thread of dig is "isc-net-0000", the process is "dig". */
static __always_inline void process_comm(__u8 *dst)
{
	struct task_struct *task = bpf_get_current_task_btf();

	bpf_probe_read_kernel_str(dst, 16, task->group_leader->comm);
}

#endif
