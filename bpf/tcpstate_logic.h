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

/* The end of a connection that a new SYN on the same 4-tuple would reuse, as Wireshark sees it
 * (a conversation that saw a FIN or a RST, or whose SYNs went unanswered): any close of a
 * connection or connect attempt, failed connects included; not a listener's. The caller leaves
 * out a failed connect that sent no SYN (EADDRNOTAVAIL): on the wire there was nothing. */
static __always_inline int tcpstate_records_close(__u8 oldstate, __u8 newstate)
{
	return newstate == TCPSTATE_TCP_CLOSE && oldstate != TCPSTATE_TCP_LISTEN && oldstate != TCPSTATE_TCP_CLOSE;
}

/* A segment that opens a connection (SYN without ACK): what Wireshark's reused-ports check looks
 * at. A retransmitted SYN looks the same here (Wireshark tells it by its unchanged ISN). */
static __always_inline int tcpstate_new_syn(__u8 tcp_flags)
{
	return (tcp_flags & (TCPSTATE_TH_SYN | TCPSTATE_TH_ACK | TCPSTATE_TH_RST)) == TCPSTATE_TH_SYN;
}

/* When a new connection's SYN went out, for the reuse window: a client's first SYN left when the
 * socket entered SYN_SENT (syn_ts_ns, 0 if unknown), however long the handshake then took; an
 * accepted connection's is taken as now, the end of its handshake. */
static __always_inline __u64 tcpstate_syn_time(__u64 syn_ts_ns, __u64 now)
{
	return syn_ts_ns ? syn_ts_ns : now;
}

/* An IPv6 address that carries an IPv4 one (::ffff:a.b.c.d). */
static __always_inline int tcpstate_v4_mapped(const __u8 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 &&
	       a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* The family of a tracepoint's addresses where the layout has no family field (5.10's
 * tcp_receive_reset, tcp_destroy_sock, the oldest tcp_send_reset): the kernel stores an IPv4
 * socket's addresses v4-mapped in the v6 fields. Both mapped: IPv4, moved to the first 4 bytes. */
static __always_inline __u16 tcpstate_unmap(__u8 *saddr, __u8 *daddr)
{
	if (!tcpstate_v4_mapped(saddr) || !tcpstate_v4_mapped(daddr))
		return 10; /* AF_INET6 */
	__builtin_memcpy(saddr, saddr + 12, 4);
	__builtin_memcpy(daddr, daddr + 12, 4);
	__builtin_memset(saddr + 4, 0, 12);
	__builtin_memset(daddr + 4, 0, 12);
	return 2; /* AF_INET */
}

/* The first transition out of SYN_SENT (client) or SYN_RECV (server) is where a new connection's
 * 4-tuple is complete: at LISTEN->SYN_RECV the kernel has not yet set the child's peer address.
 * Returns the TCPSTATE_ROLE_* of the socket, or -1 for any other transition. */
static __always_inline int tcpstate_opening_role(__u8 oldstate)
{
	if (oldstate == TCPSTATE_TCP_SYN_SENT)
		return TCPSTATE_ROLE_CLIENT;
	if (oldstate == TCPSTATE_TCP_SYN_RECV)
		return TCPSTATE_ROLE_SERVER;
	return -1;
}

/* A hash of a 4-tuple given as 5 words (addresses, then family and ports): the low 32 bits pick
 * the recent_closes set, the high 32 bits are the tag kept in it. */
static __always_inline __u64 tcpstate_flow_hash(const __u64 *w)
{
	__u64 h = 0x9E3779B97F4A7C15ULL;
	int i;
#pragma unroll
	for (i = 0; i < 5; i++) {
		h ^= w[i];
		h *= 0xBF58476D1CE4E5B9ULL;
		h ^= h >> 31;
	}
	return h;
}

/* A close time in recent_closes ticks; never 0, which marks an empty slot. */
static __always_inline __u32 tcpstate_close_tick(__u64 now_ns)
{
	__u32 t = (__u32)(now_ns >> TCPSTATE_CLOSE_TICK_SHIFT);
	return t ? t : 1;
}

/* A reuse window in ticks, rounded up (0: off). */
static __always_inline __u32 tcpstate_close_window(__u64 window_ns)
{
	return (__u32)((window_ns + (1ULL << TCPSTATE_CLOSE_TICK_SHIFT) - 1) >> TCPSTATE_CLOSE_TICK_SHIFT);
}

/* Remember a close: over the slot of the same 4-tuple if it has one (as a hash update would),
 * else an empty slot, else the oldest close of the set. */
static __always_inline void tcpstate_close_put(struct tcpstate_close_set *set, __u32 tag, __u32 tick)
{
	__u64 best = 0;
	__u32 victim = 0, i;
#pragma unroll
	for (i = 0; i < TCPSTATE_CLOSE_WAYS; i++) {
		__u64 v = set->slot[i];
		__u32 stamp = (__u32)v;
		/* Ages wrap with the 32-bit tick (52 days), far beyond any reuse window. */
		__u64 score = !stamp ? (1ULL << 32) : (__u32)(v >> 32) == tag ? (1ULL << 33) : (__u32)(tick - stamp);
		if (score > best) {
			best = score;
			victim = i;
		}
	}
	set->slot[victim & (TCPSTATE_CLOSE_WAYS - 1)] = ((__u64)tag << 32) | tick;
}

/* A new connection on a 4-tuple: 1 if it closed at most window ticks ago (the slot is then
 * emptied: one close, one reuse), 0 otherwise. A stamp from the future is no reuse. */
static __always_inline int tcpstate_close_take(struct tcpstate_close_set *set, __u32 tag, __u32 tick, __u32 window)
{
	__u32 i;
	if (!window)
		return 0;
#pragma unroll
	for (i = 0; i < TCPSTATE_CLOSE_WAYS; i++) {
		__u64 v = set->slot[i];
		__u32 stamp = (__u32)v;
		if (stamp && (__u32)(v >> 32) == tag && (__u32)(tick - stamp) <= window) {
			set->slot[i] = 0;
			return 1;
		}
	}
	return 0;
}

static __always_inline __u32 tcpstate_sock_role(__u8 sock_flags)
{
	return (sock_flags & TCPSTATE_SOCK_PASSIVE) ? TCPSTATE_ROLE_SERVER : TCPSTATE_ROLE_CLIENT;
}

/* A reset within within_ns (0: off) of the socket becoming ESTABLISHED, once per connection. */
static __always_inline int tcpstate_early_reset(__u64 est_ns, __u64 now, __u64 within_ns, __u8 sock_flags)
{
	return within_ns != 0 && est_ns != 0 && !(sock_flags & TCPSTATE_SOCK_EARLY_RESET) && now >= est_ns &&
	       now - est_ns <= within_ns;
}

#define TCPSTATE_KEEP_LOCAL 1
#define TCPSTATE_KEEP_REMOTE 2

/* Which ports an offender entry keeps. The connecting end's port is ephemeral and would make
 * every connection its own entry: a reset for no socket, or on an accepted connection or a
 * listener, keeps our (service) port; one on a connect()ed socket keeps the peer's. An untracked
 * socket cannot tell, and port reuse is about the reused port: both are kept. */
static __always_inline __u8 tcpstate_offender_keep(__u8 kind, int has_sk, int tracked, __u8 sock_flags,
						    __u8 sock_state)
{
	if (kind == TCPSTATE_OFF_PORT_REUSE)
		return TCPSTATE_KEEP_LOCAL | TCPSTATE_KEEP_REMOTE;
	if (kind == TCPSTATE_OFF_CONNECT_FAIL)
		return TCPSTATE_KEEP_REMOTE;
	if (!has_sk)
		return TCPSTATE_KEEP_LOCAL;
	if (!tracked)
		return TCPSTATE_KEEP_LOCAL | TCPSTATE_KEEP_REMOTE;
	if ((sock_flags & TCPSTATE_SOCK_PASSIVE) || sock_state == TCPSTATE_TCP_LISTEN)
		return TCPSTATE_KEEP_LOCAL;
	return TCPSTATE_KEEP_REMOTE;
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
