/* tcpstate.c: tracepoint programs that count TCP transitions, resets and failures in per-CPU maps (bcc). */
/*
 * Each program reads its tracepoint's arguments into locals and a struct flow, then runs named
 * steps from the headers below, in an order the counts depend on. Kernel structs are read only
 * at offsets from the running kernel's BTF, never by the layout of the headers bcc compiles
 * against, which may not match the running kernel. monitor/kernel/probes.py picks the code paths
 * with -D flags after reading the kernel's tracepoint formats:
 *   TCPSTATE_HAVE_<TRACEPOINT>        the tracepoint exists
 *   TCPSTATE_SEND_RESET_SOCKADDR      tcp_send_reset has sockaddr images (>= 6.10)
 *   TCPSTATE_SEND_RESET_HAS_REASON / _HAS_STATE / _HAS_FAMILY
 *   TCPSTATE_RECEIVE_RESET_HAS_FAMILY, TCPSTATE_DESTROY_SOCK_HAS_FAMILY (5.10 has neither)
 *   TCPSTATE_SK_ERR_AT                byte offset of sock.sk_err (from the kernel's BTF): failed
 *                                     connects classified by the socket's error, no error report
 *   TCPSTATE_NOSOCK_RESETS_FROM_KFREE_SKB, with TCPSTATE_KFREE_SKB_*_AT (the format's offsets),
 *   TCPSTATE_DROP_NO_SOCKET and TCPSTATE_SKB_*_AT (BTF): resets sent for no socket, on kernels
 *                                     whose tcp_send_reset does not report them (before 6.10)
 *   TCPSTATE_SEND_RESET_SKB_FLAGS     with TCPSTATE_SKB_*_AT: the flags of the segment tcp_send_reset
 *                                     answers for no socket (a refused SYN, for port reuse)
 *   TCPSTATE_SEGS_OUT_AT              byte offset of tcp_sock.segs_out (BTF): the SYNs a failed connect sent
 *   TCPSTATE_SKC_STATE_AT             byte offset of sock_common.skc_state (BTF): a reset's state read
 *                                     from the socket, so the socket table is touched only where a
 *                                     count needs it (socks.h, TCPSTATE_TRACK_FEW)
 *   TCPSTATE_RAW_TRACEPOINTS          with the struct sock offsets sockread.h lists (BTF): inet_sock_set_state
 *                                     and tcp_destroy_sock attached as raw tracepoints, which read the
 *                                     socket instead of the tracepoint's record
 *   TCPSTATE_RETRANSMIT_SKB_HAS_FAMILY / _HAS_ERR, TCPSTATE_RETRANSMIT_SYNACK_HAS_FAMILY
 *   TCPSTATE_FILTER_INCLUDE_CIDR / _EXCLUDE_CIDR / _PORTS
 *   TCPSTATE_EMIT_EVENTS              feed the watch ring buffer
 *   TCPSTATE_MAX_SOCKS                size of the per-socket table
 *   TCPSTATE_MAX_CLOSES               size of the recent-closes table (0: no port-reuse counting)
 *   TCPSTATE_MAX_OFFENDERS            size of the offenders table (0: none kept)
 *
 * The headers, each one concern (its maps, then the steps that use them):
 *   tcpstate.h        the ABI shared with Python (monitor/kernel/abi.py mirrors it)
 *   tcpstate_logic.h  the decisions, as pure functions (also compiled into the unit tests)
 *   counters.h        the per-CPU counter maps, COUNT(), settings, duration histograms
 *   flow.h            struct flow, filling it from tracepoint args, the CIDR and port filters
 *   events.h          the watch ring buffer
 *   offenders.h       the per-peer table of resets, failures and reuses
 *   socks.h           the per-socket table and closes that wait for their cause
 *   failures.h        failed connects by cause, and their SYNs
 *   reuse.h           port reuse (recent closes by 4-tuple)
 *   resets.h          resets by direction, state and reason; resets right after the handshake
 *   sockread.h        a socket's protocol and ends read from the socket, for the raw tracepoints
 *   guard.h           one of these programs at a time per CPU (raw tracepoints do not nest-guard each other)
 * bcc rewrites map calls only in the file it compiles, so probes.py splices these headers into
 * tcpstate.c before handing it over (probes.bcc_source); gcc and bcc see the same text.
 */
#include <uapi/linux/ptrace.h>

#ifdef TCPSTATE_SEND_RESET_HAS_REASON
/* 6.1 headers lack this enum, which the tcp_send_reset format names; bcc needs it complete. */
enum sk_rst_reason { TCPSTATE_SK_RST_REASON_FIRST };
#endif

/* Table sizes come from the command line (monitor/settings.py holds their defaults). */
#if !defined(TCPSTATE_MAX_SOCKS) || !defined(TCPSTATE_MAX_CLOSES) || !defined(TCPSTATE_MAX_OFFENDERS)
#error "compile with -DTCPSTATE_MAX_SOCKS, -DTCPSTATE_MAX_CLOSES and -DTCPSTATE_MAX_OFFENDERS (Probes.cflags)"
#endif

#include "tcpstate.h"
#include "tcpstate_logic.h"
#include "counters.h"
#include "flow.h"
#include "events.h"
#include "offenders.h"
#include "socks.h"
#include "failures.h"
#include "reuse.h"
#include "resets.h"
#include "sockread.h"
#include "guard.h"

/* A transition, from either entry point below. The tracepoint's record gives the two ends
 * (given); a raw tracepoint reads them from the socket (given NULL), and only where a step needs
 * them. */
static __always_inline int on_set_state(void *ctx, __u64 skaddr, __u8 oldstate, __u8 newstate,
					const struct flow *given)
{
	int failed = oldstate == TCPSTATE_TCP_SYN_SENT && newstate == TCPSTATE_TCP_CLOSE;
#ifdef TCPSTATE_SEGS_OUT_AT
	__u32 syns = failed ? segs_out(skaddr) : 0;
	/* connect() failed before its SYN went out (EADDRNOTAVAIL): no conversation on the wire. */
	int silent = failed && syns == 0;
#else
	__u32 syns = 0;
	int silent = 0;  /* cannot tell: as if its SYN went out */
#endif
	/* Unused when a filter copies every flow and port-reuse counting is off. */
	int closes __attribute__((unused)) = tcpstate_records_close(oldstate, newstate) && !silent;
	int role __attribute__((unused)) = tcpstate_opening_role(oldstate);
	struct flow f = {};
#ifdef TCPSTATE_NEED_FLOW
	transition_flow(&f, given, skaddr);
	if (!flow_wanted(&f))
		return 0;
#else
	/* Only the transitions that record, look up or blame a 4-tuple copy it. */
	if (closes || role >= 0)
		transition_flow(&f, given, skaddr);
#endif
	if (!needs_socket_record(newstate)) {  /* between two states of an open connection */
		COUNT(transitions, oldstate * TCPSTATE_NSTATES + newstate);
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();

	struct tcpstate_sock *s = track_socket(skaddr, oldstate, newstate, now);
	reuse_at_transition(&f, s, role, silent, closes, now);
	if (failed)
		count_connect_fail_evidence(&f, s, syns, now);
	__u8 counted = tcpstate_counted_newstate(oldstate, newstate, s ? s->flags : 0);
	int waits = close_must_wait(s, newstate, counted);
	if (!waits)
		COUNT(transitions, oldstate * TCPSTATE_NSTATES + counted);
	if (failed)  /* the flow was copied: role is the client's */
		classify_connect_fail(skaddr, f.sport, s);
	__u64 delta_us = record_transition(s, oldstate, newstate, now);
	if (waits) {
		s->flags |= TCPSTATE_SOCK_CLOSE_PENDING;
		s->close_delta_us = delta_us;
		return 0;
	}
#ifdef TCPSTATE_EMIT_EVENTS
	emit(ctx, &f, skaddr, TCPSTATE_EV_TRANSITION, oldstate, counted, 0, delta_us, s);
#endif
	return 0;
}

#ifdef TCPSTATE_RAW_TRACEPOINTS
/* The kernel's arguments: (const struct sock *sk, int oldstate, int newstate). */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
	__u64 skaddr = ctx->args[0];
	if (sock_protocol(skaddr) != TCPSTATE_IPPROTO_TCP)
		return 0;
	TCPSTATE_GUARD(TCPSTATE_PROG_INET_SOCK_SET_STATE);
	return on_set_state(ctx, skaddr, tcpstate_clamp_state(ctx->args[1]), tcpstate_clamp_state(ctx->args[2]), NULL);
}
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != TCPSTATE_IPPROTO_TCP)
		return 0;
	TCPSTATE_GUARD(TCPSTATE_PROG_INET_SOCK_SET_STATE);
	struct flow f = {};
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
	return on_set_state(args, (__u64)args->skaddr, tcpstate_clamp_state(args->oldstate),
			    tcpstate_clamp_state(args->newstate), &f);
}
#endif

#ifdef TCPSTATE_HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_SEND_RESET);
	struct flow f = {};
#ifdef TCPSTATE_SEND_RESET_SOCKADDR
	TCPSTATE_FLOW_FROM_SOCKADDR(&f, args);
#elif defined(TCPSTATE_SEND_RESET_HAS_FAMILY)
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#else
	TCPSTATE_FLOW_FROM_MAPPED(&f, args);
#endif
	if (!flow_wanted(&f))
		return 0;
	__u64 skaddr = (__u64)args->skaddr;
#ifdef TCPSTATE_SEND_RESET_HAS_STATE
	int tp_state = args->state;
#else
	int tp_state = -1;
#endif
#ifdef TCPSTATE_SEND_RESET_HAS_REASON
	__u8 reason = tcpstate_clamp_reason(args->reason);
#else
	__u8 reason = TCPSTATE_REASON_UNKNOWN;
#endif

	struct tcpstate_sock *s = NULL;
	if (skaddr)
		s = socks.lookup(&skaddr);
	int now_in = socket_state_now(skaddr, s);
	__u8 state = tcpstate_reset_state(skaddr != 0, tp_state, now_in >= 0, now_in >= 0 ? now_in : 0,
					  s ? s->prev_state : 0);
	/* A socket that sends a reset before it closes (keepalive or FIN_WAIT2 timeout)
	 * is not entering TIME_WAIT; one that closed just before its reset was aborted. */
	if (s && now_in != TCPSTATE_TCP_CLOSE)
		s->flags |= TCPSTATE_SOCK_RESET_SEEN;
	if (s && (s->flags & TCPSTATE_SOCK_CLOSE_PENDING))
		settle_waiting_close(args, &f, skaddr, s, TCPSTATE_TCP_CLOSE);
	count_reset(TCPSTATE_DIR_SENT, state, reason);
	__u64 now = bpf_ktime_get_ns();
	count_offender(&f, TCPSTATE_OFF_RESET_SENT, skaddr != 0, s, now);
#ifdef TCPSTATE_SEND_RESET_SKB_FLAGS
	if (!skaddr)
		reset_for_no_socket(&f, skb_tcp_flags((const void *)args->skbaddr), now);
#endif
	count_early_reset(&f, s, TCPSTATE_DIR_SENT, now);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(args, &f, skaddr, TCPSTATE_EV_RESET_SENT, state, state, reason, 0, s);
#endif
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_RECEIVE_RESET);
	struct flow f = {};
#ifdef TCPSTATE_RECEIVE_RESET_HAS_FAMILY
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#else
	TCPSTATE_FLOW_FROM_MAPPED(&f, args);
#endif
	if (!flow_wanted(&f))
		return 0;
	__u64 skaddr = (__u64)args->skaddr;

	struct tcpstate_sock *s = socks.lookup(&skaddr);
	int now_in = socket_state_now(skaddr, s);  /* the kernel reports it before it acts on it */
	__u8 state = now_in >= 0 ? tcpstate_clamp_state(now_in) : TCPSTATE_STATE_UNKNOWN;
	if (s)
		s->flags |= TCPSTATE_SOCK_RESET_SEEN;
	count_reset(TCPSTATE_DIR_RECEIVED, state, TCPSTATE_REASON_UNKNOWN);
	__u64 now = bpf_ktime_get_ns();
	count_offender(&f, TCPSTATE_OFF_RESET_RECEIVED, 1, s, now);
	count_early_reset(&f, s, TCPSTATE_DIR_RECEIVED, now);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(args, &f, skaddr, TCPSTATE_EV_RESET_RECEIVED, state, state, TCPSTATE_REASON_UNKNOWN, 0, s);
#endif
	return 0;
}
#endif

#if defined(TCPSTATE_HAVE_INET_SK_ERROR_REPORT) && !defined(TCPSTATE_SK_ERR_AT)
TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
	/* The kernel also reports 0 once the error is consumed. */
	if (args->protocol != TCPSTATE_IPPROTO_TCP || args->error == 0)
		return 0;
	TCPSTATE_GUARD(TCPSTATE_PROG_INET_SK_ERROR_REPORT);
	count_reported_connect_fail(args->sport, args->error);
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_DESTROY_SOCK
/* A socket's end: what it still owed (a failed connect's cause, a close that waited for a reset)
 * is settled, and its slot freed at once instead of waiting for LRU eviction. */
static __always_inline void on_destroy(void *ctx, __u64 skaddr, __u16 sport, const struct flow *given)
{
	struct tcpstate_sock *s = socks.lookup(&skaddr);
	settle_connect_fail_at_destroy(skaddr, sport, s);
	if (s && (s->flags & TCPSTATE_SOCK_CLOSE_PENDING)) {
		struct flow f = {};
#ifdef TCPSTATE_NEED_FLOW
		transition_flow(&f, given, skaddr);
#endif
		settle_waiting_close(ctx, &f, skaddr, s, TCPSTATE_TCP_TIME_WAIT);
	}
	if (s && socks.delete(&skaddr) == 0)
		COUNT(stats, TCPSTATE_STAT_SOCK_FREED);
}

#ifdef TCPSTATE_RAW_TRACEPOINTS
/* The kernel's argument: (struct sock *sk). */
RAW_TRACEPOINT_PROBE(tcp_destroy_sock)
{
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_DESTROY_SOCK);
	__u64 skaddr = ctx->args[0];
#ifdef TCPSTATE_SK_ERR_AT
	__u16 sport = 0;  /* pending failures are found by the socket, not the port */
#else
	__u16 sport = transition_sport(skaddr);
#endif
	on_destroy(ctx, skaddr, sport, NULL);
	return 0;
}
#else
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_DESTROY_SOCK);
	struct flow f = {};
#if defined(TCPSTATE_NEED_FLOW) && defined(TCPSTATE_DESTROY_SOCK_HAS_FAMILY)
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#elif defined(TCPSTATE_NEED_FLOW)
	TCPSTATE_FLOW_FROM_MAPPED(&f, args);
#endif
	on_destroy(args, (__u64)args->skaddr, args->sport, &f);
	return 0;
}
#endif
#endif

#ifdef TCPSTATE_NOSOCK_RESETS_FROM_KFREE_SKB
/* Before 6.10, tcp_send_reset does not fire for a reset sent where no socket matched (a connect
 * to a closed port, a segment of a connection this host forgot). The segment that caused it is
 * freed right after with drop reason NO_SOCKET; its headers name the peer. Attached by hand
 * (probes.py) and read at the format's offsets: bcc's generated struct would need the kernel's
 * enum skb_drop_reason, which mismatched headers may lack. What this cannot tell: a segment that
 * failed the IPsec policy check is dropped the same way without a reset. */
int tcpstate_kfree_skb(void *ctx)
{
	__u32 reason = *(__u32 *)(ctx + TCPSTATE_KFREE_SKB_REASON_AT);
	if (reason != TCPSTATE_DROP_NO_SOCKET)
		return 0;
	TCPSTATE_GUARD(TCPSTATE_PROG_KFREE_SKB);
	void *skb = *(void **)(ctx + TCPSTATE_KFREE_SKB_SKBADDR_AT);
	unsigned char *head = NULL;
	__u16 nh = 0, th = 0;
	bpf_probe_read_kernel(&head, sizeof(head), skb + TCPSTATE_SKB_HEAD_AT);
	bpf_probe_read_kernel(&nh, sizeof(nh), skb + TCPSTATE_SKB_NETWORK_HEADER_AT);
	bpf_probe_read_kernel(&th, sizeof(th), skb + TCPSTATE_SKB_TRANSPORT_HEADER_AT);
	__u8 ip[40] = {};
	__u8 tcp[14] = {};
	if (!head || bpf_probe_read_kernel(ip, sizeof(ip), head + nh) ||
	    bpf_probe_read_kernel(tcp, sizeof(tcp), head + th))
		return 0;
	struct flow f = {};
	/* The segment came from the peer: its destination is our end. */
	if (ip[0] >> 4 == 4) {
		if (ip[9] != TCPSTATE_IPPROTO_TCP)
			return 0;
		f.family = TCPSTATE_AF_INET;
		__builtin_memcpy(f.saddr, ip + 16, 4);
		__builtin_memcpy(f.daddr, ip + 12, 4);
	} else if (ip[0] >> 4 == 6) {
		if (ip[6] != TCPSTATE_IPPROTO_TCP)  /* extension headers: not counted */
			return 0;
		f.family = TCPSTATE_AF_INET6;
		__builtin_memcpy(f.saddr, ip + 24, 16);
		__builtin_memcpy(f.daddr, ip + 8, 16);
	} else {
		return 0;
	}
	if (tcp[13] & 0x04)  /* RST: the kernel never answers a reset with one */
		return 0;
	f.sport = (tcp[2] << 8) | tcp[3];
	f.dport = (tcp[0] << 8) | tcp[1];
	TCPSTATE_FLOW_BARRIER();
	if (!flow_wanted(&f))
		return 0;

	count_reset(TCPSTATE_DIR_SENT, TCPSTATE_STATE_NONE, TCPSTATE_REASON_NO_SOCKET);
	__u64 now = bpf_ktime_get_ns();
	count_offender(&f, TCPSTATE_OFF_RESET_SENT, 0, NULL, now);
	reset_for_no_socket(&f, tcp[13], now);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(ctx, &f, 0, TCPSTATE_EV_RESET_SENT, TCPSTATE_STATE_NONE, TCPSTATE_STATE_NONE, TCPSTATE_REASON_NO_SOCKET,
	     0, NULL);
#endif
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_RETRANSMIT_SKB
#ifdef TCPSTATE_RETRANSMIT_SKB_HAS_FAMILY
#define TCPSTATE_RETRANSMIT_SKB_FLOW TCPSTATE_FLOW_FROM_FIELDS
#else
#define TCPSTATE_RETRANSMIT_SKB_FLOW TCPSTATE_FLOW_FROM_MAPPED
#endif
/* A segment sent again: what Wireshark flags as a retransmission in a capture on this host. By
 * the state its connection was in; one re-sent from SYN_SENT is a client's SYN. Plain per-CPU
 * counters: no table is touched. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TCPSTATE_RETRANSMIT_SKB_HAS_ERR
	if (args->err)  /* the kernel reports failed attempts too; those never left the host */
		return 0;
#endif
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_RETRANSMIT_SKB);
	TCPSTATE_RETURN_IF_UNWANTED(TCPSTATE_RETRANSMIT_SKB_FLOW);
	__u8 state = tcpstate_clamp_state(args->state);
	COUNT(retransmits, state);
	if (state == TCPSTATE_TCP_SYN_SENT)
		COUNT(syn_retrans, TCPSTATE_ROLE_CLIENT);
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_RETRANSMIT_SYNACK
#ifdef TCPSTATE_RETRANSMIT_SYNACK_HAS_FAMILY
#define TCPSTATE_RETRANSMIT_SYNACK_FLOW TCPSTATE_FLOW_FROM_FIELDS
#else
#define TCPSTATE_RETRANSMIT_SYNACK_FLOW TCPSTATE_FLOW_FROM_MAPPED
#endif
/* A SYN-ACK sent again for a handshake this host has not completed (its timer, or a duplicate
 * SYN); the kernel reports only those that went out. Counted under SYN_RECV. */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	TCPSTATE_GUARD(TCPSTATE_PROG_TCP_RETRANSMIT_SYNACK);
	TCPSTATE_RETURN_IF_UNWANTED(TCPSTATE_RETRANSMIT_SYNACK_FLOW);
	COUNT(retransmits, TCPSTATE_TCP_SYN_RECV);
	COUNT(syn_retrans, TCPSTATE_ROLE_SERVER);
	return 0;
}
#endif
