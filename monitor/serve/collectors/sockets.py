"""sockets.py: the socket-table gauges and the kernel's own TCP counters, from the last background poll of each namespace."""

from __future__ import annotations

from typing import Callable, NamedTuple

from prometheus_client.registry import Collector

from monitor.serve.collectors import Family, families
from monitor.sockets.kstats import KERNEL_COUNTERS


class Polls(NamedTuple):
    """What one scrape shows: the last poll of each namespace (label -> poller.NamespaceState),
    failed polls by label, and the wall-clock time of the scrape."""

    results: dict
    errors: dict
    now: float

    def each(self):
        return [(label, self.results[label]) for label in sorted(self.results)]


def _per_ns(value):
    return lambda p: [((label,), value(r, p.now)) for label, r in p.each()]


def _endpoints(value, forecast_only=False, exhausting=False):
    """One sample per top endpoint of each namespace; the forecast's only where there is one
    (and the exhaustion time only where the ports do run out)."""
    def samples(p):
        out = []
        for label, r in p.each():
            for e in r.endpoints:
                if forecast_only and e.forecast is None:
                    continue
                if exhausting and e.forecast.seconds_to_exhaustion is None:
                    continue
                out.append(((label, e.remote), value(e)))
        return out
    return samples


NS = ("netns",)
TABLE = (
    Family("tcpstate_sockets", "gauge", "TCP sockets in each state now, from sock_diag (as `ss -tan` counts them; "
           "ss shows NEW_SYN_RECV as SYN-RECV).", NS + ("state",),
           lambda p: [((label, state), n) for label, r in p.each() for state, n in r.sockets.items()]),
    Family("tcpstate_time_wait_sockets", "gauge", "TIME_WAIT sockets by local or remote port: the top ports, then "
           "port=\"other\" for the rest.", NS + ("side", "port"),
           lambda p: [((label, side, port), n) for label, r in p.each() for side, port, n in r.time_wait_ports]),
    Family("tcpstate_time_wait_limit", "gauge", "net.ipv4.tcp_max_tw_buckets: TIME_WAIT sockets beyond it are not "
           "created.", NS, _per_ns(lambda r, now: r.limits.time_wait_max)),
    Family("tcpstate_ephemeral_ports", "gauge", "Ports in net.ipv4.ip_local_port_range: the 4-tuples a local address "
           "has per remote endpoint.", NS, _per_ns(lambda r, now: r.limits.ephemeral_ports)),
    Family("tcpstate_ephemeral_ports_in_use", "gauge", "Sockets on an ephemeral local port per remote endpoint (top "
           "endpoints), TIME_WAIT included.", NS + ("remote",), _endpoints(lambda e: e.time_wait + e.other)),
    Family("tcpstate_ephemeral_port_utilization", "gauge", "Forecast share of the ephemeral ports a remote endpoint "
           "takes in the steady state at the current TIME_WAIT entry rate (0..1; see README).", NS + ("remote",),
           _endpoints(lambda e: e.forecast.utilization, forecast_only=True)),
    Family("tcpstate_ephemeral_port_exhaustion_seconds", "gauge", "Forecast seconds until a remote endpoint's "
           "ephemeral ports run out at the current rate; absent if they do not.", NS + ("remote",),
           _endpoints(lambda e: e.forecast.seconds_to_exhaustion, forecast_only=True, exhausting=True)),
    Family("tcpstate_state_poll_duration_seconds", "gauge", "Wall time of the last socket-table poll.", NS,
           _per_ns(lambda r, now: r.duration_seconds)),
    Family("tcpstate_state_poll_cpu_seconds", "gauge", "CPU time (user+system) of the last socket-table poll.", NS,
           _per_ns(lambda r, now: r.cpu_seconds)),
    Family("tcpstate_state_poll_age_seconds", "gauge", "Seconds since the last successful poll.", NS,
           _per_ns(lambda r, now: max(0.0, now - r.finished))),
    *(Family(f"tcpstate_kernel_tcp_{metric}", "counter", doc, NS,
             lambda p, metric=metric: [((label,), r.kernel[metric]) for label, r in p.each() if metric in r.kernel])
      for _file, _group, _name, metric, doc in KERNEL_COUNTERS),
    Family("tcpstate_state_poll_errors", "counter", "Socket-table polls that failed (namespace gone, unreadable, or "
           "refused).", NS, lambda p: [((label,), n) for label, n in sorted(p.errors.items())]),
)


class SocketCollector(Collector):
    """results: label -> poller.NamespaceState; errors: label -> failed polls; clock: wall time.
    Reads only what the poller already stored, so a scrape never waits for a poll."""

    def __init__(self, results: Callable[[], dict], errors: Callable[[], dict], clock: Callable[[], float]):
        self._results = results
        self._errors = errors
        self._clock = clock

    def collect(self):
        yield from families(TABLE, Polls(self._results(), self._errors(), self._clock()))
