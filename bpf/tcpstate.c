/* tcpstate.c: tracepoint programs that count TCP transitions, resets and failures in per-CPU maps (bcc). */
/*
 * Reads tracepoint arguments only, never kernel struct fields: the headers bcc
 * compiles against may not match the running kernel. monitor/probes.py picks
 * the code paths with -D flags after reading the kernel's tracepoint formats:
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
 *   TCPSTATE_RETRANSMIT_SKB_HAS_FAMILY / _HAS_ERR, TCPSTATE_RETRANSMIT_SYNACK_HAS_FAMILY
 *   TCPSTATE_FILTER_INCLUDE_CIDR / _EXCLUDE_CIDR / _PORTS
 *   TCPSTATE_EMIT_EVENTS              feed the watch ring buffer
 *   TCPSTATE_MAX_SOCKS                size of the per-socket table
 *   TCPSTATE_MAX_CLOSES               size of the recent-closes table (0: no port-reuse counting)
 *   TCPSTATE_MAX_OFFENDERS            size of the offenders table (0: none kept)
 */
#include <uapi/linux/ptrace.h>

#ifdef TCPSTATE_SEND_RESET_HAS_REASON
/* 6.1 headers lack this enum, which the tcp_send_reset format names; bcc needs it complete. */
enum sk_rst_reason { TCPSTATE_SK_RST_REASON_FIRST };
#endif

#include "tcpstate.h"
#include "tcpstate_logic.h"

#define TCPSTATE_AF_INET 2
#define TCPSTATE_AF_INET6 10
#define TCPSTATE_IPPROTO_TCP 6

/* Table sizes come from the command line (monitor/settings.py holds their defaults). */
#if !defined(TCPSTATE_MAX_SOCKS) || !defined(TCPSTATE_MAX_CLOSES) || !defined(TCPSTATE_MAX_OFFENDERS)
#error "compile with -DTCPSTATE_MAX_SOCKS, -DTCPSTATE_MAX_CLOSES and -DTCPSTATE_MAX_OFFENDERS (Probes.cflags)"
#endif

/* Map names follow the metric names (tcpstate_<name>), cut to the kernel's 15 characters. */
BPF_PERCPU_ARRAY(transitions, __u64, TCPSTATE_NTRANSITIONS);
BPF_PERCPU_ARRAY(resets, __u64, TCPSTATE_NRESETS);
BPF_PERCPU_ARRAY(connect_fails, __u64, TCPSTATE_NFAIL_SLOTS);
BPF_PERCPU_ARRAY(durations, __u64, TCPSTATE_NHIST * TCPSTATE_HIST_STRIDE);
BPF_PERCPU_ARRAY(stats, __u64, TCPSTATE_NSTATS);
BPF_PERCPU_ARRAY(port_reuse, __u64, TCPSTATE_NROLES);
BPF_PERCPU_ARRAY(resets_after_hs, __u64, TCPSTATE_NRESETS_AFTER_HS);
BPF_PERCPU_ARRAY(retransmits, __u64, TCPSTATE_NSTATES);
BPF_PERCPU_ARRAY(syn_retrans, __u64, TCPSTATE_NROLES);
BPF_ARRAY(settings, __u64, TCPSTATE_NSETTINGS);
BPF_TABLE("lru_hash", __u64, struct tcpstate_sock, socks, TCPSTATE_MAX_SOCKS);

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
#ifdef TCPSTATE_EMIT_EVENTS
BPF_RINGBUF_OUTPUT(events, 256);
#endif

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
#endif
/* Offenders take an insert per new peer: per-CPU LRU lists (each CPU evicts from its own share)
 * spare it the global LRU lock under a storm. */
#if TCPSTATE_MAX_OFFENDERS > 0
BPF_F_TABLE("lru_hash", struct tcpstate_offender_key, struct tcpstate_offender, offenders, TCPSTATE_MAX_OFFENDERS,
	    BPF_F_NO_COMMON_LRU);
#endif

/* Per-CPU slots: the kernel refuses a nested BPF run on the same CPU, so ++ does not race. */
static __always_inline void inc_transitions(__u32 idx) { __u64 *v = transitions.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_resets(__u32 idx) { __u64 *v = resets.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_connect_fails(__u32 idx) { __u64 *v = connect_fails.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_durations(__u32 idx) { __u64 *v = durations.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_stats(__u32 idx) { __u64 *v = stats.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_port_reuse(__u32 idx) { __u64 *v = port_reuse.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_resets_after_hs(__u32 idx) { __u64 *v = resets_after_hs.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_retransmits(__u32 idx) { __u64 *v = retransmits.lookup(&idx); if (v) (*v)++; }
static __always_inline void inc_syn_retrans(__u32 idx) { __u64 *v = syn_retrans.lookup(&idx); if (v) (*v)++; }
static __always_inline __u64 setting(__u32 idx) { __u64 *v = settings.lookup(&idx); return v ? *v : 0; }

/* One more for the peer of this flow in the offenders table (a shared LRU hash: atomic adds). */
static __always_inline void offend(struct flow *f, __u8 kind, int has_sk, struct tcpstate_sock *s, __u64 now)
{
#if TCPSTATE_MAX_OFFENDERS > 0
	__u8 keep = tcpstate_offender_keep(kind, has_sk, s != NULL, s ? s->flags : 0, s ? s->state : 0);
	struct tcpstate_offender_key k = {};
	__builtin_memcpy(k.raddr, f->daddr, 16);
	k.family = f->family;
	k.rport = (keep & TCPSTATE_KEEP_REMOTE) ? f->dport : 0;
	k.lport = (keep & TCPSTATE_KEEP_LOCAL) ? f->sport : 0;
	k.kind = kind;
	struct tcpstate_offender *o = offenders.lookup(&k);
	if (!o) {
		struct tcpstate_offender fresh = {};
		fresh.first_ns = now;
		if (s && s->pid) {
			fresh.pid = s->pid;
			__builtin_memcpy(fresh.comm, s->comm, TCPSTATE_COMM_LEN);
		}
		offenders.insert(&k, &fresh);  /* fails only if another CPU inserted it first */
		o = offenders.lookup(&k);
		if (!o)
			return;
	} else if (now > o->last_ns + setting(TCPSTATE_SET_OFFENDER_IDLE_NS)) {
		/* A new run after a quiet spell: an old storm's total must not outrank today's. */
		o->count = 0;
		o->first_ns = now;
	}
	__sync_fetch_and_add(&o->count, 1);
	o->last_ns = now;
#endif
}

#if TCPSTATE_MAX_CLOSES > 0
/* Wireshark's "TCP Port numbers reused" is a new SYN on the 4-tuple of an earlier conversation.
 * syn: a new connection's SYN (sent at syn_ns) looks up when the 4-tuple last ended; end: this
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

/* A reset sent where no socket matched ends its 4-tuple's conversation; when it answered a new
 * SYN (tcp_flags), that SYN is a reuse of the 4-tuple's last conversation if there was one
 * within the window: a client reconnecting from a fixed port to a closed one, seen by the host
 * that refuses it. */
static __always_inline void reset_for_no_socket(struct flow *f, __u8 tcp_flags, __u64 now)
{
#if TCPSTATE_MAX_CLOSES > 0
	if (reuse_step(f, tcpstate_new_syn(tcp_flags), now, 1, now)) {
		inc_port_reuse(TCPSTATE_ROLE_SERVER);
		offend(f, TCPSTATE_OFF_PORT_REUSE, 0, NULL, now);
	}
#endif
}

static __always_inline void observe(int hist, __u64 delta_ns)
{
	__u32 base = hist * TCPSTATE_HIST_STRIDE;
	inc_durations(base + tcpstate_hist_bucket(delta_ns / 1000));
	__u32 sum_idx = base + TCPSTATE_HIST_NBOUNDS + 1;
	__u64 *sum = durations.lookup(&sum_idx);
	if (sum)
		*sum += delta_ns;
}

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

/* Count a failed connect (SYN_SENT->CLOSE) by its cause, or leave it to the socket's
 * destruction. Returns 1 if it waits there. */
static __always_inline int fail_pending(__u64 skaddr, __u16 sport, int tracked)
{
#if defined(TCPSTATE_SK_ERR_AT) && defined(TCPSTATE_HAVE_TCP_DESTROY_SOCK)
	/* When the kernel gives up it sets sk_err before the transition (ECONNREFUSED, ETIMEDOUT);
	 * an abandoned connect gets ECONNRESET just after it (tcp_disconnect), a plain close none:
	 * no error yet is settled at the socket's destruction. */
	int err = sk_error(skaddr);
	if (err == 0 && tracked)
		return 1;
	inc_connect_fails(tcpstate_failure_class(err));
	return 0;
#else
#if defined(TCPSTATE_HAVE_INET_SK_ERROR_REPORT) && defined(TCPSTATE_HAVE_TCP_DESTROY_SOCK)
	/* sport 0: connect() failed before a local port was bound (e.g. EADDRNOTAVAIL). */
	if (sport != 0) {
		struct pending_fail *old = pending_fails.lookup(&sport);
		if (old && old->skaddr != skaddr)  /* another socket of that port never got a report */
			inc_connect_fails(TCPSTATE_FAIL_OTHER);
		struct pending_fail pf = {.skaddr = skaddr};
		if (pending_fails.update(&sport, &pf) == 0)
			return 1;
	}
#endif
	inc_connect_fails(TCPSTATE_FAIL_OTHER);
	return 0;
#endif
}

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

#if defined(TCPSTATE_FILTER_INCLUDE_CIDR) || defined(TCPSTATE_FILTER_EXCLUDE_CIDR) || defined(TCPSTATE_FILTER_PORTS)
#define TCPSTATE_FILTERED 1
#endif
#if defined(TCPSTATE_FILTERED) || defined(TCPSTATE_EMIT_EVENTS)
#define TCPSTATE_NEED_FLOW 1
#endif

/* The verifier allows only ctx+constant loads; without this barrier clang reads flow
 * fields back through a computed ctx pointer instead of the stack copy. */
#define TCPSTATE_FLOW_BARRIER() asm volatile("" ::: "memory")

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

#ifdef TCPSTATE_EMIT_EVENTS
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

static __always_inline void emit(void *ctx, struct flow *f, __u64 skaddr, __u8 kind, __u8 oldstate,
				 __u8 newstate, __u8 reason, __u64 delta_us, struct tcpstate_sock *s)
{
	struct tcpstate_event *e = events.ringbuf_reserve(sizeof(struct tcpstate_event));
	if (!e) {
		inc_stats(TCPSTATE_STAT_EVENTS_LOST);
		return;
	}
	fill_event(e, f, skaddr, kind, oldstate, newstate, reason, delta_us, s);
	events.ringbuf_submit(e, 0);
}
#endif

/* Count the FIN_WAIT2/CLOSING->CLOSE that waited for this socket's reset or destruction. */
static __always_inline void close_resolve(void *ctx, struct flow *f, __u64 skaddr, struct tcpstate_sock *s, __u8 to)
{
	s->flags &= ~TCPSTATE_SOCK_CLOSE_PENDING;
	inc_transitions(s->prev_state * TCPSTATE_NSTATES + to);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(ctx, f, skaddr, TCPSTATE_EV_TRANSITION, s->prev_state, to, 0, s->close_delta_us, s);
#endif
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != TCPSTATE_IPPROTO_TCP)
		return 0;
	__u8 oldstate = tcpstate_clamp_state(args->oldstate);
	__u8 newstate = tcpstate_clamp_state(args->newstate);
	__u64 skaddr = (__u64)args->skaddr;
	int failed = oldstate == TCPSTATE_TCP_SYN_SENT && newstate == TCPSTATE_TCP_CLOSE;
#ifdef TCPSTATE_SEGS_OUT_AT
	__u32 syns = failed ? segs_out(skaddr) : 0;
	/* connect() failed before its SYN went out (EADDRNOTAVAIL): no conversation on the wire. */
	int silent = failed && syns == 0;
#else
	int silent = 0;  /* cannot tell: as if its SYN went out */
#endif
	/* Unused when a filter copies every flow and port-reuse counting is off. */
	int closes __attribute__((unused)) = tcpstate_records_close(oldstate, newstate) && !silent;
	int role __attribute__((unused)) = tcpstate_opening_role(oldstate);
	struct flow f = {};
#ifdef TCPSTATE_NEED_FLOW
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
	if (!flow_wanted(&f))
		return 0;
#else
	/* Only the transitions that record, look up or blame a 4-tuple copy it. */
	if (closes || role >= 0)
		TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#endif
	__u64 now = bpf_ktime_get_ns();

	struct tcpstate_sock *s = socks.lookup(&skaddr);
	if (!s && (newstate == TCPSTATE_TCP_SYN_SENT || newstate == TCPSTATE_TCP_SYN_RECV ||
		   newstate == TCPSTATE_TCP_LISTEN)) {
		struct tcpstate_sock fresh = {};
		fresh.state_ts_ns = now;
		fresh.state = oldstate;
		/* An LRU map makes room by evicting; user space derives the evictions from these
		 * counts and the entries it finds (probes.socket_table). */
		if (socks.update(&skaddr, &fresh) == 0)
			inc_stats(TCPSTATE_STAT_SOCK_INSERTED);
		s = socks.lookup(&skaddr);
	} else if (!s) {
		inc_stats(TCPSTATE_STAT_SOCK_UNTRACKED);
	}

#if TCPSTATE_MAX_CLOSES > 0
	/* Leaving SYN_SENT or SYN_RECV is where a new connection's 4-tuple is complete (the client's
	 * port may still be 0 at CLOSE->SYN_SENT); its SYN is looked up there, then its end recorded. */
	int opens = role >= 0 && !silent;
	if ((opens || closes) &&
	    reuse_step(&f, opens, tcpstate_syn_time(s ? s->syn_ts_ns : 0, now), closes, now)) {
		inc_port_reuse(role);
		offend(&f, TCPSTATE_OFF_PORT_REUSE, 1, s, now);
	}
#endif
	if (failed)
		offend(&f, TCPSTATE_OFF_CONNECT_FAIL, 1, s, now);
#ifdef TCPSTATE_SEGS_OUT_AT
	if (syns) {
		__u32 idx = TCPSTATE_FAIL_SYNS;
		__u64 *v = connect_fails.lookup(&idx);
		if (v)
			*v += syns;
	}
#endif

	__u8 counted = tcpstate_counted_newstate(oldstate, newstate, s ? s->flags : 0);
	/* An abort sets CLOSE before the reset goes out, and the reset's tracepoint fires only
	 * after the packet was sent (on loopback, after the peer processed it): TIME_WAIT or
	 * CLOSE is decided when this socket's reset or destruction shows up. Untracked
	 * sockets cannot wait and count as TIME_WAIT now. */
#ifdef TCPSTATE_HAVE_TCP_DESTROY_SOCK
	int pending = s && counted == TCPSTATE_TCP_TIME_WAIT && newstate == TCPSTATE_TCP_CLOSE;
#else
	int pending = 0;  /* nothing would end the wait */
#endif
	if (!pending)
		inc_transitions(oldstate * TCPSTATE_NSTATES + counted);

	if (failed && fail_pending(skaddr, args->sport, s != NULL) && s)
		s->flags |= TCPSTATE_SOCK_FAIL_PENDING;

	__u64 delta_us = 0;
	if (s) {
		int accepted = oldstate == TCPSTATE_TCP_LISTEN && newstate == TCPSTATE_TCP_SYN_RECV;
		if (newstate == TCPSTATE_TCP_SYN_SENT || newstate == TCPSTATE_TCP_LISTEN || accepted) {
			/* A new life for the socket (it can connect again after a failure; an entry
			 * left at this address by a socket whose destruction we missed starts over).
			 * A close still pending had no reset, so it was TIME_WAIT. */
			if (s->flags & TCPSTATE_SOCK_CLOSE_PENDING)
				inc_transitions(s->prev_state * TCPSTATE_NSTATES + TCPSTATE_TCP_TIME_WAIT);
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
		if (newstate == TCPSTATE_TCP_SYN_SENT)
			s->syn_ts_ns = now;
		if (newstate == TCPSTATE_TCP_ESTABLISHED) {
			if (oldstate == TCPSTATE_TCP_SYN_SENT && s->syn_ts_ns)
				observe(TCPSTATE_HIST_HANDSHAKE, now - s->syn_ts_ns);
			s->est_ts_ns = now;
		}
		if (newstate == TCPSTATE_TCP_CLOSE && oldstate != TCPSTATE_TCP_CLOSE) {
			/* est_ts_ns stays: a reset sent after an abort's CLOSE still needs it. */
			if (s->est_ts_ns)
				observe(TCPSTATE_HIST_LIFETIME, now - s->est_ts_ns);
			s->prev_state = oldstate;
		}
		if (s->state_ts_ns)
			delta_us = (now - s->state_ts_ns) / 1000;
		s->state_ts_ns = now;
		s->state = newstate;
	}
	if (pending) {
		s->flags |= TCPSTATE_SOCK_CLOSE_PENDING;
		s->close_delta_us = delta_us;
		return 0;
	}
#ifdef TCPSTATE_EMIT_EVENTS
	emit(args, &f, skaddr, TCPSTATE_EV_TRANSITION, oldstate, counted, 0, delta_us, s);
#endif
	return 0;
}

#ifdef TCPSTATE_HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
	struct flow f = {};
#ifdef TCPSTATE_SEND_RESET_SOCKADDR
	/* saddr/daddr are sockaddr_in/sockaddr_in6 images: family, port (network order), address. */
	f.family = args->saddr[0] | (args->saddr[1] << 8);
	f.sport = (args->saddr[2] << 8) | args->saddr[3];
	f.dport = (args->daddr[2] << 8) | args->daddr[3];
	if (f.family == TCPSTATE_AF_INET) {
		__builtin_memcpy(f.saddr, args->saddr + 4, 4);
		__builtin_memcpy(f.daddr, args->daddr + 4, 4);
	} else {
		__builtin_memcpy(f.saddr, args->saddr + 8, 16);
		__builtin_memcpy(f.daddr, args->daddr + 8, 16);
	}
	TCPSTATE_FLOW_BARRIER();
#elif defined(TCPSTATE_SEND_RESET_HAS_FAMILY)
	TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#else
	TCPSTATE_FLOW_FROM_MAPPED(&f, args);
#endif
	if (!flow_wanted(&f))
		return 0;

	__u64 skaddr = (__u64)args->skaddr;
	struct tcpstate_sock *s = NULL;
	if (skaddr)
		s = socks.lookup(&skaddr);
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
	__u8 state = tcpstate_reset_state(skaddr != 0, tp_state, s != NULL, s ? s->state : 0,
					  s ? s->prev_state : 0);
	/* A socket that sends a reset before it closes (keepalive or FIN_WAIT2 timeout)
	 * is not entering TIME_WAIT; one that closed just before its reset was aborted. */
	if (s && s->state != TCPSTATE_TCP_CLOSE)
		s->flags |= TCPSTATE_SOCK_RESET_SEEN;
	if (s && (s->flags & TCPSTATE_SOCK_CLOSE_PENDING))
		close_resolve(args, &f, skaddr, s, TCPSTATE_TCP_CLOSE);
	inc_resets((TCPSTATE_DIR_SENT * TCPSTATE_NSTATES + state) * TCPSTATE_NREASONS + reason);
	__u64 now = bpf_ktime_get_ns();
	offend(&f, TCPSTATE_OFF_RESET_SENT, skaddr != 0, s, now);
#ifdef TCPSTATE_SEND_RESET_SKB_FLAGS
	if (!skaddr)
		reset_for_no_socket(&f, skb_tcp_flags((const void *)args->skbaddr), now);
#endif
	if (s && tcpstate_early_reset(s->est_ts_ns, now, setting(TCPSTATE_SET_EARLY_RESET_NS), s->flags)) {
		s->flags |= TCPSTATE_SOCK_EARLY_RESET;
		inc_resets_after_hs(TCPSTATE_DIR_SENT * TCPSTATE_NROLES + tcpstate_sock_role(s->flags));
		offend(&f, TCPSTATE_OFF_EARLY_RESET, 1, s, now);
	}
#ifdef TCPSTATE_EMIT_EVENTS
	emit(args, &f, skaddr, TCPSTATE_EV_RESET_SENT, state, state, reason, 0, s);
#endif
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
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
	__u8 state = TCPSTATE_STATE_UNKNOWN;
	if (s) {
		state = tcpstate_clamp_state(s->state);
		s->flags |= TCPSTATE_SOCK_RESET_SEEN;
	}
	inc_resets((TCPSTATE_DIR_RECEIVED * TCPSTATE_NSTATES + state) * TCPSTATE_NREASONS +
		      TCPSTATE_REASON_UNKNOWN);
	__u64 now = bpf_ktime_get_ns();
	offend(&f, TCPSTATE_OFF_RESET_RECEIVED, 1, s, now);
	/* What an on-path device rejecting requests looks like: a reset right after the handshake. */
	if (s && tcpstate_early_reset(s->est_ts_ns, now, setting(TCPSTATE_SET_EARLY_RESET_NS), s->flags)) {
		s->flags |= TCPSTATE_SOCK_EARLY_RESET;
		inc_resets_after_hs(TCPSTATE_DIR_RECEIVED * TCPSTATE_NROLES + tcpstate_sock_role(s->flags));
		offend(&f, TCPSTATE_OFF_EARLY_RESET, 1, s, now);
	}
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
	__u16 sport = args->sport;
	if (pending_fails.lookup(&sport)) {
		pending_fails.delete(&sport);
		inc_connect_fails(tcpstate_failure_class(args->error));
	}
	return 0;
}
#endif

#ifdef TCPSTATE_HAVE_TCP_DESTROY_SOCK
TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
	__u64 skaddr = (__u64)args->skaddr;
	struct tcpstate_sock *s = socks.lookup(&skaddr);
#ifdef TCPSTATE_SK_ERR_AT
	if (s && (s->flags & TCPSTATE_SOCK_FAIL_PENDING)) {  /* abandoned: ECONNRESET with SO_LINGER {1, 0} */
		s->flags &= ~TCPSTATE_SOCK_FAIL_PENDING;
		inc_connect_fails(tcpstate_failure_class(sk_error(skaddr)));
	}
#else
	/* Only sockets whose connect failed (or that we never tracked) can wait there: this
	 * keeps a hash lookup off the destruction of every other socket. */
	if (!s || (s->flags & TCPSTATE_SOCK_FAIL_PENDING)) {
		__u16 sport = args->sport;
		struct pending_fail *pf = pending_fails.lookup(&sport);
		if (pf && pf->skaddr == skaddr) {  /* destroyed without an error report: abandoned */
			pending_fails.delete(&sport);
			inc_connect_fails(TCPSTATE_FAIL_OTHER);
		}
	}
#endif
	if (s && (s->flags & TCPSTATE_SOCK_CLOSE_PENDING)) {
#if defined(TCPSTATE_NEED_FLOW) && defined(TCPSTATE_DESTROY_SOCK_HAS_FAMILY)
		struct flow f = {};
		TCPSTATE_FLOW_FROM_FIELDS(&f, args);
#elif defined(TCPSTATE_NEED_FLOW)
		struct flow f = {};
		TCPSTATE_FLOW_FROM_MAPPED(&f, args);
#else
		struct flow f;
#endif
		close_resolve(args, &f, skaddr, s, TCPSTATE_TCP_TIME_WAIT);
	}
	/* Frees the slot at once instead of waiting for LRU eviction. */
	if (s && socks.delete(&skaddr) == 0)
		inc_stats(TCPSTATE_STAT_SOCK_FREED);
	return 0;
}
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
	inc_resets((TCPSTATE_DIR_SENT * TCPSTATE_NSTATES + TCPSTATE_STATE_NONE) * TCPSTATE_NREASONS +
		   TCPSTATE_REASON_NO_SOCKET);
	__u64 now = bpf_ktime_get_ns();
	offend(&f, TCPSTATE_OFF_RESET_SENT, 0, NULL, now);
	reset_for_no_socket(&f, tcp[13], now);
#ifdef TCPSTATE_EMIT_EVENTS
	emit(ctx, &f, 0, TCPSTATE_EV_RESET_SENT, TCPSTATE_STATE_NONE, TCPSTATE_STATE_NONE, TCPSTATE_REASON_NO_SOCKET,
	     0, NULL);
#endif
	return 0;
}
#endif

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
	TCPSTATE_RETURN_IF_UNWANTED(TCPSTATE_RETRANSMIT_SKB_FLOW);
	__u8 state = tcpstate_clamp_state(args->state);
	inc_retransmits(state);
	if (state == TCPSTATE_TCP_SYN_SENT)
		inc_syn_retrans(TCPSTATE_ROLE_CLIENT);
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
	TCPSTATE_RETURN_IF_UNWANTED(TCPSTATE_RETRANSMIT_SYNACK_FLOW);
	inc_retransmits(TCPSTATE_TCP_SYN_RECV);
	inc_syn_retrans(TCPSTATE_ROLE_SERVER);
	return 0;
}
#endif
