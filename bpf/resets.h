/* resets.h: resets sent and received, by direction, the state they hit and their reason. */
#ifndef TCPSTATE_RESETS_H
#define TCPSTATE_RESETS_H

#include "tcpstate.h"
#include "tcpstate_logic.h"
#include "counters.h"
#include "flow.h"
#include "offenders.h"

static __always_inline void count_reset(__u32 dir, __u8 state, __u8 reason)
{
	COUNT(resets, (dir * TCPSTATE_NSTATES + state) * TCPSTATE_NREASONS + reason);
}

/* What an on-path device rejecting requests looks like: a reset right after the handshake,
 * counted once per connection. */
static __always_inline void count_early_reset(struct flow *f, struct tcpstate_sock *s, __u32 dir, __u64 now)
{
	if (s && tcpstate_early_reset(s->est_ts_ns, now, setting(TCPSTATE_SET_EARLY_RESET_NS), s->flags)) {
		s->flags |= TCPSTATE_SOCK_EARLY_RESET;
		COUNT(resets_after_hs, dir * TCPSTATE_NROLES + tcpstate_sock_role(s->flags));
		count_offender(f, TCPSTATE_OFF_EARLY_RESET, 1, s, now);
	}
}

#endif /* TCPSTATE_RESETS_H */
