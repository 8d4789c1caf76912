/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Constants vmlinux.h does not carry (macros are not in BTF), and CO-RE drift fixes. */
#ifndef KSCOPE_COMPAT_H
#define KSCOPE_COMPAT_H

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MSG_PEEK 2

#define ECONNRESET 104
#define ENETUNREACH 101
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define EHOSTUNREACH 113
#define EEXIST 17

/* The sweep iterator pre-checks room in the seq_file buffer: returning 1 from an
 * iter program makes the kernel show the same object again on the next read()
 * (kernel/bpf/bpf_iter.c, bpf_iter_run_prog), so a record is never half-written
 * and per-socket delta bookkeeping is never replayed. */
#define KSCOPE_ITER_RETRY 1

#endif
