/* guard.h: at most one of tcpstate's programs runs on a CPU at a time, whatever attached it. */
#ifndef TCPSTATE_GUARD_H
#define TCPSTATE_GUARD_H

#include "tcpstate.h"
#include "counters.h"

/* The kernel keeps perf-attached programs from running inside one another (one per-CPU guard for
 * all of them), but not a raw tracepoint program inside another program, nor, before 6.1, inside
 * itself: a softirq's transition can land while a process's is being counted. The counters are
 * per-CPU slots updated with plain adds, which a nested run would race on. So every program
 * takes this per-CPU flag before it writes anything; a run that finds it taken is skipped and
 * counted in probe_skips, as the kernel counts the runs it skips.
 * No atomic is needed: only an interrupt on this CPU can nest, and one that lands between the
 * test and the set runs to its end (and clears the flag) before the interrupted run goes on. */
BPF_PERCPU_ARRAY(running, __u32, 1);

static __always_inline __u32 *guard_enter(__u32 prog)
{
	int zero = 0;
	__u32 *busy = running.lookup(&zero);
	if (!busy)
		return NULL;
	if (*busy) {
		COUNT(probe_skips, prog);
		return NULL;
	}
	*busy = 1;
	asm volatile("" ::: "memory");  /* the flag is set before anything the run writes */
	return busy;
}

static __always_inline void guard_leave(__u32 **busy)
{
	if (*busy) {
		asm volatile("" ::: "memory");  /* ... and cleared after it */
		**busy = 0;
	}
}

/* The first statement of a program, after its read-only early returns: the flag is cleared on
 * every return that follows (cleanup). */
#define TCPSTATE_GUARD(prog)                                                   \
	__u32 *tcpstate_busy __attribute__((cleanup(guard_leave))) = guard_enter(prog); \
	if (!tcpstate_busy)                                                    \
		return 0

#endif /* TCPSTATE_GUARD_H */
