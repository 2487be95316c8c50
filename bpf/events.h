/* events.h: the ring buffer that feeds `tcpstate watch`; compiled in only when it runs (TCPSTATE_EMIT_EVENTS). */
#ifndef TCPSTATE_EVENTS_H
#define TCPSTATE_EVENTS_H

#include "tcpstate.h"
#include "counters.h"
#include "flow.h"

#ifdef TCPSTATE_EMIT_EVENTS
BPF_RINGBUF_OUTPUT(events, 256);

static __always_inline void fill_event(struct tcpstate_event *e, struct flow *f, __u64 skaddr, __u8 kind,
				       __u8 oldstate, __u8 newstate, __u8 reason, __u64 delta_us,
				       struct tcpstate_sock *s)
{
	e->ts_ns = bpf_ktime_get_ns();
	e->skaddr = skaddr;
	e->delta_us = delta_us;
	e->family = f->family;
	e->sport = f->sport;
	e->dport = f->dport;
	e->kind = kind;
	e->oldstate = oldstate;
	e->newstate = newstate;
	e->reason = reason;
	e->pad[0] = 0;
	e->pad[1] = 0;
	__builtin_memcpy(e->saddr, f->saddr, 16);
	__builtin_memcpy(e->daddr, f->daddr, 16);
	if (s && s->pid) {
		e->pid = s->pid;
		__builtin_memcpy(e->comm, s->comm, TCPSTATE_COMM_LEN);
	} else {
		e->pid = 0;
		__builtin_memset(e->comm, 0, TCPSTATE_COMM_LEN);
	}
}

/* A full buffer drops the event and counts it: the watcher reads too slowly, the counts are whole. */
static __always_inline void emit(void *ctx, struct flow *f, __u64 skaddr, __u8 kind, __u8 oldstate,
				 __u8 newstate, __u8 reason, __u64 delta_us, struct tcpstate_sock *s)
{
	struct tcpstate_event *e = events.ringbuf_reserve(sizeof(struct tcpstate_event));
	if (!e) {
		COUNT(stats, TCPSTATE_STAT_EVENTS_LOST);
		return;
	}
	fill_event(e, f, skaddr, kind, oldstate, newstate, reason, delta_us, s);
	events.ringbuf_submit(e, 0);
}
#endif

#endif /* TCPSTATE_EVENTS_H */
