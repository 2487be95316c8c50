/* failures.h: failed connects (SYN_SENT->CLOSE) by cause, counted when the cause is known, and the SYNs they sent. */
#ifndef TCPSTATE_FAILURES_H
#define TCPSTATE_FAILURES_H

#include "tcpstate.h"
#include "tcpstate_logic.h"
#include "counters.h"
#include "flow.h"
#include "offenders.h"

#ifndef TCPSTATE_SK_ERR_AT
/* Without the socket's error at hand (no BTF), a failed connect (SYN_SENT->CLOSE) waits here
 * until we know why. The kernel reports the socket error right *after* the transition, through a
 * tracepoint that has no skaddr and may show dport 0 (tcp_disconnect clears it first), so the key
 * is the local port. The error report classifies it; the socket's destruction without a report
 * makes it "other". */
struct pending_fail {
	__u64 skaddr;
};
BPF_TABLE("lru_hash", __u16, struct pending_fail, pending_fails, 4096);
#endif

#if defined(TCPSTATE_SK_ERR_AT) || defined(TCPSTATE_SEGS_OUT_AT)
/* A 32-bit member of a socket, at its offset in the running kernel's BTF. */
static __always_inline __u32 sock_u32(__u64 skaddr, __u32 offset)
{
	__u32 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (void *)(skaddr + offset));
	return v;
}
#endif
#ifdef TCPSTATE_SK_ERR_AT
#define sk_error(skaddr) ((int)sock_u32(skaddr, TCPSTATE_SK_ERR_AT))
#endif
/* Segments a socket sent, retransmissions included: in SYN_SENT, its SYNs. */
#ifdef TCPSTATE_SEGS_OUT_AT
#define segs_out(skaddr) sock_u32(skaddr, TCPSTATE_SEGS_OUT_AT)
#endif

/* Who the failed connect was to, and the SYNs it sent (0 when unknown). */
static __always_inline void count_connect_fail_evidence(struct flow *f, struct tcpstate_sock *s, __u32 syns, __u64 now)
{
	count_offender(f, TCPSTATE_OFF_CONNECT_FAIL, 1, s, now);
#ifdef TCPSTATE_SEGS_OUT_AT
	if (syns)
		COUNT_BY(connect_fails, TCPSTATE_FAIL_SYNS, syns);
#endif
}

/* Count a failed connect by its cause now, or leave it to the socket's destruction (or, without
 * BTF, to its error report). Returns 1 when it waits. */
static __always_inline int count_connect_fail_or_defer(__u64 skaddr, __u16 sport, int tracked)
{
#if defined(TCPSTATE_SK_ERR_AT) && defined(TCPSTATE_HAVE_TCP_DESTROY_SOCK)
	/* When the kernel gives up it sets sk_err before the transition (ECONNREFUSED, ETIMEDOUT);
	 * an abandoned connect gets ECONNRESET just after it (tcp_disconnect), a plain close none:
	 * no error yet is settled at the socket's destruction. */
	int err = sk_error(skaddr);
	if (err == 0 && tracked)
		return 1;
	COUNT(connect_fails, tcpstate_failure_class(err));
	return 0;
#else
#if defined(TCPSTATE_HAVE_INET_SK_ERROR_REPORT) && defined(TCPSTATE_HAVE_TCP_DESTROY_SOCK)
	/* sport 0: connect() failed before a local port was bound (e.g. EADDRNOTAVAIL). */
	if (sport != 0) {
		struct pending_fail *old = pending_fails.lookup(&sport);
		if (old && old->skaddr != skaddr)  /* another socket of that port never got a report */
			COUNT(connect_fails, TCPSTATE_FAIL_OTHER);
		struct pending_fail pf = {.skaddr = skaddr};
		if (pending_fails.update(&sport, &pf) == 0)
			return 1;
	}
#endif
	COUNT(connect_fails, TCPSTATE_FAIL_OTHER);
	return 0;
#endif
}

/* The cause of a failed connect, or a mark on the socket that it waits for one. */
static __always_inline void classify_connect_fail(__u64 skaddr, __u16 sport, struct tcpstate_sock *s)
{
	if (count_connect_fail_or_defer(skaddr, sport, s != NULL) && s)
		s->flags |= TCPSTATE_SOCK_FAIL_PENDING;
}

#if defined(TCPSTATE_HAVE_INET_SK_ERROR_REPORT) && !defined(TCPSTATE_SK_ERR_AT)
/* The error report for a connect that waits in pending_fails (error 0 is not one). */
static __always_inline void count_reported_connect_fail(__u16 sport, int error)
{
	if (pending_fails.lookup(&sport)) {
		pending_fails.delete(&sport);
		COUNT(connect_fails, tcpstate_failure_class(error));
	}
}
#endif

/* A socket destroyed while its failed connect still waits for a cause. */
static __always_inline void settle_connect_fail_at_destroy(__u64 skaddr, __u16 sport, struct tcpstate_sock *s)
{
#ifdef TCPSTATE_SK_ERR_AT
	if (s && (s->flags & TCPSTATE_SOCK_FAIL_PENDING)) {  /* abandoned: ECONNRESET with SO_LINGER {1, 0} */
		s->flags &= ~TCPSTATE_SOCK_FAIL_PENDING;
		COUNT(connect_fails, tcpstate_failure_class(sk_error(skaddr)));
	}
#else
	/* Only sockets whose connect failed (or that we never tracked) can wait there: this
	 * keeps a hash lookup off the destruction of every other socket. */
	if (!s || (s->flags & TCPSTATE_SOCK_FAIL_PENDING)) {
		struct pending_fail *pf = pending_fails.lookup(&sport);
		if (pf && pf->skaddr == skaddr) {  /* destroyed without an error report: abandoned */
			pending_fails.delete(&sport);
			COUNT(connect_fails, TCPSTATE_FAIL_OTHER);
		}
	}
#endif
}

#endif /* TCPSTATE_FAILURES_H */
