/* tcpstate_logic.h: the decisions the BPF program makes, as pure functions, so unit tests can run them in user space. */
#ifndef TCPSTATE_LOGIC_H
#define TCPSTATE_LOGIC_H

#include "tcpstate.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* The kernel never reports TIME_WAIT as a new state: the full socket goes
 * FIN_WAIT2->CLOSE or CLOSING->CLOSE and a timewait mini-socket takes over.
 * Such a close that no reset caused is counted as entering TIME_WAIT. */
static __always_inline __u8 tcpstate_counted_newstate(__u8 oldstate, __u8 newstate, __u8 sock_flags)
{
	if (newstate == TCPSTATE_TCP_CLOSE && !(sock_flags & TCPSTATE_SOCK_RESET_SEEN) &&
	    (oldstate == TCPSTATE_TCP_FIN_WAIT2 || oldstate == TCPSTATE_TCP_CLOSING))
		return TCPSTATE_TCP_TIME_WAIT;
	return newstate;
}

/* Clamp a kernel state number into the table; anything unknown folds into UNKNOWN. */
static __always_inline __u8 tcpstate_clamp_state(int state)
{
	if (state <= 0 || state >= TCPSTATE_STATE_UNKNOWN)
		return TCPSTATE_STATE_UNKNOWN;
	return (__u8)state;
}

static __always_inline __u8 tcpstate_clamp_reason(__u32 reason)
{
	if (reason >= TCPSTATE_REASON_UNKNOWN)
		return TCPSTATE_REASON_UNKNOWN;
	return (__u8)reason;
}

/* The state a socket was in when a reset hit it.
 * has_sk: the tracepoint named a socket; tp_state: its state per the tracepoint
 * (-1 if the layout has none); tracked: we remember the socket (cur, prev valid).
 * On an abort the kernel moves the socket to CLOSE before sending the reset, so a
 * reset sent "in CLOSE" by a socket we saw close is attributed to the state it left. */
static __always_inline __u8 tcpstate_reset_state(int has_sk, int tp_state, int tracked, __u8 cur, __u8 prev)
{
	if (!has_sk)
		return TCPSTATE_STATE_NONE;
	if (tp_state < 0) {
		if (!tracked)
			return TCPSTATE_STATE_UNKNOWN;
		tp_state = cur;
	}
	if (tp_state == TCPSTATE_TCP_CLOSE && tracked && cur == TCPSTATE_TCP_CLOSE && prev != 0)
		return tcpstate_clamp_state(prev);
	return tcpstate_clamp_state(tp_state);
}

/* A failed connect (SYN_SENT->CLOSE) classified by the socket error reported for it. */
static __always_inline __u8 tcpstate_failure_class(int err)
{
	switch (err) {
	case 111: /* ECONNREFUSED */
		return TCPSTATE_FAIL_REFUSED;
	case 110: /* ETIMEDOUT */
		return TCPSTATE_FAIL_TIMEOUT;
	case 104: /* ECONNRESET */
		return TCPSTATE_FAIL_RESET;
	default:
		return TCPSTATE_FAIL_OTHER;
	}
}

/* Index of the first bucket whose upper bound is >= us; NBOUNDS means +Inf. */
static __always_inline __u32 tcpstate_hist_bucket(__u64 us)
{
	const __u64 bounds[TCPSTATE_HIST_NBOUNDS] = TCPSTATE_HIST_BOUNDS_US;
	__u32 i;
#pragma unroll
	for (i = 0; i < TCPSTATE_HIST_NBOUNDS; i++) {
		if (us <= bounds[i])
			return i;
	}
	return TCPSTATE_HIST_NBOUNDS;
}

#endif /* TCPSTATE_LOGIC_H */
