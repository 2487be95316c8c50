"""collector.py: a Prometheus Collector that reads the in-kernel counters at scrape time and yields fresh metric families."""

from __future__ import annotations

import logging
import math
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .aggregator import Counts, Histogram
from .events import DIRECTIONS, FAILURE_REASONS, ROLES

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

        reuse = CounterMetricFamily("tcpstate_port_reuse",
                                    "New SYNs on a 4-tuple (addresses and ports) whose previous connection ended "
                                    "(FIN, RST, refused or timed out) within the reuse window, as Wireshark flags "
                                    "\"TCP Port numbers reused\"; by this host's end: client (sent the SYN) or "
                                    "server (received it).", labels=["role"])
        for role in ROLES:
            reuse.add_metric([role], counts.port_reuse.get(role, 0))
        yield reuse
        early = CounterMetricFamily("tcpstate_resets_after_handshake",
                                    "Connections reset soon after ESTABLISHED (reset_after_handshake.within_seconds), "
                                    "by the reset's direction and this host's end; received by a client is what an "
                                    "on-path device rejecting requests looks like.", labels=["direction", "role"])
        for direction in DIRECTIONS:
            for role in ROLES:
                early.add_metric([direction, role], counts.resets_after_handshake.get((direction, role), 0))
        yield early

        retransmits = CounterMetricFamily("tcpstate_retransmits",
                                          "Segments sent again (SYN-ACKs included), by the state the connection was "
                                          "in: Wireshark's tcp.analysis.retransmission in a capture on this host.",
                                          labels=["state"])
        for state, n in sorted(counts.retransmits.items()):
            retransmits.add_metric([state], n)
        yield retransmits
        if counts.syn_retransmits is not None:
            syn = CounterMetricFamily("tcpstate_syn_retransmits",
                                      "SYNs re-sent from SYN_SENT (client) and SYN-ACKs re-sent from SYN_RECV "
                                      "(server): the first sign of loss, a full SYN queue or a silent firewall.",
                                      labels=["role"])
            for role in ROLES:
                syn.add_metric([role], counts.syn_retransmits.get(role, 0))
            yield syn

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
        table = counts.socket_table
        if table is not None:
            yield GaugeMetricFamily("tcpstate_socket_table_capacity",
                                    "Sockets the in-kernel per-socket table holds (--max-sockets).",
                                    value=table.capacity)
            yield GaugeMetricFamily("tcpstate_socket_table_entries", "Sockets in the per-socket table now.",
                                    value=table.entries)
            yield CounterMetricFamily("tcpstate_socket_table_evictions",
                                      "Sockets pushed out of the full per-socket table (LRU) while still open; "
                                      "their later transitions count as untracked. Derived from inserts, frees "
                                      "and entries; under churn it errs low by the churn of one scrape.",
                                      value=table.evictions)


class StateCollector(Collector):
    """The socket-table gauges, from the last background poll of each namespace.

    results: label -> statepoll.NamespaceState; errors: label -> failed polls; clock: wall time.
    Reads only what the poller already stored, so a scrape never waits for a poll."""

    def __init__(self, results: Callable[[], dict], errors: Callable[[], dict], clock: Callable[[], float]):
        self._results = results
        self._errors = errors
        self._clock = clock

    def collect(self):
        from .kstats import KERNEL_COUNTERS

        results = self._results()
        now = self._clock()
        ns = ["netns"]
        sockets = GaugeMetricFamily("tcpstate_sockets", "TCP sockets in each state now, from sock_diag (as `ss -tan` "
                                    "counts them; ss shows NEW_SYN_RECV as SYN-RECV).", labels=ns + ["state"])
        tw = GaugeMetricFamily("tcpstate_time_wait_sockets", "TIME_WAIT sockets by local or remote port: the top "
                               "ports, then port=\"other\" for the rest.", labels=ns + ["side", "port"])
        tw_limit = GaugeMetricFamily("tcpstate_time_wait_limit", "net.ipv4.tcp_max_tw_buckets: TIME_WAIT sockets "
                                     "beyond it are not created.", labels=ns)
        eph = GaugeMetricFamily("tcpstate_ephemeral_ports", "Ports in net.ipv4.ip_local_port_range: the 4-tuples a "
                                "local address has per remote endpoint.", labels=ns)
        in_use = GaugeMetricFamily("tcpstate_ephemeral_ports_in_use", "Sockets on an ephemeral local port per remote "
                                   "endpoint (top endpoints), TIME_WAIT included.", labels=ns + ["remote"])
        util = GaugeMetricFamily("tcpstate_ephemeral_port_utilization", "Forecast share of the ephemeral ports a "
                                 "remote endpoint takes in the steady state at the current TIME_WAIT entry rate "
                                 "(0..1; see README).", labels=ns + ["remote"])
        exhaust = GaugeMetricFamily("tcpstate_ephemeral_port_exhaustion_seconds", "Forecast seconds until a remote "
                                    "endpoint's ephemeral ports run out at the current rate; absent if they do not.",
                                    labels=ns + ["remote"])
        duration = GaugeMetricFamily("tcpstate_state_poll_duration_seconds", "Wall time of the last socket-table "
                                     "poll.", labels=ns)
        cpu = GaugeMetricFamily("tcpstate_state_poll_cpu_seconds", "CPU time (user+system) of the last "
                                "socket-table poll.", labels=ns)
        age = GaugeMetricFamily("tcpstate_state_poll_age_seconds", "Seconds since the last successful poll.",
                                labels=ns)
        kernel = {metric: CounterMetricFamily(f"tcpstate_kernel_tcp_{metric}", doc, labels=ns)
                  for _f, _g, _k, metric, doc in KERNEL_COUNTERS}
        for label in sorted(results):
            r = results[label]
            for state, n in r.sockets.items():
                sockets.add_metric([label, state], n)
            for side, port, n in r.time_wait_ports:
                tw.add_metric([label, side, port], n)
            tw_limit.add_metric([label], r.limits.time_wait_max)
            eph.add_metric([label], r.limits.ephemeral_ports)
            for e in r.endpoints:
                in_use.add_metric([label, e.remote], e.time_wait + e.other)
                if e.forecast is not None:
                    util.add_metric([label, e.remote], e.forecast.utilization)
                    if e.forecast.seconds_to_exhaustion is not None:
                        exhaust.add_metric([label, e.remote], e.forecast.seconds_to_exhaustion)
            duration.add_metric([label], r.duration_seconds)
            cpu.add_metric([label], r.cpu_seconds)
            age.add_metric([label], max(0.0, now - r.finished))
            for metric, value in r.kernel.items():
                kernel[metric].add_metric([label], value)
        yield from (sockets, tw, tw_limit, eph, in_use, util, exhaust, duration, cpu, age)
        yield from kernel.values()
        errors = CounterMetricFamily("tcpstate_state_poll_errors", "Socket-table polls that failed (namespace "
                                     "gone, unreadable, or refused).", labels=ns)
        for label, n in sorted(self._errors().items()):
            errors.add_metric([label], n)
        yield errors


class AnomalyCollector(Collector):
    """fired / active: kind -> count / bool (anomaly.Engine). webhook: notify.Webhook or None."""

    def __init__(self, kinds: list, fired: Callable[[], dict], active: Callable[[], dict], webhook=None):
        self._kinds = list(kinds)
        self._fired = fired
        self._active = active
        self._webhook = webhook

    def collect(self):
        fired, active = self._fired(), self._active()
        total = CounterMetricFamily("tcpstate_anomalies", "Anomalies that started firing, by detector.",
                                    labels=["kind"])
        now = GaugeMetricFamily("tcpstate_anomaly_active", "1 while the detector's anomaly is firing.",
                                labels=["kind"])
        for kind in self._kinds:
            total.add_metric([kind], fired.get(kind, 0))
            now.add_metric([kind], 1 if active.get(kind) else 0)
        yield total
        yield now
        if self._webhook is not None:
            hook = CounterMetricFamily("tcpstate_anomaly_webhook_events",
                                       "Anomaly events for the webhook: sent, failed after retries, or dropped "
                                       "because its queue was full.", labels=["result"])
            for result in ("sent", "failed", "dropped"):
                hook.add_metric([result], getattr(self._webhook, result))
            yield hook


class ReloadCollector(Collector):
    """Config reloads on SIGHUP, named as Prometheus names its own. stats() -> dict with success and
    failure (counts), last_ok (bool) and last_success (Unix seconds of the last good load)."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        st = self._stats()
        yield GaugeMetricFamily("tcpstate_config_last_reload_successful",
                                "1 if the last config load (at start or on SIGHUP) succeeded.",
                                value=1 if st["last_ok"] else 0)
        yield GaugeMetricFamily("tcpstate_config_last_reload_success_timestamp_seconds",
                                "When the config in use was loaded.", value=st["last_success"])
        reloads = CounterMetricFamily("tcpstate_config_reloads", "Config reloads on SIGHUP, by result; a failed "
                                      "one keeps the previous config.", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], st[result])
        yield reloads
