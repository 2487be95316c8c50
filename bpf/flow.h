/* flow.h: a connection's two ends as the tracepoints give them, and the CIDR and port filters applied to them. */
#ifndef TCPSTATE_FLOW_H
#define TCPSTATE_FLOW_H

#include "tcpstate.h"
#include "tcpstate_logic.h"

#define TCPSTATE_AF_INET 2
#define TCPSTATE_AF_INET6 10
#define TCPSTATE_IPPROTO_TCP 6

/* Local (s) and remote (d) end of a connection. Five aligned words, zeroed before they are
 * filled, so that tcpstate_flow_hash can read it whole. */
struct flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 pad;
} __attribute__((aligned(8)));
_Static_assert(sizeof(struct flow) == 40, "tcpstate_flow_hash reads struct flow as 5 words");

#if defined(TCPSTATE_FILTER_INCLUDE_CIDR) || defined(TCPSTATE_FILTER_EXCLUDE_CIDR) || defined(TCPSTATE_FILTER_PORTS)
#define TCPSTATE_FILTERED 1
#endif
#if defined(TCPSTATE_FILTERED) || defined(TCPSTATE_EMIT_EVENTS)
#define TCPSTATE_NEED_FLOW 1
#endif

/* The verifier allows only ctx+constant loads; without this barrier clang reads flow
 * fields back through a computed ctx pointer instead of the stack copy. */
#define TCPSTATE_FLOW_BARRIER() asm volatile("" ::: "memory")

/* Macros, not functions: they read the tracepoint's args, which stay in the entry point. */

/* Tracepoints with separate v4/v6 address fields share these names. */
#define TCPSTATE_FLOW_FROM_FIELDS(f, args)                                     \
	do {                                                                   \
		(f)->family = (args)->family;                                  \
		(f)->sport = (args)->sport;                                    \
		(f)->dport = (args)->dport;                                    \
		if ((f)->family == TCPSTATE_AF_INET) {                         \
			__builtin_memcpy((f)->saddr, (args)->saddr, 4);        \
			__builtin_memcpy((f)->daddr, (args)->daddr, 4);        \
		} else {                                                       \
			__builtin_memcpy((f)->saddr, (args)->saddr_v6, 16);    \
			__builtin_memcpy((f)->daddr, (args)->daddr_v6, 16);    \
		}                                                              \
		TCPSTATE_FLOW_BARRIER();                                       \
	} while (0)

/* Layouts without a family field: the v6 fields hold IPv4 addresses v4-mapped. */
#define TCPSTATE_FLOW_FROM_MAPPED(f, args)                                     \
	do {                                                                   \
		(f)->sport = (args)->sport;                                    \
		(f)->dport = (args)->dport;                                    \
		__builtin_memcpy((f)->saddr, (args)->saddr_v6, 16);            \
		__builtin_memcpy((f)->daddr, (args)->daddr_v6, 16);            \
		TCPSTATE_FLOW_BARRIER();                                       \
		(f)->family = tcpstate_unmap((f)->saddr, (f)->daddr);          \
	} while (0)

/* tcp_send_reset from 6.10: saddr/daddr are sockaddr_in/sockaddr_in6 images (family, port in
 * network order, address). */
#define TCPSTATE_FLOW_FROM_SOCKADDR(f, args)                                   \
	do {                                                                   \
		(f)->family = (args)->saddr[0] | ((args)->saddr[1] << 8);      \
		(f)->sport = ((args)->saddr[2] << 8) | (args)->saddr[3];       \
		(f)->dport = ((args)->daddr[2] << 8) | (args)->daddr[3];       \
		if ((f)->family == TCPSTATE_AF_INET) {                         \
			__builtin_memcpy((f)->saddr, (args)->saddr + 4, 4);    \
			__builtin_memcpy((f)->daddr, (args)->daddr + 4, 4);    \
		} else {                                                       \
			__builtin_memcpy((f)->saddr, (args)->saddr + 8, 16);   \
			__builtin_memcpy((f)->daddr, (args)->daddr + 8, 16);   \
		}                                                              \
		TCPSTATE_FLOW_BARRIER();                                       \
	} while (0)

#ifdef TCPSTATE_FILTER_INCLUDE_CIDR
BPF_LPM_TRIE(include_v4, struct tcpstate_lpm_v4, __u8, 1024);
BPF_LPM_TRIE(include_v6, struct tcpstate_lpm_v6, __u8, 1024);
#endif
#ifdef TCPSTATE_FILTER_EXCLUDE_CIDR
BPF_LPM_TRIE(exclude_v4, struct tcpstate_lpm_v4, __u8, 1024);
BPF_LPM_TRIE(exclude_v6, struct tcpstate_lpm_v6, __u8, 1024);
#endif
#ifdef TCPSTATE_FILTER_PORTS
BPF_HASH(include_ports, __u16, __u8, 1024);
#endif

#if defined(TCPSTATE_FILTER_INCLUDE_CIDR) || defined(TCPSTATE_FILTER_EXCLUDE_CIDR)
static __always_inline int lpm_key_v4(struct tcpstate_lpm_v4 *k, __u16 family, const __u8 *a)
{
	/* A v4-mapped v6 address (a v6 socket talking to a v4 peer) is matched as v4. */
	if (family != TCPSTATE_AF_INET && !tcpstate_v4_mapped(a))
		return 0;
	k->prefixlen = 32;
	__builtin_memcpy(k->addr, family == TCPSTATE_AF_INET ? a : a + 12, 4);
	return 1;
}
#endif

/* bcc cannot pass a map to a function, hence one lookup helper per pair of tries. */
#ifdef TCPSTATE_FILTER_INCLUDE_CIDR
static __always_inline int in_include(__u16 family, const __u8 *a)
{
	struct tcpstate_lpm_v4 k4 = {};
	struct tcpstate_lpm_v6 k6 = {.prefixlen = 128};
	if (lpm_key_v4(&k4, family, a))
		return include_v4.lookup(&k4) != NULL;
	__builtin_memcpy(k6.addr, a, 16);
	return include_v6.lookup(&k6) != NULL;
}
#endif
#ifdef TCPSTATE_FILTER_EXCLUDE_CIDR
static __always_inline int in_exclude(__u16 family, const __u8 *a)
{
	struct tcpstate_lpm_v4 k4 = {};
	struct tcpstate_lpm_v6 k6 = {.prefixlen = 128};
	if (lpm_key_v4(&k4, family, a))
		return exclude_v4.lookup(&k4) != NULL;
	__builtin_memcpy(k6.addr, a, 16);
	return exclude_v6.lookup(&k6) != NULL;
}
#endif

/* A connection matches when either endpoint is in an include CIDR (if any), neither is in
 * an exclude CIDR, and either port is an include port (if any). */
static __always_inline int flow_wanted(struct flow *f)
{
#ifdef TCPSTATE_FILTER_INCLUDE_CIDR
	if (!in_include(f->family, f->saddr) && !in_include(f->family, f->daddr))
		return 0;
#endif
#ifdef TCPSTATE_FILTER_EXCLUDE_CIDR
	if (in_exclude(f->family, f->saddr) || in_exclude(f->family, f->daddr))
		return 0;
#endif
#ifdef TCPSTATE_FILTER_PORTS
	if (!include_ports.lookup(&f->sport) && !include_ports.lookup(&f->dport))
		return 0;
#endif
	return 1;
}

/* The retransmit programs read the addresses only to apply the filters. */
#ifdef TCPSTATE_FILTERED
#define TCPSTATE_RETURN_IF_UNWANTED(flow_from)                                 \
	do {                                                                   \
		struct flow f = {};                                            \
		flow_from(&f, args);                                           \
		if (!flow_wanted(&f))                                          \
			return 0;                                              \
	} while (0)
#else
#define TCPSTATE_RETURN_IF_UNWANTED(flow_from) do { } while (0)
#endif

#endif /* TCPSTATE_FLOW_H */
