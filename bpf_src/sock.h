/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
#ifndef KSCOPE_SOCK_H
#define KSCOPE_SOCK_H

/* The socket's addresses; IPv4 as ::ffff:a.b.c.d so nothing downstream branches on family. */
static __always_inline void read_tuple(__u8 *saddr, __u8 *daddr, __u16 *sport, __u16 *dport,
				       __u16 *family, const struct sock *sk)
{
	const struct sock_common *c = &sk->__sk_common;

	*family = c->skc_family;
	*sport = c->skc_num;
	if (!*sport) /* unhashed while closing: inet_sport outlives skc_num */
		*sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	*dport = bpf_ntohs(c->skc_dport);
	if (*family == AF_INET6) {
		bpf_core_read(saddr, 16, &c->skc_v6_rcv_saddr);
		bpf_core_read(daddr, 16, &c->skc_v6_daddr);
		return;
	}
	__builtin_memset(saddr, 0, 16);
	__builtin_memset(daddr, 0, 16);
	saddr[10] = 0xff;
	saddr[11] = 0xff;
	daddr[10] = 0xff;
	daddr[11] = 0xff;
	*(__u32 *)&saddr[12] = c->skc_rcv_saddr;
	*(__u32 *)&daddr[12] = c->skc_daddr;
}

#endif
