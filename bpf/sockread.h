/* sockread.h: a socket's protocol, ports and addresses read from its struct sock at offsets from the running kernel's BTF, for the raw tracepoints. */
#ifndef TCPSTATE_SOCKREAD_H
#define TCPSTATE_SOCKREAD_H

#include "tcpstate.h"
#include "flow.h"

/* A raw tracepoint hands the program the kernel's own arguments (the struct sock pointer and the
 * states) instead of a record the kernel fills for every event, and is not held back by the guard
 * every perf-attached BPF program on the CPU shares: no run is skipped because a map read from
 * user space or another tool's program holds the CPU (tcpstate's own programs keep out of each
 * other by guard.h). The price is reading the fields the record held, here, at the offsets
 * probes.py passes (-D, from BTF):
 *   TCPSTATE_SK_PROTOCOL_AT                      sock.sk_protocol
 *   TCPSTATE_SKC_{DADDR,DPORT,FAMILY,V6_DADDR,V6_RCV_SADDR}_AT
 *                                                sock_common's, all within its first
 *                                                TCPSTATE_SKC_HEAD_LEN bytes (sock_common opens struct sock)
 *   TCPSTATE_INET_{SADDR,SPORT}_AT               inet_sock's, within TCPSTATE_INET_BLOCK_LEN bytes
 *                                                from TCPSTATE_INET_BLOCK_AT
 * One read per block: a helper call costs more than the bytes it copies. */
#ifdef TCPSTATE_RAW_TRACEPOINTS

static __always_inline __u16 tcpstate_be16(const __u8 *p)
{
	return (p[0] << 8) | p[1];
}

static __always_inline __u16 sock_protocol(__u64 skaddr)
{
	__u16 protocol = 0;
	bpf_probe_read_kernel(&protocol, sizeof(protocol), (void *)(skaddr + TCPSTATE_SK_PROTOCOL_AT));
	return protocol;
}

/* The local port in host order, as the tracepoints give it (inet_sport). */
static __always_inline __u16 sock_sport(__u64 skaddr)
{
	__u8 port[2] = {};
	bpf_probe_read_kernel(port, sizeof(port), (void *)(skaddr + TCPSTATE_INET_SPORT_AT));
	return tcpstate_be16(port);
}

/* The two ends as inet_sock_set_state's record has them (the kernel's TP_STORE_ADDRS): IPv4 from
 * inet_saddr and skc_daddr, anything else from the v6 addresses. A socket that cannot be read
 * leaves f zeroed. */
static __always_inline void flow_from_sock(struct flow *f, __u64 skaddr)
{
	__u8 head[TCPSTATE_SKC_HEAD_LEN] __attribute__((aligned(8)));
	__u8 inet[TCPSTATE_INET_BLOCK_LEN] __attribute__((aligned(8)));
	if (bpf_probe_read_kernel(head, sizeof(head), (void *)skaddr) ||
	    bpf_probe_read_kernel(inet, sizeof(inet), (void *)(skaddr + TCPSTATE_INET_BLOCK_AT)))
		return;
	__builtin_memcpy(&f->family, head + TCPSTATE_SKC_FAMILY_AT, sizeof(f->family));
	f->sport = tcpstate_be16(inet + (TCPSTATE_INET_SPORT_AT - TCPSTATE_INET_BLOCK_AT));
	f->dport = tcpstate_be16(head + TCPSTATE_SKC_DPORT_AT);
	if (f->family == TCPSTATE_AF_INET) {
		__builtin_memcpy(f->saddr, inet + (TCPSTATE_INET_SADDR_AT - TCPSTATE_INET_BLOCK_AT), 4);
		__builtin_memcpy(f->daddr, head + TCPSTATE_SKC_DADDR_AT, 4);
	} else {
		__builtin_memcpy(f->saddr, head + TCPSTATE_SKC_V6_RCV_SADDR_AT, 16);
		__builtin_memcpy(f->daddr, head + TCPSTATE_SKC_V6_DADDR_AT, 16);
	}
}

#endif /* TCPSTATE_RAW_TRACEPOINTS */

/* The two ends of a transition or a destruction: the tracepoint's record, which its entry point
 * copied (given), else the socket itself. */
static __always_inline void transition_flow(struct flow *f, const struct flow *given, __u64 skaddr)
{
#ifdef TCPSTATE_RAW_TRACEPOINTS
	flow_from_sock(f, skaddr);
#else
	*f = *given;
#endif
}

static __always_inline __u16 transition_sport(__u64 skaddr)
{
#ifdef TCPSTATE_RAW_TRACEPOINTS
	return sock_sport(skaddr);
#else
	return 0;  /* unused: the record gives it */
#endif
}

#endif /* TCPSTATE_SOCKREAD_H */
