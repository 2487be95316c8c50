/* offenders.h: who the resets, failed connects and port reuses are with, kept per peer for the top-N tables. */
#ifndef TCPSTATE_OFFENDERS_H
#define TCPSTATE_OFFENDERS_H

#include "tcpstate.h"
#include "tcpstate_logic.h"
#include "counters.h"
#include "flow.h"

/* Offenders take an insert per new peer: per-CPU LRU lists (each CPU evicts from its own share)
 * spare it the global LRU lock under a storm. */
#if TCPSTATE_MAX_OFFENDERS > 0
BPF_F_TABLE("lru_hash", struct tcpstate_offender_key, struct tcpstate_offender, offenders, TCPSTATE_MAX_OFFENDERS,
	    BPF_F_NO_COMMON_LRU);
#endif

/* One more for the peer of this flow in the offenders table (a shared LRU hash: atomic adds).
 * has_sk: the tracepoint named a socket; s: our record of it, if any. */
static __always_inline void count_offender(struct flow *f, __u8 kind, int has_sk, struct tcpstate_sock *s, __u64 now)
{
#if TCPSTATE_MAX_OFFENDERS > 0
	__u8 keep = tcpstate_offender_keep(kind, has_sk, s != NULL, s ? s->flags : 0, s ? s->state : 0);
	struct tcpstate_offender_key k = {};
	__builtin_memcpy(k.raddr, f->daddr, 16);
	k.family = f->family;
	k.rport = (keep & TCPSTATE_KEEP_REMOTE) ? f->dport : 0;
	k.lport = (keep & TCPSTATE_KEEP_LOCAL) ? f->sport : 0;
	k.kind = kind;
	struct tcpstate_offender *o = offenders.lookup(&k);
	if (!o) {
		struct tcpstate_offender fresh = {};
		fresh.first_ns = now;
		if (s && s->pid) {
			fresh.pid = s->pid;
			__builtin_memcpy(fresh.comm, s->comm, TCPSTATE_COMM_LEN);
		}
		offenders.insert(&k, &fresh);  /* fails only if another CPU inserted it first */
		o = offenders.lookup(&k);
		if (!o)
			return;
	} else if (now > o->last_ns + setting(TCPSTATE_SET_OFFENDER_IDLE_NS)) {
		/* A new run after a quiet spell: an old storm's total must not outrank today's. */
		o->count = 0;
		o->first_ns = now;
	}
	__sync_fetch_and_add(&o->count, 1);
	o->last_ns = now;
#endif
}

#endif /* TCPSTATE_OFFENDERS_H */
