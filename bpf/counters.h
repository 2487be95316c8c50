/* counters.h: the per-CPU counter maps user space sums into metrics, one way to add to them, and the settings it writes. */
#ifndef TCPSTATE_COUNTERS_H
#define TCPSTATE_COUNTERS_H

#include "tcpstate.h"
#include "tcpstate_logic.h"

/* Map names are what monitor/kernel/probes.py reads, cut to the kernel's 15 characters. Most are
 * their metric's name (tcpstate_<name>_total): transitions, resets, port_reuse, retransmits. Not
 * these: connect_fails feeds tcpstate_connect_failures_total (its last slot, the SYNs those connects
 * sent, another family), resets_after_hs tcpstate_resets_after_handshake_total, syn_retrans
 * tcpstate_syn_retransmits_total; durations holds both duration histograms and stats the program's
 * own counts (events lost, untracked transitions, socket-table inserts and frees), probe_skips the
 * runs guard.h skipped, per program (added to tcpstate_probe_misses_total). */
BPF_PERCPU_ARRAY(transitions, __u64, TCPSTATE_NTRANSITIONS);
BPF_PERCPU_ARRAY(resets, __u64, TCPSTATE_NRESETS);
BPF_PERCPU_ARRAY(connect_fails, __u64, TCPSTATE_NFAIL_SLOTS);
BPF_PERCPU_ARRAY(durations, __u64, TCPSTATE_NHIST * TCPSTATE_HIST_STRIDE);
BPF_PERCPU_ARRAY(stats, __u64, TCPSTATE_NSTATS);
BPF_PERCPU_ARRAY(port_reuse, __u64, TCPSTATE_NROLES);
BPF_PERCPU_ARRAY(resets_after_hs, __u64, TCPSTATE_NRESETS_AFTER_HS);
BPF_PERCPU_ARRAY(retransmits, __u64, TCPSTATE_NSTATES);
BPF_PERCPU_ARRAY(syn_retrans, __u64, TCPSTATE_NROLES);
BPF_PERCPU_ARRAY(probe_skips, __u64, TCPSTATE_NPROGS);
BPF_ARRAY(settings, __u64, TCPSTATE_NSETTINGS);

/* bcc rewrites map.lookup() only where it is spelled outside a macro, and no map can be passed
 * to a function: so one function picks the map by a constant, which inlining folds away, and
 * COUNT(map, idx) names the map as the reader knows it. */
enum tcpstate_counter {
	COUNTER_transitions,
	COUNTER_resets,
	COUNTER_connect_fails,
	COUNTER_durations,
	COUNTER_stats,
	COUNTER_port_reuse,
	COUNTER_resets_after_hs,
	COUNTER_retransmits,
	COUNTER_syn_retrans,
	COUNTER_probe_skips,
};

/* Per-CPU slots, and no tcpstate program runs inside another on a CPU (guard.h): += does not race. */
static __always_inline void count_by(enum tcpstate_counter c, __u32 idx, __u64 n)
{
	__u64 *v = NULL;
	switch (c) {
	case COUNTER_transitions: v = transitions.lookup(&idx); break;
	case COUNTER_resets: v = resets.lookup(&idx); break;
	case COUNTER_connect_fails: v = connect_fails.lookup(&idx); break;
	case COUNTER_durations: v = durations.lookup(&idx); break;
	case COUNTER_stats: v = stats.lookup(&idx); break;
	case COUNTER_port_reuse: v = port_reuse.lookup(&idx); break;
	case COUNTER_resets_after_hs: v = resets_after_hs.lookup(&idx); break;
	case COUNTER_retransmits: v = retransmits.lookup(&idx); break;
	case COUNTER_syn_retrans: v = syn_retrans.lookup(&idx); break;
	case COUNTER_probe_skips: v = probe_skips.lookup(&idx); break;
	}
	if (v)
		*v += n;
}

#define COUNT_BY(map, idx, n) count_by(COUNTER_##map, (idx), (n))
#define COUNT(map, idx) COUNT_BY(map, idx, 1)

/* A value user space wrote after loading; 0 (a check turned off) until it does. */
static __always_inline __u64 setting(__u32 idx)
{
	__u64 *v = settings.lookup(&idx);
	return v ? *v : 0;
}

/* Prometheus histograms: a bucket count and the running sum, in the durations map. */
static __always_inline void observe_duration(int hist, __u64 delta_ns)
{
	__u32 base = hist * TCPSTATE_HIST_STRIDE;
	COUNT(durations, base + tcpstate_hist_bucket(delta_ns / 1000));
	COUNT_BY(durations, base + TCPSTATE_HIST_NBOUNDS + 1, delta_ns);
}

#endif /* TCPSTATE_COUNTERS_H */
