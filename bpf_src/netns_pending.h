/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which network namespaces the next sweep has to walk.
 *
 * A sweep (L4's and L7's, each every --sweep-interval) walks namespaces one at a time: a TCP
 * iterator per namespace, and each walk goes through the whole established hash table, which
 * every namespace shares unless net.ipv4.tcp_child_ehash_entries is set: milliseconds per walk,
 * whatever the namespace holds, so walking every namespace at every sweep costs a node with
 * many idle pods a large share of a core (docs/architecture.md). So a socket that gets something for
 * the next sweep marks its namespace here, once until a sweep has seen it (a flag in its own
 * state), and user space takes the marks (lookup-and-delete, before the sweep) and walks only
 * those. The map full: a flag tells user space to walk every namespace instead (and is counted).
 */
#ifndef KSCOPE_NETNS_PENDING_H
#define KSCOPE_NETNS_PENDING_H

#include "limits.h"

#ifndef EEXIST
#define EEXIST 17
#endif

#define NETNS_PENDING_MAPS(pending, walk_all)                                                              \
	struct {                                                                                           \
		__uint(type, BPF_MAP_TYPE_HASH);                                                           \
		__uint(max_entries, KSCOPE_NETNS_PENDING);                                                 \
		__type(key, __u32);   /* the namespace's inode number (what stat() of ns/net says) */     \
		__type(value, __u32); /* the same, so a drain of the values lists them */                 \
	} pending SEC(".maps");                                                                            \
	struct {                                                                                           \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                                          \
		__uint(max_entries, 1);                                                                    \
		__type(key, __u32);                                                                        \
		__type(value, __u32);                                                                      \
	} walk_all SEC(".maps")

/* Mark sk's namespace for the next sweep. false: the map is full, every namespace will be walked. */
static __always_inline bool netns_mark(void *pending, void *walk_all, const struct sock *sk)
{
	__u32 ino = sk->__sk_common.skc_net.net->ns.inum, zero = 0, *all;
	long err;

	if (bpf_map_lookup_elem(pending, &ino))
		return true; /* already marked (an update would replace the element: dearer) */
	err = bpf_map_update_elem(pending, &ino, &ino, BPF_NOEXIST);
	if (!err || err == -EEXIST)
		return true;
	all = bpf_map_lookup_elem(walk_all, &zero);
	if (all)
		*all = 1;
	return false;
}

#endif
