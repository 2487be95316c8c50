/* socks.h: what the program remembers of each socket between its transitions (the socks table), and a close that waits for its cause. */
#ifndef TCPSTATE_SOCKS_H
#define TCPSTATE_SOCKS_H

#include "tcpstate.h"
#include "counters.h"
#include "flow.h"
#include "events.h"

BPF_TABLE("lru_hash", __u64, struct tcpstate_sock, socks, TCPSTATE_MAX_SOCKS);

/* A hash-table lookup costs more than everything else a transition does. Where the kernel's BTF
 * lets a reset read the socket's state from the socket, the table is needed only where a count
 * uses the socket's record: where it starts (SYN_SENT, SYN_RECV, LISTEN), ESTABLISHED (the
 * handshake) and CLOSE (the lifetime, the close's cause). The watch stream reports the time spent
 * in every state, so it still tracks them all. */
#if defined(TCPSTATE_SKC_STATE_AT) && !defined(TCPSTATE_EMIT_EVENTS)
#define TCPSTATE_TRACK_FEW 1
#endif

static __always_inline int needs_socket_record(__u8 newstate)
{
#ifdef TCPSTATE_TRACK_FEW
	return newstate == TCPSTATE_TCP_SYN_SENT || newstate == TCPSTATE_TCP_SYN_RECV ||
	       newstate == TCPSTATE_TCP_LISTEN || newstate == TCPSTATE_TCP_ESTABLISHED ||
	       newstate == TCPSTATE_TCP_CLOSE;
#else
	return 1;
#endif
}

/* The socket's state now: read from the socket where BTF gives the offset, else the one we last
 * saw it enter; -1 when neither is known (a socket we do not track). */
static __always_inline int socket_state_now(__u64 skaddr, struct tcpstate_sock *s)
{
#ifdef TCPSTATE_SKC_STATE_AT
	__u8 state = 0;
	if (skaddr && bpf_probe_read_kernel(&state, sizeof(state), (void *)(skaddr + TCPSTATE_SKC_STATE_AT)) == 0)
		return state;
#endif
	return s ? s->state : -1;
}

/* Our record of the socket; a new one where a connection or listener starts (the only
 * transitions whose start we see whole), none for sockets already open when we attached. */
static __always_inline struct tcpstate_sock *track_socket(__u64 skaddr, __u8 oldstate, __u8 newstate, __u64 now)
{
	struct tcpstate_sock *s = socks.lookup(&skaddr);
	if (!s && (newstate == TCPSTATE_TCP_SYN_SENT || newstate == TCPSTATE_TCP_SYN_RECV ||
		   newstate == TCPSTATE_TCP_LISTEN)) {
		struct tcpstate_sock fresh = {};
		fresh.state_ts_ns = now;
		fresh.state = oldstate;
		/* An LRU map makes room by evicting; user space derives the evictions from these
		 * counts and the entries it finds (probes.socket_table). */
		if (socks.update(&skaddr, &fresh) == 0)
			COUNT(stats, TCPSTATE_STAT_SOCK_INSERTED);
		s = socks.lookup(&skaddr);
	} else if (!s) {
		COUNT(stats, TCPSTATE_STAT_SOCK_UNTRACKED);
	}
	return s;
}

/* Whether FIN_WAIT2/CLOSING->CLOSE, counted as TIME_WAIT, must wait. An abort sets CLOSE before
 * the reset goes out, and the reset's tracepoint fires only after the packet was sent (on
 * loopback, after the peer processed it): TIME_WAIT or CLOSE is decided when this socket's reset
 * or destruction shows up. Untracked sockets cannot wait and count as TIME_WAIT now. */
static __always_inline int close_must_wait(struct tcpstate_sock *s, __u8 newstate, __u8 counted)
{
#ifdef TCPSTATE_HAVE_TCP_DESTROY_SOCK
	return s && counted == TCPSTATE_TCP_TIME_WAIT && newstate == TCPSTATE_TCP_CLOSE;
#else
	return 0;  /* nothing would end the wait */
#endif
}

/* A new life for the socket (it can connect again after a failure; an entry left at this address
 * by a socket whose destruction we missed starts over). */
static __always_inline void start_new_life(struct tcpstate_sock *s, int accepted)
{
	/* A close still pending had no reset, so it was TIME_WAIT. */
	if (s->flags & TCPSTATE_SOCK_CLOSE_PENDING)
		COUNT(transitions, s->prev_state * TCPSTATE_NSTATES + TCPSTATE_TCP_TIME_WAIT);
	s->flags &= TCPSTATE_SOCK_FAIL_PENDING;  /* still to be settled at destroy */
	s->prev_state = 0;
	s->est_ts_ns = 0;
	s->syn_ts_ns = 0;
	if (accepted) {
		/* Runs in softirq context: the current process is not the owner. */
		s->flags |= TCPSTATE_SOCK_PASSIVE;
		s->pid = 0;
	} else {
		/* connect() and listen() run in the owning process's context. */
		s->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(&s->comm, sizeof(s->comm));
	}
}

/* The socket enters newstate now: its timestamps, the handshake and lifetime it completes, and
 * the time it spent in oldstate (us; 0 when unknown), which the event carries. */
static __always_inline __u64 record_transition(struct tcpstate_sock *s, __u8 oldstate, __u8 newstate, __u64 now)
{
	__u64 delta_us = 0;
	if (!s)
		return 0;
	int accepted = oldstate == TCPSTATE_TCP_LISTEN && newstate == TCPSTATE_TCP_SYN_RECV;
	if (newstate == TCPSTATE_TCP_SYN_SENT || newstate == TCPSTATE_TCP_LISTEN || accepted)
		start_new_life(s, accepted);
	if (newstate == TCPSTATE_TCP_SYN_SENT)
		s->syn_ts_ns = now;
	if (newstate == TCPSTATE_TCP_ESTABLISHED) {
		if (oldstate == TCPSTATE_TCP_SYN_SENT && s->syn_ts_ns)
			observe_duration(TCPSTATE_HIST_HANDSHAKE, now - s->syn_ts_ns);
		s->est_ts_ns = now;
	}
	if (newstate == TCPSTATE_TCP_CLOSE && oldstate != TCPSTATE_TCP_CLOSE) {
		/* est_ts_ns stays: a reset sent after an abort's CLOSE still needs it. */
		if (s->est_ts_ns)
			observe_duration(TCPSTATE_HIST_LIFETIME, now - s->est_ts_ns);
		s->prev_state = oldstate;
	}
	if (s->state_ts_ns)
		delta_us = (now - s->state_ts_ns) / 1000;
	s->state_ts_ns = now;
	s->state = newstate;
	return delta_us;
}

/* Count the FIN_WAIT2/CLOSING->CLOSE that waited for this socket's reset (to: CLOSE) or
 * destruction (to: TIME_WAIT). */
static __always_inline void settle_waiting_close(void *ctx, struct flow *f, __u64 skaddr, struct tcpstate_sock *s,
						 __u8 to)
{
	s->flags &= ~TCPSTATE_SOCK_CLOSE_PENDING;
	COUNT(transitions, s->prev_state * TCPSTATE_NSTATES + to);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(ctx, f, skaddr, TCPSTATE_EV_TRANSITION, s->prev_state, to, 0, s->close_delta_us, s);
#endif
}

#endif /* TCPSTATE_SOCKS_H */
