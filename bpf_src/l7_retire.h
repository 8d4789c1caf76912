// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: exchanges that no next request ends (closed sockets, idle keep-alive). Included once, by l7.bpf.c. */
#ifndef KSCOPE_L7_RETIRE_H
#define KSCOPE_L7_RETIRE_H

/* Whether the sweep sends the exchange now: answered and idle (final: the agent's last sweep,
 * capture stopped: any answered one), or unanswered too long. */
static __always_inline bool xchg_due(const struct l7_xchg *x, __u64 now, bool final)
{
	return (x->state == XS_ANSWERED && (final || now - x->last_ns >= idle_ns)) ||
	       (x->state == XS_REQUEST && now - x->start_ns >= unanswered_ns);
}

/* Emit the exchange if it is still due under the lock (closed, or xchg_due); the record slot is
 * taken before. */
static __always_inline void xchg_retire(struct sock *sk, struct l7_xchg *x, __u8 reason, __u64 now, bool final)
{
	struct kscope_l7_exchange *r = 0;
	struct kscope_l7_summary *ev = 0;
	bool filled = false, fold = x->state == XS_ANSWERED && wants_summary(x);
	bool fold_failed = false, evicted = false;

	/* a socket closing after its only request (Connection: close): a summary of one would cost
	 * user space more than the record, and sums nothing */
	if (reason == KSCOPE_EMIT_CLOSE && slots_empty(x))
		fold = false;

	if (!fold) {
		r = xrec_reserve(sk);
		if (!r)
			return;
	} else if (!slot_free(x)) {
		ev = summary_reserve(sk);
	}
	bpf_spin_lock(&x->lock);
	if (x->state == XS_REQUEST || x->state == XS_ANSWERED) {
		if (reason == KSCOPE_EMIT_CLOSE || xchg_due(x, now, final)) {
			if (r) {
				xrec_fill(r, x, reason);
				filled = true;
				x->state = reason == KSCOPE_EMIT_CLOSE ? XS_NONE : XS_EMITTED;
			} else if (x->state == XS_ANSWERED) {
				if (ev)
					evicted = slot_evict(ev, x);
				fold_failed = !slot_fold(x);
				x->state = reason == KSCOPE_EMIT_CLOSE ? XS_NONE : XS_EMITTED;
			}
		}
	}
	bpf_spin_unlock(&x->lock);
	xrec_send(r, filled);
	evict_send(ev, evicted);
	if (fold_failed)
		stat_inc(KSCOPE_L7_STAT_SUMMARY_LOST);
}

#endif /* KSCOPE_L7_RETIRE_H */
