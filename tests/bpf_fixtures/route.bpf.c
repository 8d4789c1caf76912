// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Test-only: the kernel's summary key (bpf_src/l7_route.h, the very code l7.bpf.c runs) on a
 * request line user space gives through BPF_PROG_TEST_RUN, to check it against route_template
 * over a corpus (tests/node_exporter/l7/test_route_corpus.py). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "abi/l7.h"
#include "l7_route.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The context user space passes in and reads back (ctx_in == ctx_out). */
struct route_args {
	__u8 line[KSCOPE_L7_SUMMARY_HEAD]; /* the request line, zero-padded */
	__u32 n;			   /* bytes of it captured */
	__u32 method;			   /* enum kscope_http_method */
	__u64 hash;			   /* out: l7_route_hash, 0: not summed */
};

struct route_line line; /* .bss: a map value, as the socket storage l7.bpf.c passes */

SEC("syscall")
int route_hash(struct route_args *args)
{
	__builtin_memcpy(&line, args->line, sizeof(line));
	args->hash = l7_route_hash(&line, args->n, args->method);
	return 0;
}
