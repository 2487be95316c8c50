/* tcpstate.h: the layout shared by bpf/tcpstate.c and monitor/events.py (constants, map indexes, structs). */
#ifndef TCPSTATE_H
#define TCPSTATE_H

#include <linux/types.h>

/* Kernel TCP states are 1..13; 0 and 15 are ours. */
#define TCPSTATE_NSTATES 16
#define TCPSTATE_STATE_NONE 0     /* a reset sent where no socket matched */
#define TCPSTATE_STATE_UNKNOWN 15 /* a socket we never saw enter a state */

/* Kernel state numbers (include/net/tcp_states.h), stable since 2.6. */
#define TCPSTATE_TCP_ESTABLISHED 1
#define TCPSTATE_TCP_SYN_SENT 2
#define TCPSTATE_TCP_SYN_RECV 3
#define TCPSTATE_TCP_FIN_WAIT1 4
#define TCPSTATE_TCP_FIN_WAIT2 5
#define TCPSTATE_TCP_TIME_WAIT 6
#define TCPSTATE_TCP_CLOSE 7
#define TCPSTATE_TCP_CLOSE_WAIT 8
#define TCPSTATE_TCP_LAST_ACK 9
#define TCPSTATE_TCP_LISTEN 10
#define TCPSTATE_TCP_CLOSING 11

/* Reset reasons: the kernel's enum sk_rst_reason values below 63; 63 is "UNKNOWN"
 * (a received reset, a kernel without the reason field, or a value out of range). */
#define TCPSTATE_NREASONS 64
#define TCPSTATE_REASON_UNKNOWN 63
/* A reset sent where no socket matched: the kernel's SK_RST_REASON_NO_SOCKET (>= 6.10), and the
 * reason tcpstate gives such resets on kernels that report them another way (skb:kfree_skb). */
#define TCPSTATE_REASON_NO_SOCKET 1

#define TCPSTATE_DIR_SENT 0
#define TCPSTATE_DIR_RECEIVED 1

/* resets_total index: (direction * NSTATES + state) * NREASONS + reason */
#define TCPSTATE_NRESETS (2 * TCPSTATE_NSTATES * TCPSTATE_NREASONS)
/* transitions_total index: oldstate * NSTATES + newstate (newstate after TIME_WAIT inference) */
#define TCPSTATE_NTRANSITIONS (TCPSTATE_NSTATES * TCPSTATE_NSTATES)

#define TCPSTATE_FAIL_REFUSED 0
#define TCPSTATE_FAIL_TIMEOUT 1
#define TCPSTATE_FAIL_RESET 2
#define TCPSTATE_FAIL_OTHER 3
#define TCPSTATE_NFAILS 4
/* connect_fails holds the failures by class, then the SYNs those failed connects sent. */
#define TCPSTATE_FAIL_SYNS 4
#define TCPSTATE_NFAIL_SLOTS 5

/* TCP header flags (byte 13), for the segments the kernel answers with a reset for no socket. */
#define TCPSTATE_TH_SYN 2
#define TCPSTATE_TH_RST 4
#define TCPSTATE_TH_ACK 16

/* Histogram upper bounds in microseconds. Fine at the low end (loopback handshakes
 * take tens of us) and around the SYN retransmission times (1 s, 3 s, 7 s). */
#define TCPSTATE_HIST_BOUNDS_US { 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2000000, 4000000, 8000000, 16000000, 32000000, 64000000, 128000000, 300000000, 900000000, 3600000000 }
#define TCPSTATE_HIST_NBOUNDS 24
/* Per histogram: NBOUNDS finite buckets, one +Inf bucket, then the sum in ns. */
#define TCPSTATE_HIST_STRIDE (TCPSTATE_HIST_NBOUNDS + 2)
#define TCPSTATE_HIST_HANDSHAKE 0
#define TCPSTATE_HIST_LIFETIME 1
#define TCPSTATE_NHIST 2

/* stats index */
#define TCPSTATE_STAT_EVENTS_LOST 0    /* ring buffer full (watch only) */
#define TCPSTATE_STAT_SOCK_UNTRACKED 1 /* a transition of a socket not in socks */
#define TCPSTATE_STAT_SOCK_INSERTED 2  /* entries added to socks */
#define TCPSTATE_STAT_SOCK_FREED 3     /* entries removed at the socket's destruction (not by LRU eviction) */
#define TCPSTATE_NSTATS 4

/* probe_skips index: tcpstate's programs, in the order of monitor/kernel/tracefs.TRACEPOINTS. */
#define TCPSTATE_PROG_INET_SOCK_SET_STATE 0
#define TCPSTATE_PROG_TCP_SEND_RESET 1
#define TCPSTATE_PROG_TCP_RECEIVE_RESET 2
#define TCPSTATE_PROG_INET_SK_ERROR_REPORT 3
#define TCPSTATE_PROG_TCP_DESTROY_SOCK 4
#define TCPSTATE_PROG_KFREE_SKB 5
#define TCPSTATE_PROG_TCP_RETRANSMIT_SKB 6
#define TCPSTATE_PROG_TCP_RETRANSMIT_SYNACK 7
#define TCPSTATE_NPROGS 8

/* Event kinds for the watch stream */
#define TCPSTATE_EV_TRANSITION 0
#define TCPSTATE_EV_RESET_SENT 1
#define TCPSTATE_EV_RESET_RECEIVED 2

#define TCPSTATE_COMM_LEN 16

#define TCPSTATE_SOCK_RESET_SEEN 1     /* a reset hit the socket: its close is no TIME_WAIT */
#define TCPSTATE_SOCK_CLOSE_PENDING 2  /* FIN_WAIT2/CLOSING->CLOSE waits for its reset or destruction */
#define TCPSTATE_SOCK_FAIL_PENDING 4   /* its failed connect may wait in pending_fails */
#define TCPSTATE_SOCK_PASSIVE 8        /* an accepted connection (LISTEN->SYN_RECV), not a connect() */
#define TCPSTATE_SOCK_EARLY_RESET 16   /* already counted in resets_after_hs */

/* Which end of a connection this host's socket is: it connected (client) or accepted (server).
 * port_reuse and syn_retrans index: role; resets_after_hs index: direction * NROLES + role.
 * retransmits index: the state the connection was in. */
#define TCPSTATE_ROLE_CLIENT 0
#define TCPSTATE_ROLE_SERVER 1
#define TCPSTATE_NROLES 2
#define TCPSTATE_NRESETS_AFTER_HS (2 * TCPSTATE_NROLES)

/* settings index: values user space writes after loading (nanoseconds; 0 turns the check off) */
#define TCPSTATE_SET_REUSE_WINDOW_NS 0  /* a new connection on a 4-tuple closed this recently is a reuse */
#define TCPSTATE_SET_EARLY_RESET_NS 1   /* a reset this soon after ESTABLISHED is "after the handshake" */
#define TCPSTATE_SET_OFFENDER_IDLE_NS 2 /* an offender silent this long starts counting again from 0 */
#define TCPSTATE_NSETTINGS 3

/* Kinds of the offenders table: who the resets, failures and reuses are with. */
#define TCPSTATE_OFF_RESET_SENT 0
#define TCPSTATE_OFF_RESET_RECEIVED 1
#define TCPSTATE_OFF_CONNECT_FAIL 2
#define TCPSTATE_OFF_PORT_REUSE 3
#define TCPSTATE_OFF_EARLY_RESET 4
#define TCPSTATE_NOFFKINDS 5

/* recent_closes is a set-associative cache of closed 4-tuples: no locks, no allocation, one cache
 * line per lookup (an LRU hash cost most of the program's time under churn). A slot is one u64,
 * written in one store: a 32-bit tag (hash) of the 4-tuple above the close time in ticks of
 * 2^TICK_SHIFT ns (about 1 ms; 0 means empty). A full set forgets its oldest close. */
#define TCPSTATE_CLOSE_WAYS 8
#define TCPSTATE_CLOSE_TICK_SHIFT 20
struct tcpstate_close_set {
	__u64 slot[TCPSTATE_CLOSE_WAYS];
};

/* Per-socket memory (value of the socks LRU table, keyed by socket address). */
struct tcpstate_sock {
	__u64 state_ts_ns; /* when the current state was entered */
	__u64 syn_ts_ns;   /* when SYN_SENT was entered; 0 if never */
	__u64 est_ts_ns;   /* when ESTABLISHED was entered; 0 if never in this life of the socket */
	__u64 close_delta_us; /* time in the state left by a pending close */
	__u32 pid;         /* tgid of the process that called connect()/listen(); 0 if unknown */
	__u8 state;        /* current state */
	__u8 prev_state;   /* the state left when the socket moved to CLOSE */
	__u8 flags;        /* TCPSTATE_SOCK_* */
	__u8 pad;
	char comm[TCPSTATE_COMM_LEN];
};

/* One record of the watch stream; ordered by alignment, mirrored in monitor/events.py. */
struct tcpstate_event {
	__u64 ts_ns;      /* bpf_ktime_get_ns() */
	__u64 skaddr;
	__u64 delta_us;   /* time spent in oldstate; 0 if unknown */
	__u32 pid;
	__u16 family;
	__u16 sport;      /* host byte order */
	__u16 dport;
	__u8 kind;        /* TCPSTATE_EV_* */
	__u8 oldstate;    /* for resets: the attributed state */
	__u8 newstate;
	__u8 reason;
	__u8 pad[2];
	__u8 saddr[16];   /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	char comm[TCPSTATE_COMM_LEN];
};

/* Key of the offenders table: the peer, and the ports that name the service. The side whose
 * port is ephemeral (the connecting end's) has port 0, so one peer hammering one service is one
 * entry; port reuse keeps both ports (the reused port is the point). */
struct tcpstate_offender_key {
	__u8 raddr[16];   /* IPv4 in the first 4 bytes */
	__u16 family;
	__u16 rport;      /* host byte order; 0: not kept */
	__u16 lport;
	__u8 kind;        /* TCPSTATE_OFF_* */
	__u8 pad;
};

struct tcpstate_offender {
	__u64 count;      /* since first_ns */
	__u64 first_ns;   /* bpf_ktime_get_ns() (CLOCK_MONOTONIC); restarts after an idle gap */
	__u64 last_ns;
	__u32 pid;        /* tgid of the process that opened the socket; 0 if unknown */
	__u32 pad;
	char comm[TCPSTATE_COMM_LEN];
};

/* Key of the CIDR filter tries (BPF LPM trie keys start with the prefix length). */
struct tcpstate_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct tcpstate_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

#endif /* TCPSTATE_H */
