/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Map sizes in one place. User space may resize before load (node_exporter/bpf/loader.py). */
#ifndef KSCOPE_LIMITS_H
#define KSCOPE_LIMITS_H

/* Final (close) records: ring buffer bytes, then an overflow hash when the ring is full. */
#define KSCOPE_CLOSE_RING_BYTES (4 * 1024 * 1024)
#define KSCOPE_CLOSE_OVERFLOW_ENTRIES 16384

/* Start: owners of the sockets older than the agent (struct socket -> task), one walk's worth;
 * a socket past it learns its owner at its next send/recv (counted: seed_owners_full). */
#define KSCOPE_SEED_OWNERS 65536

/* Network namespaces with something for the next sweep (netns_pending.h); past it, the sweep
 * walks every namespace. Kubernetes nodes run ~110-250 pods, each in its own namespace. */
#define KSCOPE_NETNS_PENDING 4096

/* L7: chunks (one per send/recv of DNS, TLS plaintext, HTTP/1 after a fallback), and HTTP/1
 * exchanges (fixed 504-byte records, 512 with the ring header: 16 MiB = 32k exchanges). */
#define KSCOPE_L7_RING_BYTES (8 * 1024 * 1024)
#define KSCOPE_L7_XRING_BYTES (16 * 1024 * 1024)

/* In-process causality (l7_causal.h): threads with a server-request context (entries leave at the
 * thread's exit; past it a thread gets no context, counted), and flagged threads and processes
 * (event loops, multiplexers: live ones only; past it causality turns off, counted). */
#define KSCOPE_CAUSAL_THREADS 65536
#define KSCOPE_CAUSAL_FLAGGED 16384

#endif
