/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Map sizes in one place. User space may resize before load (node_exporter/bpf/loader.py). */
#ifndef KSCOPE_LIMITS_H
#define KSCOPE_LIMITS_H

/* Final (close) records: ring buffer bytes, then an overflow hash when the ring is full. */
#define KSCOPE_CLOSE_RING_BYTES (4 * 1024 * 1024)
#define KSCOPE_CLOSE_OVERFLOW_ENTRIES 16384

#endif
