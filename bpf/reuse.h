/* reuse.h: port reuse as Wireshark flags it, a new SYN on the 4-tuple of a conversation that ended within the window. */
#ifndef TCPSTATE_REUSE_H
#define TCPSTATE_REUSE_H

#include "tcpstate.h"
#include "tcpstate_logic.h"
#include "counters.h"
#include "flow.h"
#include "offenders.h"

#if TCPSTATE_MAX_CLOSES > 0
/* When connections closed, by 4-tuple: the next connection on one within the reuse window is a
 * port reuse (tcpstate.h, struct tcpstate_close_set). */
#define TCPSTATE_CLOSE_SETS ((TCPSTATE_MAX_CLOSES + TCPSTATE_CLOSE_WAYS - 1) / TCPSTATE_CLOSE_WAYS)
BPF_ARRAY(recent_closes, struct tcpstate_close_set, TCPSTATE_CLOSE_SETS);

static __always_inline struct tcpstate_close_set *close_set(struct flow *f, __u32 *tag)
{
	__u64 h = tcpstate_flow_hash((const __u64 *)f);
	__u32 idx = (__u32)h % TCPSTATE_CLOSE_SETS;
	*tag = h >> 32;
	return recent_closes.lookup(&idx);
}

/* syn: a new connection's SYN (sent at syn_ns) looks up when the 4-tuple last ended; end: this
 * connection ends now. Returns 1 for a reuse. */
static __always_inline int reuse_step(struct flow *f, int syn, __u64 syn_ns, int end, __u64 now)
{
	__u32 tag;
	int reused = 0;
	if (!f->sport || !f->dport)
		return 0;
	struct tcpstate_close_set *set = close_set(f, &tag);
	if (!set)
		return 0;
	if (syn)
		reused = tcpstate_close_take(set, tag, tcpstate_close_tick(syn_ns),
					     tcpstate_close_window(setting(TCPSTATE_SET_REUSE_WINDOW_NS)));
	if (end)
		tcpstate_close_put(set, tag, tcpstate_close_tick(now));
	return reused;
}
#endif

/* A transition of a socket: leaving SYN_SENT or SYN_RECV (role >= 0) is where a new connection's
 * 4-tuple is complete (the client's port may still be 0 at CLOSE->SYN_SENT); its SYN is looked up
 * there, then its end recorded (closes). silent: a failed connect that sent no SYN. */
static __always_inline void reuse_at_transition(struct flow *f, struct tcpstate_sock *s, int role, int silent,
						int closes, __u64 now)
{
#if TCPSTATE_MAX_CLOSES > 0
	int opens = role >= 0 && !silent;
	if ((opens || closes) &&
	    reuse_step(f, opens, tcpstate_syn_time(s ? s->syn_ts_ns : 0, now), closes, now)) {
		COUNT(port_reuse, role);
		count_offender(f, TCPSTATE_OFF_PORT_REUSE, 1, s, now);
	}
#endif
}

/* A reset sent where no socket matched ends its 4-tuple's conversation; when it answered a new
 * SYN (tcp_flags), that SYN is a reuse of the 4-tuple's last conversation if there was one
 * within the window: a client reconnecting from a fixed port to a closed one, seen by the host
 * that refuses it. */
static __always_inline void reset_for_no_socket(struct flow *f, __u8 tcp_flags, __u64 now)
{
#if TCPSTATE_MAX_CLOSES > 0
	if (reuse_step(f, tcpstate_new_syn(tcp_flags), now, 1, now)) {
		COUNT(port_reuse, TCPSTATE_ROLE_SERVER);
		count_offender(f, TCPSTATE_OFF_PORT_REUSE, 0, NULL, now);
	}
#endif
}

#ifdef TCPSTATE_SEND_RESET_SKB_FLAGS
/* The TCP flags of a received segment (tcp_send_reset's skbaddr: the one being answered). */
static __always_inline __u8 skb_tcp_flags(const void *skb)
{
	unsigned char *head = NULL;
	__u16 th = 0;
	__u8 flags = 0;
	bpf_probe_read_kernel(&head, sizeof(head), skb + TCPSTATE_SKB_HEAD_AT);
	bpf_probe_read_kernel(&th, sizeof(th), skb + TCPSTATE_SKB_TRANSPORT_HEADER_AT);
	if (head)
		bpf_probe_read_kernel(&flags, sizeof(flags), head + th + 13);
	return flags;
}
#endif

#endif /* TCPSTATE_REUSE_H */
