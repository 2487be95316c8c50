"""aggregator.py: turn raw in-kernel counter arrays into named transitions, resets, opens, failures and histograms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from monitor.kernel.abi import (
    DIRECTIONS,
    FAILURE_REASONS,
    HIST_BOUNDS_SECONDS,
    ROLES,
    C,
    reason_name,
)
from monitor.tcp import NUMBERS, state_name

NSTATES = C["TCPSTATE_NSTATES"]
NREASONS = C["TCPSTATE_NREASONS"]
NBOUNDS = C["TCPSTATE_HIST_NBOUNDS"]
STRIDE = C["TCPSTATE_HIST_STRIDE"]


@dataclass(frozen=True)
class RawCounters:
    """Per-key sums over CPUs of each counter map, in map index order."""

    transitions: tuple
    resets: tuple
    connect_fails: tuple
    durations: tuple
    stats: tuple
    port_reuse: tuple = (0,) * C["TCPSTATE_NROLES"]
    resets_after_hs: tuple = (0,) * C["TCPSTATE_NRESETS_AFTER_HS"]
    retransmits: tuple = (0,) * NSTATES
    syn_retrans: tuple | None = None  # None: this kernel has no retransmit tracepoint to count them


class SocketTable(NamedTuple):
    """The per-socket table (socks): its size, the entries in it now, and the sockets pushed out
    of it by the LRU before they were destroyed (derived; see Probes.socket_table)."""

    capacity: int
    entries: int
    evictions: int


@dataclass(frozen=True)
class Histogram:
    buckets: tuple  # ((upper_bound_seconds, cumulative_count), ...) ending with (inf, count)
    count: int
    sum_seconds: float


@dataclass
class Counts:
    transitions: dict = field(default_factory=dict)  # (from, to) -> n, non-zero only
    resets: dict = field(default_factory=dict)  # (direction, state, reason) -> n, non-zero only
    opened: dict = field(default_factory=dict)  # active|passive -> n
    failures: dict = field(default_factory=dict)  # refused|timeout|reset|other -> n
    failed_connect_syns: int | None = None  # SYNs the failed connects sent; None where the kernel cannot tell
    handshake: Histogram | None = None
    lifetime: Histogram | None = None
    events_lost: int = 0  # kernel-skipped runs plus ring-buffer drops
    programs: dict = field(default_factory=dict)  # tracepoint -> ProgramStats-like (run_time_ns, run_cnt, recursion_misses)
    untracked_transitions: int = 0
    port_reuse: dict = field(default_factory=dict)  # client|server -> n
    resets_after_handshake: dict = field(default_factory=dict)  # (sent|received, client|server) -> n
    retransmits: dict = field(default_factory=dict)  # state -> retransmitted segments, non-zero only
    syn_retransmits: dict | None = None  # client|server -> re-sent SYNs / SYN-ACKs; None when not counted
    socket_table: SocketTable | None = None  # read at scrapes only: counting the entries walks the table


def _histogram(raw: tuple, which: int) -> Histogram:
    base = which * STRIDE
    cumulative = 0
    buckets = []
    for i, bound in enumerate(HIST_BOUNDS_SECONDS):
        cumulative += raw[base + i]
        buckets.append((bound, cumulative))
    cumulative += raw[base + NBOUNDS]
    buckets.append((float("inf"), cumulative))
    return Histogram(buckets=tuple(buckets), count=cumulative, sum_seconds=raw[base + NBOUNDS + 1] / 1e9)


def aggregate(raw: RawCounters, reasons: dict[int, str], programs: dict | None = None,
              socket_table: SocketTable | None = None) -> Counts:
    """Name every non-zero counter; derive opens from the transitions."""
    counts = Counts(programs=dict(programs or {}), socket_table=socket_table)
    for idx, n in enumerate(raw.transitions):
        if n:
            counts.transitions[(state_name(idx // NSTATES), state_name(idx % NSTATES))] = n
    for idx, n in enumerate(raw.resets):
        if n:
            direction, rest = divmod(idx, NSTATES * NREASONS)
            state, reason = divmod(rest, NREASONS)
            key = (DIRECTIONS[direction], state_name(state), reason_name(reasons, reason))
            counts.resets[key] = counts.resets.get(key, 0) + n
    est = NUMBERS["ESTABLISHED"]
    counts.opened = {
        "active": raw.transitions[NUMBERS["SYN_SENT"] * NSTATES + est],
        "passive": raw.transitions[NUMBERS["SYN_RECV"] * NSTATES + est],
    }
    counts.failures = dict(zip(FAILURE_REASONS, raw.connect_fails[:C["TCPSTATE_NFAILS"]]))
    syns = raw.connect_fails[C["TCPSTATE_FAIL_SYNS"]:C["TCPSTATE_FAIL_SYNS"] + 1]  # absent: not counted here
    counts.failed_connect_syns = syns[0] if syns else None
    counts.handshake = _histogram(raw.durations, C["TCPSTATE_HIST_HANDSHAKE"])
    counts.lifetime = _histogram(raw.durations, C["TCPSTATE_HIST_LIFETIME"])
    counts.events_lost = raw.stats[C["TCPSTATE_STAT_EVENTS_LOST"]] + sum(p[2] for p in counts.programs.values())
    counts.untracked_transitions = raw.stats[C["TCPSTATE_STAT_SOCK_UNTRACKED"]]
    counts.port_reuse = dict(zip(ROLES, raw.port_reuse))
    counts.resets_after_handshake = {(d, r): raw.resets_after_hs[i * len(ROLES) + j]
                                     for i, d in enumerate(DIRECTIONS) for j, r in enumerate(ROLES)}
    counts.retransmits = {state_name(i): n for i, n in enumerate(raw.retransmits) if n}
    if raw.syn_retrans is not None:
        counts.syn_retransmits = dict(zip(ROLES, raw.syn_retrans))
    return counts


def empty_raw() -> RawCounters:
    return RawCounters(
        transitions=(0,) * C["TCPSTATE_NTRANSITIONS"],
        resets=(0,) * C["TCPSTATE_NRESETS"],
        connect_fails=(0,) * C["TCPSTATE_NFAIL_SLOTS"],
        durations=(0,) * (C["TCPSTATE_NHIST"] * STRIDE),
        stats=(0,) * C["TCPSTATE_NSTATS"],
        port_reuse=(0,) * C["TCPSTATE_NROLES"],
        resets_after_hs=(0,) * C["TCPSTATE_NRESETS_AFTER_HS"],
        retransmits=(0,) * NSTATES,
        syn_retrans=(0,) * C["TCPSTATE_NROLES"],
    )
