"""kernel.py: the in-kernel counters read at scrape time: transitions, resets, opens, failures, port reuse, retransmissions, durations, the programs' own stats."""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client.registry import Collector

from monitor.kernel.abi import DIRECTIONS, FAILURE_REASONS, ROLES
from monitor.kernel.counters import Counts
from monitor.serve.collectors import Family, families, one

log = logging.getLogger(__name__)

BUILD_LABELS = ("bcc_version", "kernel", "send_reset_layout", "version")


def _programs(index: int, scale: float = 1.0):
    """One field of each program's (run_time_ns, run_cnt, recursion_misses), by tracepoint."""
    return lambda c: [((tp,), stats[index] / scale) for tp, stats in sorted(c.programs.items())]


HEAD = (  # the source: the collector itself
    Family("tcpstate_build_info", "gauge", "tcpstate version and the kernel it runs on; always 1.", BUILD_LABELS,
           lambda k: [(tuple(k.build[name] for name in BUILD_LABELS), 1)]),
    Family("tcpstate_probe_attached", "gauge", "1 if the tracepoint is attached, 0 if this kernel lacks it or it "
           "failed.", ("tracepoint",), lambda k: [((tp,), 1 if ok else 0) for tp, ok in sorted(k.attached().items())]),
)
READ_ERRORS = Family("tcpstate_map_read_errors", "counter", "Scrapes whose in-kernel counter read failed.", (),
                     lambda k: one(k.read_errors))


COUNTS = (
    Family("tcpstate_transitions", "counter", "TCP state transitions; FIN_WAIT2/CLOSING->CLOSE not caused by a reset "
           "is counted as ->TIME_WAIT.", ("from_state", "to_state"), lambda c: sorted(c.transitions.items())),
    Family("tcpstate_resets", "counter", "TCP resets by direction, the state the connection was in, and the kernel's "
           "reason.", ("direction", "state", "reason"), lambda c: sorted(c.resets.items())),
    Family("tcpstate_connections_opened", "counter", "Connections that reached ESTABLISHED: active (connect) or "
           "passive (accept).", ("direction",), lambda c: [((d,), c.opened.get(d, 0)) for d in ("active", "passive")]),
    Family("tcpstate_connect_failures", "counter", "Connects that went SYN_SENT->CLOSE, by the socket error.",
           ("reason",), lambda c: [((r,), c.failures.get(r, 0)) for r in FAILURE_REASONS]),
    Family("tcpstate_port_reuse", "counter", "New SYNs on a 4-tuple (addresses and ports) whose previous connection "
           "ended (FIN, RST, refused or timed out) within the reuse window, as Wireshark flags \"TCP Port numbers "
           "reused\"; by this host's end: client (sent the SYN) or server (received it).", ("role",),
           lambda c: [((r,), c.port_reuse.get(r, 0)) for r in ROLES]),
    Family("tcpstate_resets_after_handshake", "counter", "Connections reset soon after ESTABLISHED "
           "(reset_after_handshake.within_seconds), by the reset's direction and this host's end; received by a "
           "client is what an on-path device rejecting requests looks like.", ("direction", "role"),
           lambda c: [((d, r), c.resets_after_handshake.get((d, r), 0)) for d in DIRECTIONS for r in ROLES]),
    Family("tcpstate_retransmits", "counter", "Segments sent again (SYN-ACKs included), by the state the connection "
           "was in: Wireshark's tcp.analysis.retransmission in a capture on this host.", ("state",),
           lambda c: sorted(((s,), n) for s, n in c.retransmits.items())),
    Family("tcpstate_syn_retransmits", "counter", "SYNs re-sent from SYN_SENT (client) and SYN-ACKs re-sent from "
           "SYN_RECV (server): the first sign of loss, a full SYN queue or a silent firewall.", ("role",),
           lambda c: None if c.syn_retransmits is None else [((r,), c.syn_retransmits.get(r, 0)) for r in ROLES]),
    Family("tcpstate_handshake_duration_seconds", "histogram", "Time from SYN_SENT to ESTABLISHED, one per active "
           "open.", (), lambda c: c.handshake),
    Family("tcpstate_connection_duration_seconds", "histogram", "Time from ESTABLISHED until the socket closes or "
           "enters TIME_WAIT, one per socket.", (), lambda c: c.lifetime),
    Family("tcpstate_events_lost", "counter", "Tracepoint hits known not to be counted: runs the kernel skipped and "
           "reported (tcpstate_probe_misses_total) plus watch records dropped by a full ring buffer.", (),
           lambda c: one(c.events_lost)),
    Family("tcpstate_probe_misses", "counter", "Program runs the kernel skipped because another BPF program was "
           "running on the same CPU (a softirq interrupting it); their events are not counted.", ("tracepoint",),
           _programs(2)),
    Family("tcpstate_probe_run_seconds", "counter", "CPU time in the tracepoint program (0 unless "
           "kernel.bpf_stats_enabled=1).", ("tracepoint",), _programs(0, 1e9)),
    Family("tcpstate_probe_runs", "counter", "Runs of the tracepoint program (0 unless kernel.bpf_stats_enabled=1).",
           ("tracepoint",), _programs(1)),
    Family("tcpstate_untracked_transitions", "counter", "Transitions of sockets not in the socket table (opened "
           "before tcpstate started, or evicted) among those that look it up: every one, or where BTF gives the "
           "socket's state only those into SYN_SENT, SYN_RECV, LISTEN, ESTABLISHED and CLOSE; their durations are "
           "not observed.", (),
           lambda c: one(c.untracked_transitions)),
)

SOCKET_TABLE = (  # read at scrapes only: counting the entries walks the table
    Family("tcpstate_socket_table_capacity", "gauge", "Sockets the in-kernel per-socket table holds "
           "(--max-sockets).", (), lambda t: one(t.capacity)),
    Family("tcpstate_socket_table_entries", "gauge", "Sockets in the per-socket table now.", (),
           lambda t: one(t.entries)),
    Family("tcpstate_socket_table_evictions", "counter", "Sockets pushed out of the full per-socket table (LRU) "
           "while still open; their later transitions count as untracked. Derived from inserts, frees and entries; "
           "under churn it errs low by the churn of one scrape.", (), lambda t: one(t.evictions)),
)


class KernelCollector(Collector):
    """read_counts: the current Counts (Probes.counts, or recorded data in tests). attached:
    tracepoint -> bool. build: the labels of tcpstate_build_info (BUILD_LABELS)."""

    def __init__(self, read_counts: Callable[[], Counts], attached: Callable[[], dict], build: dict):
        self._read_counts = read_counts
        self.attached = attached
        self.build = build
        self.read_errors = 0

    def collect(self):
        yield from families(HEAD, self)
        try:
            counts = self._read_counts()
        except Exception:  # a failed map read must not break the other metrics of the scrape
            log.exception("reading the in-kernel counters failed")
            self.read_errors += 1
            counts = None
        yield READ_ERRORS.build(self)
        if counts is None:
            return
        yield from families(COUNTS, counts)
        if counts.socket_table is not None:
            yield from families(SOCKET_TABLE, counts.socket_table)
