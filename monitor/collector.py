"""collector.py: a Prometheus Collector that reads the in-kernel counters at scrape time and yields fresh metric families."""

from __future__ import annotations

import logging
import math
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .aggregator import Counts, Histogram
from .events import FAILURE_REASONS

log = logging.getLogger(__name__)


def _hist_family(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if math.isinf(b) else repr(b), c) for b, c in hist.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum_seconds)


class TcpstateCollector(Collector):
    """read_counts: returns the current Counts (from the probes, or recorded data in tests).
    attached: tracepoint -> bool. build: labels of tcpstate_build_info."""

    def __init__(self, read_counts: Callable[[], Counts], attached: Callable[[], dict], build: dict):
        self._read_counts = read_counts
        self._attached = attached
        self._build = build
        self._read_errors = 0

    def collect(self):
        build = GaugeMetricFamily("tcpstate_build_info", "tcpstate version and the kernel it runs on; always 1.",
                                  labels=sorted(self._build))
        build.add_metric([self._build[k] for k in sorted(self._build)], 1)
        yield build

        attached = GaugeMetricFamily("tcpstate_probe_attached",
                                     "1 if the tracepoint is attached, 0 if this kernel lacks it or it failed.",
                                     labels=["tracepoint"])
        for tp, ok in sorted(self._attached().items()):
            attached.add_metric([tp], 1 if ok else 0)
        yield attached

        try:
            counts = self._read_counts()
        except Exception:  # a failed map read must not break the other metrics of the scrape
            log.exception("reading the in-kernel counters failed")
            self._read_errors += 1
            counts = None
        yield CounterMetricFamily("tcpstate_map_read_errors", "Scrapes whose in-kernel counter read failed.",
                                  value=self._read_errors)
        if counts is None:
            return

        transitions = CounterMetricFamily(
            "tcpstate_transitions", "TCP state transitions; FIN_WAIT2/CLOSING->CLOSE not caused by a reset "
            "is counted as ->TIME_WAIT.", labels=["from_state", "to_state"])
        for (old, new), n in sorted(counts.transitions.items()):
            transitions.add_metric([old, new], n)
        yield transitions

        resets = CounterMetricFamily(
            "tcpstate_resets", "TCP resets by direction, the state the connection was in, and the kernel's reason.",
            labels=["direction", "state", "reason"])
        for (direction, state, reason), n in sorted(counts.resets.items()):
            resets.add_metric([direction, state, reason], n)
        yield resets

        opened = CounterMetricFamily("tcpstate_connections_opened",
                                     "Connections that reached ESTABLISHED: active (connect) or passive (accept).",
                                     labels=["direction"])
        for direction in ("active", "passive"):
            opened.add_metric([direction], counts.opened.get(direction, 0))
        yield opened

        failures = CounterMetricFamily("tcpstate_connect_failures",
                                       "Connects that went SYN_SENT->CLOSE, by the socket error.", labels=["reason"])
        for reason in FAILURE_REASONS:
            failures.add_metric([reason], counts.failures.get(reason, 0))
        yield failures

        yield _hist_family("tcpstate_handshake_duration_seconds",
                           "Time from SYN_SENT to ESTABLISHED, one per active open.", counts.handshake)
        yield _hist_family("tcpstate_connection_duration_seconds",
                           "Time from ESTABLISHED until the socket closes or enters TIME_WAIT, one per socket.",
                           counts.lifetime)

        yield CounterMetricFamily("tcpstate_events_lost",
                                  "Tracepoint hits known not to be counted: runs the kernel skipped and reported "
                                  "(tcpstate_probe_misses_total) plus watch records dropped by a full ring buffer.",
                                  value=counts.events_lost)
        misses = CounterMetricFamily("tcpstate_probe_misses",
                                     "Program runs the kernel skipped because another BPF program was running on "
                                     "the same CPU (a softirq interrupting it); their events are not counted.",
                                     labels=["tracepoint"])
        run_seconds = CounterMetricFamily("tcpstate_probe_run_seconds",
                                          "CPU time in the tracepoint program (0 unless kernel.bpf_stats_enabled=1).",
                                          labels=["tracepoint"])
        runs = CounterMetricFamily("tcpstate_probe_runs",
                                   "Runs of the tracepoint program (0 unless kernel.bpf_stats_enabled=1).",
                                   labels=["tracepoint"])
        for tp, (run_time_ns, run_cnt, recursion_misses) in sorted(counts.programs.items()):
            misses.add_metric([tp], recursion_misses)
            run_seconds.add_metric([tp], run_time_ns / 1e9)
            runs.add_metric([tp], run_cnt)
        yield misses
        yield run_seconds
        yield runs
        yield CounterMetricFamily("tcpstate_untracked_transitions",
                                  "Transitions of sockets not in the socket table (opened before tcpstate "
                                  "started, or evicted); their durations are not observed.",
                                  value=counts.untracked_transitions)
